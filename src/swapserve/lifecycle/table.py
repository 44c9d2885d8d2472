"""The serving table: everything a request needs about one model, in one immutable object.

Lifecycle publishes a new table (one reference store) whenever what a request may reach
changes: a version becomes resident, changes state, leaves, or the routing policy changes.
A request reads the table once and holds it for its whole life, so it never consults the
control path's mutable version slots. Ordering with the native routing snapshot: a table is
published *before* a snapshot that routes to a new version (every version of that snapshot
is already in it) and again after the snapshot is in place, so whichever snapshot a request
reads, the version it names is in the table it holds, or the version is draining and the
request gets a retryable UNAVAILABLE.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from swapserve.errors import ModelNotFound, SwapserveError, VersionNotReady
from swapserve.types import ModelSpec

if TYPE_CHECKING:
    from swapserve.lifecycle.runtime import VersionRuntime
    from swapserve.routing.policy import RoutingPolicy

_EMPTY: Mapping[int, "VersionRuntime"] = MappingProxyType({})

#: The error a request gets, as (class, message), raised anew for each request.
Refusal = tuple[type[SwapserveError], str]


@dataclass(frozen=True)
class ServingTable:
    """One model's request-path view at routing ``generation`` (0: nothing published yet).

    ``runtimes`` holds every version a request may reach (ready, serving or draining);
    ``resident`` the ready and serving ones (what error messages list); ``refusals``, for
    every other version the model knows, the error class and message a pinned request for it
    gets; ``no_route`` the error an unpinned request gets while the model has no routing
    policy (None when it has one). Errors are stored as (class, message) and raised fresh, so
    concurrent requests never share an exception object or its traceback.
    """

    name: str
    generation: int
    spec: ModelSpec | None
    policy: "RoutingPolicy | None"
    runtimes: Mapping[int, "VersionRuntime"] = field(default_factory=lambda: _EMPTY)
    resident: tuple[int, ...] = ()
    refusals: Mapping[int, Refusal] = field(default_factory=lambda: MappingProxyType({}))
    no_route: Refusal | None = None

    def pinned(self, version: str) -> "VersionRuntime":
        """The runtime of an explicitly requested version; ModelNotFound or VersionNotReady otherwise."""
        try:
            v = int(version)
        except ValueError:
            raise ModelNotFound(f"model '{self.name}' has no version '{version}'; versions are positive "
                                "integers") from None
        rt = self.runtimes.get(v)
        if rt is not None:
            return rt
        refusal = self.refusals.get(v)
        if refusal is not None:
            raise refusal[0](refusal[1])
        raise ModelNotFound(f"model '{self.name}' has no version {v}; resident versions: {list(self.resident)}")

    def routed(self, version: int) -> "VersionRuntime":
        """The runtime the routing snapshot chose (VersionNotReady when it is no longer resident)."""
        rt = self.runtimes.get(version)
        if rt is None:
            raise VersionNotReady(f"model '{self.name}' version {version} is not resident; retry")
        return rt

    def unrouted(self) -> SwapserveError:
        """The error for an unpinned request while the model has no routing policy."""
        cls, message = self.no_route or (VersionNotReady, f"model '{self.name}' has no serving version")
        return cls(message)
