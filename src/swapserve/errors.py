"""One error hierarchy for the whole server; each error carries its gRPC status.

Messages name the model, the version and what to do about it. The servers map
these to a gRPC status in exactly one place (``swapserve.server.errors``);
anything that is not a ``SwapserveError`` becomes INTERNAL with the traceback
logged, never returned to the caller.
"""
from __future__ import annotations

import grpc


class SwapserveError(Exception):
    """Base of every error swapserve reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ModelNotFound(SwapserveError):
    """The model or version does not exist in the repository or registry."""

    code = grpc.StatusCode.NOT_FOUND


class VersionNotReady(SwapserveError):
    """The model or version exists but cannot serve right now."""

    code = grpc.StatusCode.UNAVAILABLE


class InvalidInput(SwapserveError):
    """The request does not match the model's configuration."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(SwapserveError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SwapserveError):
    """The system is not in a state that allows the operation (e.g. control mode)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class GenerationConflict(FailedPrecondition):
    """A deployment write conditional on a generation lost to another writer (another replica
    changed the model in between). The control plane catches up and retries before it gives up."""


class StaleRollout(FailedPrecondition):
    """A rollout update made from a record that someone else (another replica, the leader) saved
    since it was read: nothing was written; re-read the rollout and try again."""


class NotLeader(FailedPrecondition):
    """A decision taken under a lease that has since moved to another replica (or expired): it is
    refused in the transaction that would have recorded it, so a deposed leader decides nothing."""


class ResourceExhausted(SwapserveError):
    """A queue, memory budget or size limit is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(SwapserveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(SwapserveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class PermissionDenied(SwapserveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(SwapserveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(SwapserveError):
    """Something other than a model does not exist (a token name, ...)."""

    code = grpc.StatusCode.NOT_FOUND


class ModelExecutionError(SwapserveError):
    """The model itself raised while running a batch; fails only that batch's requests."""

    code = grpc.StatusCode.INTERNAL


class ConfigError(SwapserveError):
    """A config.pbtxt (or other configuration) is invalid; the message says where."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class RegistryUnavailable(SwapserveError):
    """The registry database did not answer (down, locked, timed out). Routing already published
    by a fail-safe path (rollback, abort, a failed gate) stays; the write is retried from the outbox."""

    code = grpc.StatusCode.UNAVAILABLE
