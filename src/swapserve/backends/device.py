"""Device selection and free-memory queries: the only GPU-specific branches in backends.

Devices are torch-style strings: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Every code path
runs on ``cpu`` too, so CI machines without a GPU exercise the same residency logic.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from swapserve import errors

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(pref: str) -> str:
    """Turn a device preference into a concrete device string.

    ``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``. ``"cpu"``, ``"cuda"``
    and ``"cuda:N"`` are returned as given (lower-cased) after checking that the device
    exists; anything else, or a GPU that is not there, raises ``ConfigError``.
    """
    p = (pref or "auto").strip().lower()
    if p == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if p == "cpu":
        return "cpu"
    m = _CUDA.match(p)
    if m is None:
        raise errors.ConfigError(
            f"unknown device '{pref}'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    if not torch.cuda.is_available():
        raise errors.ConfigError(
            f"device '{pref}' requested but torch sees no CUDA GPU on this host; "
            "use 'cpu' or 'auto'"
        )
    if m.group(1) is not None:
        index, count = int(m.group(1)), torch.cuda.device_count()
        if index >= count:
            raise errors.ConfigError(
                f"device '{pref}' does not exist: this host has {count} CUDA device(s) "
                f"(cuda:0..cuda:{count - 1})"
            )
    return p


def device_free_bytes(device: str) -> int:
    """Bytes that can still be allocated on ``device``.

    cuda: ``torch.cuda.mem_get_info``. cpu: ``MemAvailable`` from /proc/meminfo, capped by
    the cgroup (v2) memory limit when the process runs in a container with one.
    """
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device != "cpu":
        raise errors.ConfigError(f"unknown device '{device}'; use 'cpu', 'cuda' or 'cuda:N'")
    avail = _meminfo_available()
    limit = _cgroup_available()
    if limit is not None:
        avail = min(avail, limit)
    return avail


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # Not Linux (or no /proc): fall back to free physical pages.
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def _cgroup_available() -> int | None:
    base = Path("/sys/fs/cgroup")
    try:
        raw = (base / "memory.max").read_text().strip()
        if raw == "max":
            return None
        current = int((base / "memory.current").read_text().strip())
        return max(0, int(raw) - current)
    except (OSError, ValueError):
        return None
