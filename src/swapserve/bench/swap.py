"""The swap driver: how the harness makes a model version live during a run.

Kept to this one module: swapserve's control client, its CLI, or any other server's
reload command all fit behind the same function type. A driver is ``(model, version) -> None``
and raises ``SwapFailed`` when the server refused or the command failed.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swapserve.tls import ClientTls

SwapDriver = Callable[[str, str], None]


class SwapFailed(RuntimeError):
    pass


def _run(cmd: list[str], timeout: float, env: Mapping[str, str] | None = None) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env} if env else None)
    except subprocess.TimeoutExpired as exc:
        raise SwapFailed(f"{shlex.join(cmd)} did not finish in {timeout:.0f}s") from exc
    if proc.returncode != 0:
        raise SwapFailed(f"{shlex.join(cmd)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}")


def promote_driver(control_url: str, reason: str = "swapserve bench swap scenario", timeout: float = 60, *,
                   tls: ClientTls | None = None, token: str = "") -> SwapDriver:
    """Promote through swapserve's control service, in process (``swapserve.cli.client.ControlClient``).

    An in-process client, not a ``swapserve promote`` subprocess per swap: starting Python
    for each swap would spend client CPU that the run is measuring. ``tls``: the control
    port's TLS (the server's one certificate serves every port); ``token``: the control
    token (a principal with the operator role), "" for none.
    """
    try:
        from swapserve.cli.client import ControlClient, ControlError
    except ImportError:  # an installation without the control client: its CLI
        return promote_cli_driver(control_url, reason, timeout, tls=tls, token=token)
    client = ControlClient(control_url, token=token or None, tls=tls)

    def promote(model: str, version: str) -> None:
        try:
            client.promote(model, int(version), reason=reason)
        except ControlError as exc:
            raise SwapFailed(f"promote {model} {version} at {control_url}: {exc}") from exc

    return promote


def promote_cli_driver(control_url: str, reason: str = "swapserve bench swap scenario",
                       timeout: float = 60, *, tls: ClientTls | None = None, token: str = "") -> SwapDriver:
    """Promote through the operator CLI: ``swapserve promote MODEL VERSION --url URL``.

    The token goes in the child's environment (``SWAPSERVE_TOKEN``), never its argv (visible in ps).
    """
    flags = [f"--{name}={path}" for name, path in (("tls-ca", tls.ca), ("tls-cert", tls.cert),
                                                   ("tls-key", tls.key)) if path] if tls else []
    env = {"SWAPSERVE_TOKEN": token} if token else None

    def promote(model: str, version: str) -> None:
        _run([sys.executable, "-m", "swapserve.cli", "promote", model, version, "--url", control_url,
              "--reason", reason, "--json", *flags], timeout, env)

    return promote


def command_driver(template: str, timeout: float = 60) -> SwapDriver:
    """Any server's own reload API, through a command; ``{model}`` and ``{version}`` are substituted."""

    def run(model: str, version: str) -> None:
        _run([part.format(model=model, version=version) for part in shlex.split(template)], timeout)

    return run


def control_cli_available() -> bool:
    """True when this installation has the ``swapserve promote`` verb (the control service's CLI)."""
    proc = subprocess.run([sys.executable, "-m", "swapserve.cli", "promote", "--help"], capture_output=True, timeout=60)
    return proc.returncode == 0
