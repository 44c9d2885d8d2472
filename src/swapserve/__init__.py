"""swapserve: a KServe v2 / Triton-compatible model server with hot swap and safe rollouts."""
from __future__ import annotations

__version__ = "0.1.0"
