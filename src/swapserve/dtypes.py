"""Triton datatypes: wire names, config.pbtxt enum names and numpy dtypes.

BF16 maps to ``uint16`` (its bit pattern); BYTES is not a fixed-size type and is
refused by the backends swapserve ships.
"""
from __future__ import annotations

import numpy as np

#: Wire name -> numpy dtype (little-endian, as the KServe v2 raw format requires).
NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}

WIRE_NAMES: frozenset[str] = frozenset(NUMPY) | {"BYTES"}


def from_config(enum_name: str) -> str:
    """config.pbtxt's ``TYPE_FP32`` -> wire ``FP32`` (``TYPE_STRING`` -> ``BYTES``)."""
    name = enum_name.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def to_config(wire: str) -> str:
    return "TYPE_STRING" if wire == "BYTES" else f"TYPE_{wire}"


def numpy_dtype(wire: str) -> np.dtype:
    """The numpy dtype for a fixed-size wire datatype; KeyError for BYTES or unknown."""
    return NUMPY[wire]


def from_numpy(dtype: np.dtype) -> str:
    """numpy dtype -> wire name (uint16 reads as UINT16, never BF16)."""
    dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    for wire, dt in NUMPY.items():
        if wire != "BF16" and dt == dtype:
            return wire
    raise KeyError(f"no Triton datatype for numpy dtype {dtype}")
