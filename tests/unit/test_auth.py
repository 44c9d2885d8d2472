"""The authenticator, the auth file, the inference gate and the rate limiter (server.auth), with
plain credentials and a fake clock; registry tokens on a real SQLite registry."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from swapserve.errors import (AlreadyExists, ConfigError, InvalidInput, NotFound, PermissionDenied,
                              ResourceExhausted, Unauthenticated)
from swapserve.identity import Principal, Role, check_model_patterns, hash_token, new_token, parse_roles
from swapserve.registry import Registry
from swapserve.server.auth import (Authenticator, AuthPolicy, Credentials, InferenceGate, RateLimiter,
                                   credentials_of)

ADMIN_T, OPS_T, APP_T = "a" * 24, "o" * 24, "p" * 24
REMOTE, LOCAL = "ipv4:10.0.0.9:4000", "ipv4:127.0.0.1:4000"


def policy(**extra: object) -> AuthPolicy:
    return AuthPolicy.parse({"principals": {
        "alice": {"roles": ["admin"], "token_sha256": hash_token(ADMIN_T)},
        "ci": {"roles": ["operator", "feedback"], "token_sha256": [hash_token(OPS_T)]},
        "payments": {"models": ["fraud", "risk-*"], "token_sha256": hash_token(APP_T),
                     "mtls": ["payments.internal", "spiffe://prod/payments"], "rate": {"requests_per_second": 2}},
    }, **extra})


def creds(token: str = "", certs: tuple[str, ...] = (), peer: str = REMOTE) -> Credentials:
    return Credentials(token, certs, peer)


def test_roles_grant_what_the_docs_say() -> None:
    admin = Principal("a", frozenset({Role.ADMIN}))
    operator = Principal("o", frozenset({Role.OPERATOR}))
    assert all(admin.has(r) for r in Role)
    assert operator.has(Role.VIEWER) and not operator.has(Role.ADMIN) and not operator.has(Role.FEEDBACK)
    assert not Principal("f", frozenset({Role.FEEDBACK})).has(Role.VIEWER)
    assert parse_roles("operator, feedback") == {Role.OPERATOR, Role.FEEDBACK}
    with pytest.raises(InvalidInput, match="unknown role 'root'; roles are viewer, feedback, operator, admin"):
        parse_roles(["root"])
    app = Principal("app", models=("fraud", "risk-*"))
    assert app.may_call("fraud") and app.may_call("risk-eu") and not app.may_call("fraudster")
    assert not Principal("none").may_call("fraud") and Principal("all", models=("*",)).may_call("x")
    with pytest.raises(InvalidInput, match="at most 100"):
        check_model_patterns([f"m{i}" for i in range(101)])
    with pytest.raises(InvalidInput, match="not valid"):
        check_model_patterns(["a b"])


def test_tokens_are_random_and_stored_as_sha256() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith("ssw_") and len(a) == 4 + 43
    assert hash_token(a) != a and len(hash_token(a)) == 64


def test_credentials_come_from_metadata_and_the_tls_context() -> None:
    c = credentials_of([("Authorization", "Bearer  tok "), ("x-swapserve-actor", "mallory")], REMOTE,
                       {"x509_common_name": [b"payments.internal"], "x509_subject_alternative_name": [b"a", b"b"]})
    assert c == Credentials("tok", ("payments.internal", "a", "b"), REMOTE)
    assert credentials_of([("x-swapserve-feedback-token", "f" * 20)], LOCAL).token == "f" * 20
    assert credentials_of([("authorization", b"Bearer x")], LOCAL).token == ""  # a binary header is no token


def test_identify_by_token_and_certificate() -> None:
    auth = Authenticator(policy())
    assert auth.identify(creds(ADMIN_T)).name == "alice"
    assert auth.identify(creds(certs=("spiffe://prod/payments",))).source == "mtls"
    assert auth.identify(creds(certs=("stranger.internal",))) is None  # an unmapped certificate is nobody
    assert auth.identify(creds()) is None
    with pytest.raises(Unauthenticated, match="not one the server accepts"):
        auth.identify(creds("wrong-token", certs=("payments.internal",)))  # a bad token is never excused


def test_control_roles_and_loopback() -> None:
    open_ = Authenticator()  # nothing configured: loopback callers are admin, others need a credential
    assert open_.control(creds(peer=LOCAL), Role.ADMIN, "Register") == f"local (loopback, {LOCAL})"
    with pytest.raises(Unauthenticated, match="Register needs a credential"):
        open_.control(creds(), Role.VIEWER, "Register")
    auth = Authenticator(policy())  # an auth file: loopback gets nothing unless loopback_roles says so
    with pytest.raises(Unauthenticated):
        auth.control(creds(peer=LOCAL), Role.VIEWER, "GetStatus")
    assert auth.control(creds(OPS_T), Role.OPERATOR, "Promote") == f"ci (token, {REMOTE})"
    with pytest.raises(PermissionDenied, match="Register needs the 'admin' role; 'ci' \\(token\\) has: feedback, "
                                               "operator"):
        auth.control(creds(OPS_T), Role.ADMIN, "Register")
    with pytest.raises(PermissionDenied, match="has: none"):
        auth.control(creds(APP_T), Role.VIEWER, "GetStatus")
    viewers = Authenticator(policy(loopback_roles=["viewer"]))
    assert viewers.control(creds(peer=LOCAL), Role.VIEWER, "GetStatus").startswith("local (loopback")
    with pytest.raises(PermissionDenied):
        viewers.control(creds(peer=LOCAL), Role.OPERATOR, "Promote")
    token = Authenticator(control_token="c" * 20)
    assert token.control(creds("c" * 20), Role.ADMIN, "Load") == f"admin (control-token, {REMOTE})"
    feedback = Authenticator(feedback_tokens=[("labeller", "l" * 20)])
    with pytest.raises(PermissionDenied):
        feedback.control(creds("l" * 20), Role.VIEWER, "GetStatus")


def test_auth_file_errors_name_the_problem(tmp_path: Path) -> None:
    cases = [
        ({"principal": {}}, "unknown key"),
        ({"principals": {"a b": {}}}, "principal name 'a b' is not valid"),
        ({"principals": {"a": {"roles": ["root"]}}}, "unknown role 'root'"),
        ({"principals": {"a": {"token": "x"}}}, "known keys are"),
        ({"principals": {"a": {"token_sha256": "abc"}}}, "64 hex digits"),
        ({"principals": {"a": {"token_sha256": "0" * 64}, "b": {"token_sha256": "0" * 64}}}, "appears twice"),
        ({"principals": {"a": {"mtls": "x"}, "b": {"mtls": ["x"]}}}, "already belongs to 'a'"),
        ({"principals": {"a": {"rate": {"requests_per_second": 0}}}}, "must be > 0"),
        ({"inference": {"open": "yes"}}, "true or false"),
    ]
    for doc, says in cases:
        with pytest.raises(ConfigError, match=says):
            AuthPolicy.parse(doc)
    f = tmp_path / "auth.yaml"
    f.write_text("principals: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        AuthPolicy.load(f)
    with pytest.raises(ConfigError, match="cannot read the auth file"):
        AuthPolicy.load(tmp_path / "missing.yaml")
    f.write_text(f"principals:\n  bob:\n    roles: [viewer]\n    token_sha256: {hash_token('b' * 20)}\n"
                 "inference:\n  open: false\n")
    loaded = AuthPolicy.load(f)
    assert loaded.inference_open is False and Authenticator(loaded).identify(creds("b" * 20)).name == "bob"


def test_inference_gate_closed_port() -> None:
    auth = Authenticator(policy(), inference_open=False)
    gate = InferenceGate.needed(auth)
    assert gate is not None
    with pytest.raises(Unauthenticated, match="inference port requires a credential"):
        gate.principal(creds(peer=LOCAL))
    p = gate.principal(creds(certs=("payments.internal",)))
    gate.check(p, creds(), "risk-eu")
    with pytest.raises(PermissionDenied, match="'payments' may not call model 'digits'"):
        gate.check(p, creds(), "digits")
    with pytest.raises(PermissionDenied):  # admin on the control service is not a model grant
        gate.check(gate.principal(creds(ADMIN_T)), creds(), "fraud")


def test_open_port_without_rates_checks_nothing_per_request() -> None:
    assert InferenceGate.needed(Authenticator()) is None
    assert InferenceGate.needed(Authenticator(AuthPolicy.parse({"inference": {"open": True}}))) is None
    rated = AuthPolicy.parse({"inference": {"rate": {"requests_per_second": 1}}})
    assert InferenceGate.needed(Authenticator(rated)) is not None


def test_rate_limits_per_principal_and_per_anonymous_host() -> None:
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    auth = Authenticator(policy(inference={"open": True, "rate": {"requests_per_second": 10, "burst": 3}}))
    gate = InferenceGate(auth, limiter)
    app = gate.principal(creds(APP_T))
    gate.check(app, creds(APP_T), "fraud")
    gate.check(app, creds(APP_T), "fraud")  # its own rate: 2/s, burst 2
    with pytest.raises(ResourceExhausted, match=r"rate limit of 'payments' exceeded \(2 requests/s, burst 2\); "
                                                r"retry in 0\.500 s"):
        gate.check(app, creds(APP_T), "fraud")
    for _ in range(3):  # anonymous callers share a bucket per host, at the default rate
        gate.check(None, creds(peer="ipv4:10.0.0.5:1000"), "digits")
    with pytest.raises(ResourceExhausted, match="anonymous@10.0.0.5"):
        gate.check(None, creds(peer="ipv4:10.0.0.5:2000"), "digits")
    gate.check(None, creds(peer="ipv4:10.0.0.6:1000"), "digits")  # another host has its own bucket
    now[0] += 0.5
    gate.check(app, creds(APP_T), "fraud")  # refilled


def test_rate_limiter_forgets_the_least_recent_buckets() -> None:
    limiter = RateLimiter(clock=lambda: 0.0, max_keys=2)
    for key in ("a", "b", "c"):
        assert limiter.take(key, (1.0, 1.0)) == 0.0
    assert limiter.take("a", (1.0, 1.0)) == 0.0  # "a" was dropped: a fresh, full bucket
    assert limiter.take("c", (1.0, 1.0)) == pytest.approx(1.0)


def test_registry_tokens_create_expire_revoke(tmp_path: Path) -> None:
    now = [datetime(2026, 12, 1, tzinfo=timezone.utc)]
    registry = Registry(f"sqlite:///{tmp_path}/r.db", clock=lambda: now[0])
    auth = Authenticator(policy(), registry=registry)
    token, short = new_token(), new_token()
    registry.create_token("deployer", hash_token(token), roles=["operator"], models=["digits"], actor="alice (token)")
    registry.create_token("temp", hash_token(short), roles=["viewer"], actor="alice (token)",
                          expires_at=now[0] + timedelta(hours=1))
    with pytest.raises(Unauthenticated):
        auth.identify(creds(token))  # not read yet
    auth.refresh()
    assert auth.identify(creds(token)).has(Role.OPERATOR) and auth.identify(creds(short)).name == "temp"
    with pytest.raises(AlreadyExists, match="an active token named 'deployer' exists"):
        registry.create_token("deployer", hash_token(new_token()), roles=["viewer"], actor="x")
    with pytest.raises(InvalidInput, match="would grant nothing"):
        registry.create_token("idle", hash_token(new_token()), roles=[], actor="x")
    now[0] += timedelta(hours=2)
    auth.refresh()
    with pytest.raises(Unauthenticated):
        auth.identify(creds(short))  # expired
    registry.revoke_token("deployer", actor="alice (token)", reason="leaked")
    auth.refresh()
    with pytest.raises(Unauthenticated):
        auth.identify(creds(token))
    with pytest.raises(NotFound, match="no active token named 'deployer'"):
        registry.revoke_token("deployer", actor="x")
    stored = registry.tokens(include_inactive=True)
    assert [(t.name, t.revoked_by) for t in stored] == [("deployer", "alice (token)"), ("temp", None)]
    assert all(token not in repr(t) and short not in repr(t) for t in stored)  # only hashes are kept
    audit = registry.audit_log(limit=10)
    assert [a.action for a in audit] == ["token.revoke", "token.create", "token.create"]
    assert audit[0].reason == "leaked" and audit[-1].after["roles"] == ["operator"]
    assert registry.verify_audit().ok
    registry.close()


def test_feedback_reporters_include_principals_with_the_feedback_role() -> None:
    from swapserve.server.feedback import FeedbackAuth

    auth = Authenticator(policy(), feedback_tokens=[("labeller", "l" * 20)])
    fb = FeedbackAuth([("labeller", "l" * 20)], authenticator=auth)
    assert fb.reporter([("authorization", "Bearer " + "l" * 20)], REMOTE) == "labeller"
    assert fb.reporter([("authorization", f"Bearer {OPS_T}")], REMOTE) == "ci"  # operator + feedback
    assert fb.reporter([("authorization", f"Bearer {ADMIN_T}")], REMOTE) == "alice"  # admin holds every role
    with pytest.raises(PermissionDenied, match="'payments' \\(mtls\\) may not report labels"):
        fb.reporter([], REMOTE, {"x509_common_name": [b"payments.internal"]})
    with pytest.raises(Unauthenticated, match="not one the server accepts"):
        fb.reporter([("authorization", "Bearer unknown-token-000000")], LOCAL)


def test_a_call_over_several_models_takes_one_request_of_its_rate() -> None:
    """ModelStatistics without a name covers every model: access is checked per model, the rate
    is charged once per call."""
    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {APP_T}"),)

        def peer(self) -> str:
            return REMOTE

        def auth_context(self) -> dict[str, list[bytes]]:
            return {}

    gate = InferenceGate(Authenticator(policy()), RateLimiter(clock=lambda: 0.0))  # payments: 2/s, burst 2
    assert gate.authorize(Context(), ["fraud", "risk-eu", "risk-us"]).name == "payments"
    gate.authorize(Context(), ["fraud"])
    with pytest.raises(ResourceExhausted):
        gate.authorize(Context(), ["fraud"])
    closed = InferenceGate(Authenticator(policy(), inference_open=False), RateLimiter(clock=lambda: 0.0))
    with pytest.raises(PermissionDenied, match="may not call model 'digits'"):
        closed.authorize(Context(), ["fraud", "digits"])
