"""The native worker, ``swapserve-loadgen`` (csrc/loadgen/loadgen.cc): find it, feed it, read its output.

It speaks the worker protocol of ``swapserve.bench.loop`` (ready / start time / progress /
done) with grpc++ generic calls on the same pre-serialised requests as ``worker_raw``, at a
fraction of the client CPU per request. ``setup.py`` builds it when grpc++ is installed
(``pkg-config --exists grpc++``; ``scripts/ensure-build-deps.sh`` installs it) and puts it
next to this module; without it ``--client auto`` falls back to the raw Python worker.

Files (one set per worker process; all little-endian):

* ``SPEC.json``: a flat object of strings and numbers, ``{url, method, duration_s, timeout_s,
  concurrency, rate, slot, slots, first_payload}`` (the fields of ``loop.WorkerSpec``).
* ``PAYLOADS.bin``: u32 count, then per payload u32 length + bytes.
* ``OUT.bin``: magic ``SSLOAD01``, u64 n, f64 cpu_s, u32 t, u32 0, then i64[n] sched,
  i64[n] sent, i64[n] done, i16[n] version, i8[n] status, then t version strings as
  u32 length + UTF-8 bytes. :func:`read_output` turns it into the arrays ``loop.Recorder``
  saves, so the runner merges native and Python workers' records alike.

``SWAPSERVE_LOADGEN=/path/to/swapserve-loadgen`` uses another build of the binary.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from swapserve.bench.loop import WorkerSpec

BINARY_NAME = "swapserve-loadgen"
#: Environment variable naming the binary to run instead of the one next to this module.
BINARY_ENV = "SWAPSERVE_LOADGEN"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"

_MAGIC = b"SSLOAD01"
_HEADER = struct.Struct("<8sQdII")


class LoadgenOutputError(ValueError):
    """OUT.bin is not a complete output of swapserve-loadgen."""


def binary_path() -> Path:
    """Where the binary is looked for (it may not exist)."""
    override = os.environ.get(BINARY_ENV)
    return Path(override) if override else Path(__file__).with_name(BINARY_NAME)


def find_binary() -> Path | None:
    """The executable ``swapserve-loadgen``, or ``None`` when it was not built."""
    path = binary_path()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def missing_message() -> str:
    """Why the native client cannot run here, and how to fix it."""
    return (f"the native client is not built (no executable {binary_path()}); `pip install -e .` builds it when "
            "grpc++ is installed: run scripts/ensure-build-deps.sh (Debian/Ubuntu packages libgrpc++-dev "
            "pkg-config) and reinstall")


def prepare(spec: WorkerSpec, tmp: Path, n: int) -> tuple[list[str], Path]:
    """Write worker n's SPEC.json and PAYLOADS.bin into tmp; return its command line and OUT.bin path."""
    binary = find_binary()
    if binary is None:
        raise FileNotFoundError(missing_message())
    spec_path, payloads_path, out = tmp / f"spec{n}.json", tmp / f"payloads{n}.bin", tmp / f"out{n}.bin"
    spec_path.write_text(json.dumps({
        "url": spec.url, "method": INFER_METHOD, "duration_s": spec.duration_s, "timeout_s": spec.timeout_s,
        "concurrency": spec.concurrency, "rate": spec.rate, "slot": spec.slot, "slots": spec.slots,
        "first_payload": spec.first_payload}))
    write_payloads(spec.payloads, payloads_path)
    return [str(binary), str(spec_path), str(payloads_path), str(out)], out


def write_payloads(payloads: list[bytes], path: Path) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(payloads)))
        for p in payloads:
            f.write(struct.pack("<I", len(p)))
            f.write(p)


def read_output(path: Path) -> dict[str, np.ndarray]:
    """OUT.bin as ``{sched, sent, done, status, version, version_table, cpu_s}`` (the worker npz's arrays).

    Raises ``LoadgenOutputError`` when the file is truncated or is not a loadgen output.
    """
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise LoadgenOutputError(f"{path}: {len(data)} bytes, shorter than the header")
    magic, n, cpu_s, t, _ = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise LoadgenOutputError(f"{path}: not a {BINARY_NAME} output (magic {magic!r})")
    off = _HEADER.size
    if len(data) < off + 27 * n:
        raise LoadgenOutputError(f"{path}: truncated ({len(data)} bytes for {n} records)")
    out: dict[str, np.ndarray] = {}
    for key, dtype in (("sched", "<i8"), ("sent", "<i8"), ("done", "<i8"), ("version", "<i2"), ("status", "i1")):
        out[key] = np.frombuffer(data, dtype, n, off)
        off += n * np.dtype(dtype).itemsize
    table = []
    for _ in range(t):
        if off + 4 > len(data):
            raise LoadgenOutputError(f"{path}: truncated in the version table")
        (size,) = struct.unpack_from("<I", data, off)
        table.append(data[off + 4:off + 4 + size].decode("utf-8", errors="replace"))
        off += 4 + size
    out["version_table"] = np.array(table, dtype=str)
    out["cpu_s"] = np.float64(cpu_s)
    return out
