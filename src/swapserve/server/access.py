"""Who may call the repository API on the inference port (RepositoryModelLoad / Unload).

Like Triton's ``--grpc-restricted-protocol=model-repository:...``, the mutating repository RPCs
are closed by default: the inference port is what every client reaches, and loading or unloading
a model is an operator's act. ``--repository-api`` (``SWAPSERVE_REPOSITORY_API=true``) opens them;
they then go through the control plane (audited, refused while a rollout runs, a recorded
champion protected). RepositoryIndex, the model metadata and statistics stay readable.

:meth:`RepositoryAccess.authorize` is the one place that decides: the switch, then the caller
must be a principal with the ``admin`` role (``server.auth``; from loopback without credentials
while the server has none configured). The actor it returns, the authenticated principal, is
what the audit log records, so nothing a client declares about itself is ever trusted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from swapserve.errors import PermissionDenied
from swapserve.identity import Role
from swapserve.server.auth import Authenticator, call_credentials

#: The ``swapserve serve`` flag (and its environment twin) that opens the repository API.
REPOSITORY_API_FLAG = "--repository-api"
REPOSITORY_API_ENV = "SWAPSERVE_REPOSITORY_API=true"


@dataclass(frozen=True)
class RepositoryAccess:
    """The inference port's policy for the mutating repository RPCs."""

    #: Whether RepositoryModelLoad / RepositoryModelUnload are allowed at all (default: no).
    enabled: bool = False
    #: Who is calling; the default knows no credentials (loopback callers are admin).
    auth: Authenticator = field(default_factory=Authenticator)

    def authorize(self, rpc: str, context: Any) -> str:
        """The actor to audit for ``rpc`` called through ``context``; PermissionDenied when the
        API is off or the caller is not an admin, Unauthenticated without a credential."""
        if not self.enabled:
            raise PermissionDenied(
                f"{rpc} is disabled on the inference port (the repository API is restricted by default); "
                f"start the server with {REPOSITORY_API_FLAG} ({REPOSITORY_API_ENV}) to allow it, or load and "
                "unload versions with the control service (`swapserve load|unload MODEL VERSION`)")
        return self.auth.control(call_credentials(context), Role.ADMIN, rpc)
