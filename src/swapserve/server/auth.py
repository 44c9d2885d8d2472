"""Who is calling, and may they: one authenticator for the control, feedback and inference services.

Credentials, in the order they are tried:

1. a token in ``authorization: Bearer TOKEN`` (or ``x-swapserve-feedback-token``, the feedback
   service's older header): found by its SHA-256 among the auth file's principals, the
   registry's tokens (``swapserve token create``), the control token (principal ``admin``,
   role admin) and the feedback tokens (their names, role feedback). A token that matches none
   is UNAUTHENTICATED, whatever else the call carries;
2. the client certificate of an mTLS connection (``--tls-ca``): its common name or any subject
   alternative name, matched against the auth file's ``mtls`` names. An unmapped certificate
   is no identity (it only proves the CA issued it);
3. nothing: ``loopback`` (from this machine) where the server allows it — on the control service
   with the admin role while no control credential is configured (no control token, no auth
   file; ``loopback_roles`` in the auth file says otherwise), on the inference port while it is
   open.

The audit log records the principal (``"alice (token, ipv4:10.1.2.3:5512)"``), never what a
client says about itself. Registry tokens are reread every ``REFRESH_S`` seconds off the event
loop (and at once after this server creates or revokes one), so a token revoked on any replica
stops working on every replica within that time; while the registry is down the last tokens
read stay in force.

Inference (``InferenceGate``): open by default only when the inference port binds loopback
(``--inference-open`` / the auth file's ``inference.open`` say otherwise). When it is not open,
every call names a principal whose ``models`` patterns cover the model (UNAUTHENTICATED without
a credential, PERMISSION_DENIED otherwise). Rate limits (the auth file's ``inference.rate`` and a
principal's ``rate``) are token buckets per principal (per peer host for anonymous callers):
RESOURCE_EXHAUSTED with the time to wait. An open port without rate limits checks nothing
per request.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from swapserve.errors import ConfigError, InvalidInput, PermissionDenied, ResourceExhausted, Unauthenticated
from swapserve.identity import (Principal, Role, check_model_patterns, check_principal_name, check_token_hash,
                                hash_token, parse_roles)

log = logging.getLogger(__name__)

#: How often the registry's tokens are reread (seconds).
REFRESH_S = 2.0
#: The feedback service's own token header (kept for its clients).
FEEDBACK_TOKEN_METADATA = "x-swapserve-feedback-token"
#: The name a call without a credential from this machine acts as (where that is allowed).
LOOPBACK_PRINCIPAL = "local"
#: The name the control token authenticates as.
CONTROL_TOKEN_PRINCIPAL = "admin"
#: Rate-limit buckets kept at most (least recently used dropped first: a dropped bucket starts full).
MAX_BUCKETS = 10_000

_AUTH_FILE_KEYS = {"principals", "loopback_roles", "inference"}
_PRINCIPAL_KEYS = {"roles", "models", "token_sha256", "mtls", "rate"}
_INFERENCE_KEYS = {"open", "rate"}


# -- the auth file -------------------------------------------------------------------------------


def _rate(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, Mapping) or set(value) - {"requests_per_second", "burst"} \
            or "requests_per_second" not in value:
        raise ConfigError(f"{where}: rate is {{requests_per_second: N, burst: M}} (burst defaults to N)")
    try:
        rps = float(value["requests_per_second"])
        burst = float(value.get("burst", rps))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: requests_per_second and burst are numbers") from None
    if not (math.isfinite(rps) and math.isfinite(burst)) or rps <= 0 or burst < 1:
        raise ConfigError(f"{where}: requests_per_second must be > 0 and burst >= 1")
    return rps, burst


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a string or a list of strings")
    return value


@dataclass(frozen=True)
class AuthPolicy:
    """The ``--auth-file`` (YAML): principals with their credentials, roles, models and rates."""

    principals: tuple[Principal, ...] = ()
    #: token SHA-256 -> principal name
    token_hashes: Mapping[str, str] = field(default_factory=dict)
    #: certificate name (CN or SAN) -> principal name
    mtls_names: Mapping[str, str] = field(default_factory=dict)
    loopback_roles: frozenset[Role] = frozenset()
    inference_open: bool | None = None
    inference_rate: tuple[float, float] | None = None

    @classmethod
    def load(cls, path: Path) -> AuthPolicy:
        try:
            text = path.expanduser().read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the auth file {path}: {e.strerror}") from None
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"auth file {path} is not valid YAML: {e}") from None
        return cls.parse(doc, str(path))

    @classmethod
    def parse(cls, doc: Any, where: str = "auth file") -> AuthPolicy:
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'principals', 'loopback_roles', 'inference'")
        if unknown := set(doc) - _AUTH_FILE_KEYS:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_AUTH_FILE_KEYS)}")
        principals: list[Principal] = []
        hashes: dict[str, str] = {}
        certs: dict[str, str] = {}
        raw = doc.get("principals") or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: 'principals' maps a name to {{roles, models, token_sha256, mtls, rate}}")
        try:
            for name, spec in raw.items():
                at = f"{where}: principal '{name}'"
                check_principal_name(str(name))
                spec = spec or {}
                if not isinstance(spec, Mapping) or (unknown := set(spec) - _PRINCIPAL_KEYS):
                    raise ConfigError(f"{at}: known keys are {sorted(_PRINCIPAL_KEYS)}")
                for digest in _strings(spec.get("token_sha256", []), f"{at}: token_sha256"):
                    digest = check_token_hash(digest)
                    if digest in hashes:
                        raise ConfigError(f"{at}: a token hash appears twice")
                    hashes[digest] = str(name)
                for cert in _strings(spec.get("mtls", []), f"{at}: mtls"):
                    if cert in certs:
                        raise ConfigError(f"{at}: the certificate name '{cert}' already belongs to '{certs[cert]}'")
                    certs[cert] = str(name)
                principals.append(Principal(
                    str(name), parse_roles(_strings(spec.get("roles", []), f"{at}: roles")),
                    check_model_patterns(_strings(spec.get("models", []), f"{at}: models")),
                    source="token", rate=_rate(spec["rate"], at) if "rate" in spec else None))
            loopback = parse_roles(_strings(doc.get("loopback_roles", []), f"{where}: loopback_roles"))
        except InvalidInput as e:
            raise ConfigError(f"{where}: {e.message}") from None
        inference = doc.get("inference") or {}
        if not isinstance(inference, Mapping) or (unknown := set(inference) - _INFERENCE_KEYS):
            raise ConfigError(f"{where}: 'inference' has the keys {sorted(_INFERENCE_KEYS)}")
        is_open = inference.get("open")
        if is_open is not None and not isinstance(is_open, bool):
            raise ConfigError(f"{where}: inference.open is true or false")
        return cls(tuple(principals), hashes, certs, loopback, is_open,
                   _rate(inference["rate"], f"{where}: inference") if "rate" in inference else None)


# -- what a call carries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What one call presents: a token (or ""), the client certificate's names, the peer address."""

    token: str
    cert_names: tuple[str, ...]
    peer: str


