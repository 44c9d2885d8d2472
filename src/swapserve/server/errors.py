"""The one place where exceptions become gRPC statuses."""
from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from swapserve.errors import SwapserveError

log = logging.getLogger(__name__)

T = TypeVar("T")


def status_of(exc: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """(code, message) for ``exc``; unknown exceptions are logged with their traceback and become INTERNAL."""
    if isinstance(exc, SwapserveError):
        return exc.code, exc.message
    log.error("unexpected error in %s", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {where} ({type(exc).__name__}); the server log has details"


def map_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate a unary aio servicer method: SwapserveError -> its status; anything else -> INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status right here
            code, message = status_of(exc, fn.__name__)
            await context.abort(code, message)
            raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    return wrapper
