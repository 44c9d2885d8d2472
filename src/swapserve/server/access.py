"""Who may call the repository API on the inference port (RepositoryModelLoad / Unload).

Like Triton's ``--grpc-restricted-protocol=model-repository:...``, the mutating repository RPCs
are closed by default: the inference port is what every client reaches, and loading or unloading
a model is an operator's act. ``--repository-api`` (``SWAPSERVE_REPOSITORY_API=true``) opens them;
they then go through the control plane (audited, refused while a rollout runs, a recorded
champion protected). RepositoryIndex, the model metadata and statistics stay readable.

:meth:`RepositoryAccess.authorize` is the one place that decides; identities (tokens with roles,
mTLS client certificates) will decide here too, and the actor it returns is what the audit log
records, so nothing a client declares about itself is ever trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from swapserve.errors import PermissionDenied

#: The ``swapserve serve`` flag (and its environment twin) that opens the repository API.
REPOSITORY_API_FLAG = "--repository-api"
REPOSITORY_API_ENV = "SWAPSERVE_REPOSITORY_API=true"


@dataclass(frozen=True)
class RepositoryAccess:
    """The inference port's policy for the mutating repository RPCs."""

    #: Whether RepositoryModelLoad / RepositoryModelUnload are allowed at all (default: no).
    enabled: bool = False

    def authorize(self, rpc: str, context: Any) -> str:
        """The actor to audit for ``rpc`` called through ``context``; PermissionDenied when the
        caller may not call it. Today the only rule is the switch; the actor is the transport's
        peer address (never a header the client sets)."""
        if not self.enabled:
            raise PermissionDenied(
                f"{rpc} is disabled on the inference port (the repository API is restricted by default); "
                f"start the server with {REPOSITORY_API_FLAG} ({REPOSITORY_API_ENV}) to allow it, or load and "
                "unload versions with the control service (`swapserve load|unload MODEL VERSION`)")
        peer = ""
        try:
            peer = str(context.peer() or "")
        except Exception:  # noqa: BLE001 - a context without a peer still gets audited
            pass
        return f"repository-api ({peer or 'unknown peer'})"
