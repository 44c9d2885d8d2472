"""Who a caller is and what it may do: roles, principals and API tokens (no transport here).

Roles (``docs/security.md``, "Identities and roles"):

- ``viewer``: read status, events, rollouts, drift and the audit log;
- ``feedback``: report ground-truth labels;
- ``operator``: everything a viewer may, and traffic, promote, rollback, rollouts, metrics;
- ``admin``: everything, and register, load, unload, the repository API and tokens.

A principal also lists the models it may call on the inference port (``fnmatch`` patterns,
``*`` for all); that list is separate from the roles, so an application can call its model
without any control rights.

API tokens are ``ssw_`` followed by 43 URL-safe characters (256 random bits). Only their SHA-256
is ever stored (registry, auth file); a hash that fast is enough for a secret that random, and it
lets a token be found by its hash without comparing it against every stored one.
"""
from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from enum import Enum

from swapserve.errors import InvalidInput


class Role(str, Enum):
    VIEWER = "viewer"
    FEEDBACK = "feedback"
    OPERATOR = "operator"
    ADMIN = "admin"


#: What holding each role grants (a role grants itself and the roles listed).
_GRANTS: dict[Role, frozenset[Role]] = {
    Role.VIEWER: frozenset({Role.VIEWER}),
    Role.FEEDBACK: frozenset({Role.FEEDBACK}),
    Role.OPERATOR: frozenset({Role.OPERATOR, Role.VIEWER}),
    Role.ADMIN: frozenset(Role),
}
ROLE_NAMES = tuple(r.value for r in Role)
TOKEN_PREFIX = "ssw_"
#: Principal names: what the audit log shows and what policies refer to.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")


def parse_roles(values: list[str] | tuple[str, ...] | str) -> frozenset[Role]:
    """``["operator"]`` or ``"operator,feedback"`` -> roles; InvalidInput naming the valid ones."""
    items = values.split(",") if isinstance(values, str) else list(values)
    roles = set()
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        try:
            roles.add(Role(item))
        except ValueError:
            raise InvalidInput(f"unknown role '{item}'; roles are {', '.join(ROLE_NAMES)}") from None
    return frozenset(roles)


def check_principal_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"principal name {name!r} is not valid: 1-128 characters of letters, digits and "
                           "'_.@:-', starting with a letter or digit")
    return name


#: At most this many model patterns per principal (each matched on every closed-port call).
MAX_MODEL_PATTERNS = 100


def check_model_patterns(patterns: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if len(patterns) > MAX_MODEL_PATTERNS:
        raise InvalidInput(f"{len(patterns)} model patterns given; at most {MAX_MODEL_PATTERNS} (use fnmatch "
                           "patterns such as 'team-*' to cover many models)")
    out = []
    for p in patterns:
        p = str(p).strip()
        if not p or len(p) > 128 or any(c.isspace() for c in p):
            raise InvalidInput(f"model pattern {p!r} is not valid: a model name or an fnmatch pattern "
                               "such as 'fraud-*' or '*'")
        out.append(p)
    return tuple(out)


def new_token() -> str:
    """A fresh API token (shown once; store only :func:`hash_token` of it)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 stored for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_token_hash(value: str) -> str:
    value = str(value).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise InvalidInput("a token hash is 64 hex digits (the SHA-256 of the token; `swapserve token hash` "
                           "prints it)")
    return value


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``source`` says how it was authenticated: ``token`` (an API
    token), ``mtls`` (a client certificate), ``control-token``, ``feedback-token``, or
    ``loopback`` (no credential, from this machine, where the server allows that)."""

    name: str
    roles: frozenset[Role] = frozenset()
    #: fnmatch patterns of the models this principal may call on the inference port.
    models: tuple[str, ...] = ()
    source: str = "token"
    #: Requests per second and burst on the inference port; None: the policy's default.
    rate: tuple[float, float] | None = None
    _granted: frozenset[Role] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        granted: set[Role] = set()
        for r in self.roles:
            granted |= _GRANTS[r]
        object.__setattr__(self, "_granted", frozenset(granted))

    def has(self, role: Role) -> bool:
        return role in self._granted

    def may_call(self, model: str) -> bool:
        return any(p == "*" or p == model or fnmatch.fnmatchcase(model, p) for p in self.models)

    def actor(self, peer: str) -> str:
        """What the audit log records: ``"alice (token, ipv4:10.0.0.7:51234)"``."""
        return f"{self.name} ({self.source}, {peer or 'unknown peer'})"
