"""Runs the standalone C++ stress test under TSan and ASan/LSan/UBSan (tests/native/)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "native" / "run_sanitizers.sh"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_native_core_is_clean_under_sanitizers() -> None:
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "sanitizers clean" in proc.stdout
