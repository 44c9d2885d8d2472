"""``swapserve token create|list|revoke|hash``: API tokens with roles.

The CLI makes the token (256 random bits) and sends the server only its SHA-256, so the token is
shown once, here, and stored nowhere. Through the control service the caller must be an admin;
``--registry URL`` writes the registry directly instead (no server needed: how the first admin
token of a fleet is made, by whoever holds the database's credentials).
"""
from __future__ import annotations

import argparse
import getpass
import re
import socket
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

from swapserve.identity import ROLE_NAMES, hash_token, new_token

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """argparse type: ``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds (> 0)."""
    m = _DURATION.match(text.strip())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration such as 3600, 90m, 12h or 30d")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _record_dict(t: Any) -> dict[str, Any]:
    d = t.to_dict()
    d["sha256_prefix"] = d.pop("sha256")[:8]
    return d


def _registry_actor(url: str) -> str:
    """Who writes when the CLI goes to the database directly: the OS user (the database's
    credentials authenticated the connection)."""
    from sqlalchemy.engine import make_url

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry
        user = "unknown"
    return f"{user}@{socket.gethostname()} (registry {make_url(url).render_as_string(hide_password=True)})"


def _direct(args: argparse.Namespace) -> int:
    """The verb against the registry itself (``--registry``)."""
    from swapserve import errors
    from swapserve.cli.control import EXIT_SERVER, EXIT_UNREACHABLE, _console
    from swapserve.registry import Registry

    try:
        registry = Registry(args.registry)
        try:
            return _show(args, _act_direct(args, registry, _registry_actor(args.registry)))
        finally:
            registry.close()
    except errors.SwapserveError as exc:
        _console(stderr=True).print(f"swapserve token: {exc}", style="red", soft_wrap=True)
        return EXIT_UNREACHABLE if isinstance(exc, errors.RegistryUnavailable) else EXIT_SERVER


def _act_direct(args: argparse.Namespace, registry: Any, actor: str) -> Any:
    if args.action == "create":
        expires = (datetime.now(timezone.utc) + timedelta(seconds=args.expires_in)) if args.expires_in else None
        token = new_token()
        record = registry.create_token(args.name, hash_token(token), roles=args.role, models=_models(args.models),
                                       actor=actor, expires_at=expires, reason=args.reason)
        return token, _record_dict(record)
    if args.action == "revoke":
        return [_record_dict(t) for t in registry.revoke_token(args.name, actor=actor, reason=args.reason)]
    return [_record_dict(t) for t in registry.tokens(include_inactive=args.all)]


def _show(args: argparse.Namespace, result: Any) -> int:
    from rich.table import Table

    from swapserve.cli.control import EXIT_OK, _console, _print_json

    if args.action == "create":
        token, info = result
        if args.json:
            _print_json({"token": token, **info})
        else:
            err = _console(stderr=True)
            err.print(f"token '{info['name']}' created (roles: {', '.join(info['roles']) or 'none'}; models: "
                      f"{', '.join(info['models']) or 'none'}; expires: {info['expires_at'] or 'never'}). It is shown "
                      "once, now: store it in a secret manager or a file only its user can read.", soft_wrap=True)
            sys.stdout.write(token + "\n")
        return EXIT_OK
    if args.json:
        _print_json(result)
        return EXIT_OK
    out = _console()
    if args.action == "revoke":
        for t in result:
            out.print(f"revoked token '{t['name']}' (id {t['id']}, {t['sha256_prefix']}…)")
        return EXIT_OK
    table = Table("ID", "NAME", "ROLES", "MODELS", "CREATED", "BY", "EXPIRES", "REVOKED", "SHA256")
    for t in result:
        table.add_row(str(t["id"]), t["name"], ",".join(t["roles"]), ",".join(t["models"]), t["created_at"] or "",
                      t["created_by"] or "", t["expires_at"] or "never", t["revoked_at"] or "",
                      f"{t['sha256_prefix']}…")
    out.print(table)
    return EXIT_OK


def _cmd_token(args: argparse.Namespace) -> int:
    from swapserve.cli.control import EXIT_OK, UsageError, _run, _usage_error

    if args.action == "hash":
        token = sys.stdin.readline().strip()
        if not token:
            return _usage_error(args, UsageError("token hash reads the token from stdin (one line)"))
        sys.stdout.write(hash_token(token) + "\n")
        return EXIT_OK
    if args.action in ("create", "revoke") and not args.name:
        return _usage_error(args, UsageError(f"token {args.action} needs a NAME"))
    if args.action == "create" and not args.role and not _models(args.models):
        return _usage_error(args, UsageError("a token needs --role and/or --models (it would grant nothing)"))
    if args.registry:
        return _direct(args)

    def action(c: Any) -> int:
        if args.action == "create":
            token = new_token()
            info = c.create_token(args.name, hash_token(token), roles=args.role, models=_models(args.models),
                                  expires_in_s=args.expires_in or 0.0, reason=args.reason)
            return _show(args, (token, info))
        if args.action == "revoke":
            return _show(args, c.revoke_token(args.name, reason=args.reason))
        return _show(args, c.list_tokens(include_inactive=args.all))

    return _run(args, action)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from swapserve.cli.control import _common

    p = sub.add_parser(
        "token", parents=[_common()], help="API tokens with roles: create (shown once), list, revoke, hash",
        description="Examples: swapserve token create ci-bot --role operator --expires-in 90d; "
                    "swapserve token create payments-app --models 'fraud,risk-*'; swapserve token revoke ci-bot; "
                    "echo $TOKEN | swapserve token hash (for the auth file's token_sha256)")
    p.add_argument("action", choices=["create", "list", "revoke", "hash"])
    p.add_argument("name", nargs="?", default=None, help="the principal the token authenticates as")
    p.add_argument("--role", action="append", choices=ROLE_NAMES, default=[],
                   help="a role to grant (repeatable): viewer, feedback, operator, admin")
    p.add_argument("--models", default="", metavar="LIST",
                   help="comma-separated models (fnmatch patterns, '*' for all) it may call on the inference port")
    p.add_argument("--expires-in", type=parse_duration, default=None, metavar="DURATION",
                   help="e.g. 90d, 12h (default: never)")
    p.add_argument("--all", action="store_true", help="list: include revoked and expired tokens")
    p.add_argument("--registry", default=None, metavar="URL",
                   help="write the registry directly (no server; e.g. the first admin token)")
    p.set_defaults(func=_cmd_token, prog=p.prog)