def credentials_of(metadata: Iterable[tuple[str, object]], peer: str,
                   auth_context: Mapping[str, Iterable[Any]] | None = None) -> Credentials:
    """Credentials from a call's metadata, peer and TLS auth context (grpc.aio's shape)."""
    token = ""
    for key, value in metadata:
        if not isinstance(value, str):
            continue
        k = key.lower()
        if k == "authorization" and value.startswith("Bearer "):
            token = value[len("Bearer "):].strip()
        elif k == FEEDBACK_TOKEN_METADATA and not token:
            token = value.strip()
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for v in (auth_context or {}).get(key, ()):
            names.append(v.decode(errors="replace") if isinstance(v, bytes) else str(v))
    return Credentials(token, tuple(names), peer)


def call_credentials(context: Any) -> Credentials:
    """The credentials of a gRPC call (grpc.aio's context or the native front end's)."""
    try:
        peer = str(context.peer() or "")
    except Exception:  # noqa: BLE001 - a context without a peer is just unknown
        peer = ""
    return credentials_of(context.invocation_metadata() or (), peer, context.auth_context() or {})


def is_loopback_peer(peer: str) -> bool:
    """grpc peer strings: ``ipv4:127.0.0.1:5555``, ``ipv6:[::1]:5555``, ``unix:/path`` (local)."""
    import ipaddress

    if peer.startswith("unix:"):
        return True
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    host = host.replace("%25", "%").split("%")[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _peer_host(peer: str) -> str:
    return peer.partition(":")[2].rsplit(":", 1)[0] or peer


# -- the authenticator ---------------------------------------------------------------------------


class Authenticator:
    """Turns a call's credentials into a Principal (see the module docstring for the rules).

    Thread-safe for reads; the registry tokens are swapped in whole (one dict assignment)."""

    def __init__(self, policy: AuthPolicy | None = None, *, control_token: str | None = None,
                 feedback_tokens: Iterable[tuple[str, str]] = (), inference_open: bool | None = None,
                 registry: Any = None) -> None:
        """``inference_open``: None takes the policy's ``inference.open``, else open."""
        policy = policy or AuthPolicy()
        self.policy = policy
        by_name = {p.name: p for p in policy.principals}
        self._static: dict[str, Principal] = {h: by_name[n] for h, n in policy.token_hashes.items()}
        self._certs: dict[str, Principal] = {c: dataclasses.replace(by_name[n], source="mtls")
                                             for c, n in policy.mtls_names.items()}
        if control_token:
            self._static[hash_token(control_token)] = Principal(CONTROL_TOKEN_PRINCIPAL, frozenset({Role.ADMIN}),
                                                                source="control-token")
        for name, token in feedback_tokens:
            self._static[hash_token(token)] = Principal(name, frozenset({Role.FEEDBACK}), source="feedback-token")
        #: Roles a call without any credential gets on the control service from loopback.
        configured = bool(control_token) or bool(policy.principals)
        self.loopback_roles = policy.loopback_roles if configured else frozenset({Role.ADMIN})
        if inference_open is None:
            inference_open = policy.inference_open if policy.inference_open is not None else True
        self.inference_open = inference_open
        self._registry = registry
        self._tokens: dict[str, Principal] = {}

    # registry tokens

    def refresh(self) -> None:
        """Reread the registry's active tokens (a registry thread; RegistryUnavailable keeps the last)."""
        if self._registry is None:
            return
        fresh: dict[str, Principal] = {}
        for t in self._registry.tokens():
            fresh[t.sha256] = Principal(t.name, parse_roles(list(t.roles)), tuple(t.models), source="token")
        self._tokens = fresh

    async def run(self, registry_call: Callable[..., Any]) -> None:
        """Keep the registry tokens fresh until cancelled."""
        while True:
            try:
                await registry_call(self.refresh)
            except Exception as e:  # noqa: BLE001 - the last tokens read stay in force
                log.warning("could not reread the registry's tokens (the ones read before stay in force): %s", e)
            await asyncio.sleep(REFRESH_S)

    def model_grants(self) -> int:
        """How many known principals may call at least one model (a closed port with none serves no one)."""
        every = {p.name: p for p in (*self._static.values(), *self._certs.values(), *self._tokens.values())}
        return sum(1 for p in every.values() if p.models)

    # identification

    def identify(self, creds: Credentials) -> Principal | None:
        """The principal of these credentials; None when they carry none that maps to one.
        Raises Unauthenticated for a token that matches no principal."""
        if creds.token:
            digest = hash_token(creds.token)
            found = self._static.get(digest) or self._tokens.get(digest)
            if found is None:
                raise Unauthenticated("the token this call carried is not one the server accepts (unknown, revoked "
                                      "or expired); check it, or ask an admin for a new one (`swapserve token "
                                      "create`)")
            return found
        for name in creds.cert_names:
            if (p := self._certs.get(name)) is not None:
                return p
        return None

    def control(self, creds: Credentials, role: Role, what: str) -> str:
        """Authorise a control call needing ``role``; returns the actor the audit log records."""
        p = self.identify(creds)
        if p is None:
            if self.loopback_roles and is_loopback_peer(creds.peer):
                p = Principal(LOOPBACK_PRINCIPAL, self.loopback_roles, source="loopback")
            else:
                raise Unauthenticated(
                    f"{what} needs a credential and this call carried none: pass a token with --token-file FILE "
                    "(or SWAPSERVE_TOKEN; gRPC metadata 'authorization: Bearer TOKEN'), or a client certificate "
                    "the server's auth file maps to a principal")
        if not p.has(role):
            held = ", ".join(sorted(r.value for r in p.roles)) or "none"
            raise PermissionDenied(f"{what} needs the '{role.value}' role; '{p.name}' ({p.source}) has: {held}. "
                                   "An admin can grant it (`swapserve token create NAME --role "
                                   f"{role.value}`, or the auth file)")
        return p.actor(creds.peer)


# -- inference -----------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets by key (``rate`` requests/s, up to ``burst`` at once); ``clock`` is monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_BUCKETS) -> None:
        self._clock = clock
        self._max = max_keys
        #: key -> (tokens, last refill time)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, rate: tuple[float, float]) -> float:
        """Take one token; returns 0.0, or the seconds to wait when the bucket is empty (nothing taken)."""
        rps, burst = rate
        now = self._clock()
        tokens, last = self._buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - last) * rps)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rps
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return wait


class InferenceGate:
    """Per-model access and rate limits on the inference port. ``check`` returns nothing or raises."""

    def __init__(self, auth: Authenticator, limiter: RateLimiter | None = None) -> None:
        self._auth = auth
        self._limiter = limiter or RateLimiter()
        self._default_rate = auth.policy.inference_rate
        self._rated = self._default_rate is not None or any(p.rate for p in auth.policy.principals)

    @classmethod
    def needed(cls, auth: Authenticator) -> InferenceGate | None:
        """None when there is nothing to check per request (open inference, no rate limits)."""
        gate = cls(auth)
        return None if auth.inference_open and not gate._rated else gate

    def principal(self, creds: Credentials) -> Principal | None:
        """Who calls (once per call or stream); UNAUTHENTICATED when the port is closed and there is no one."""
        p = self._auth.identify(creds)
        if p is None and not self._auth.inference_open:
            raise Unauthenticated("this server's inference port requires a credential and this call carried none: "
                                  "send 'authorization: Bearer TOKEN' (tritonclient: headers={'authorization': "
                                  "'Bearer TOKEN'}) or a client certificate mapped to a principal")
        return p

    def check(self, p: Principal | None, creds: Credentials, model: str) -> None:
        """May ``p`` call ``model`` now: PERMISSION_DENIED, or RESOURCE_EXHAUSTED past its rate."""
        self._allow(p, model)
        self._throttle(p, creds)

    def _allow(self, p: Principal | None, model: str) -> None:
        if not self._auth.inference_open and (p is None or not p.may_call(model)):
            raise PermissionDenied(f"'{p.name if p else 'anonymous'}' may not call model '{model}'; an admin can "
                                   "allow it (the principal's models in the auth file, or `swapserve token create "
                                   "... --models`)")

    def _throttle(self, p: Principal | None, creds: Credentials) -> None:
        """One request of ``p``'s bucket; RESOURCE_EXHAUSTED with the wait when it is empty."""
        if not self._rated:
            return
        rate = (p.rate if p is not None else None) or self._default_rate
        if rate is None:
            return
        key = p.name if p is not None else "anonymous@" + _peer_host(creds.peer)
        wait = self._limiter.take(key, rate)
        if wait > 0:
            raise ResourceExhausted(f"rate limit of '{key}' exceeded ({rate[0]:g} requests/s, burst {rate[1]:g}); "
                                    f"retry in {wait:.3f} s")

    def authorize(self, context: Any, models: Sequence[str]) -> Principal | None:
        """A unary call on ``models``: its principal, access to each model, and one request of its
        rate (a statistics call over every model counts once)."""
        creds = call_credentials(context)
        p = self.principal(creds)
        for m in models:
            self._allow(p, m)
        self._throttle(p, creds)
        return p
