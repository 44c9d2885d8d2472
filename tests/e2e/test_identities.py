"""Identities and roles through the real server and the real CLI (issue #16).

One server per front end, with mTLS and an auth file that closes the inference port: an admin
token (``alice``), a client certificate mapped to ``payments`` (may call ``simple``, 5 requests/s)
and an unmapped certificate (``stranger``) that only gets a connection. Tokens made with
``swapserve token create`` (through the control service, and straight into the registry) grant
roles and models; the audit log names the principal; a revoked token stops working.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.serverproc import SWAPSERVE, ServerProcess, copy_models, wait_until

trustme = pytest.importorskip("trustme")


class Pki:
    def __init__(self, d: Path) -> None:
        ca = trustme.CA()
        self.ca = self._write(d, "ca.pem", ca.cert_pem.bytes())
        server = ca.issue_cert("127.0.0.1", "localhost")
        self.server = (self._write(d, "server.crt", b"".join(b.bytes() for b in server.cert_chain_pems)),
                       self._write(d, "server.key", server.private_key_pem.bytes()))
        self.clients: dict[str, tuple[str, str]] = {}
        for who in ("payments.internal", "stranger.internal"):
            c = ca.issue_cert(who)
            self.clients[who] = (self._write(d, f"{who}.crt", b"".join(b.bytes() for b in c.cert_chain_pems)),
                                 self._write(d, f"{who}.key", c.private_key_pem.bytes()))

    @staticmethod
    def _write(d: Path, name: str, data: bytes) -> str:
        (d / name).write_bytes(data)
        return str(d / name)


class Setup:
    def __init__(self, srv: ServerProcess, pki: Pki, admin: str, registry: str, tmp: Path) -> None:
        self.srv, self.pki, self.admin, self.registry, self.tmp = srv, pki, admin, registry, tmp

    def triton(self, who: str = "stranger.internal") -> grpcclient.InferenceServerClient:
        cert, key = self.pki.clients[who]
        return grpcclient.InferenceServerClient(self.srv.url, ssl=True, root_certificates=self.pki.ca,
                                                private_key=key, certificate_chain=cert)

    def cli(self, *argv: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        cert, key = self.pki.clients["stranger.internal"]
        tls = ["--tls-ca", self.pki.ca, "--tls-cert", cert, "--tls-key", key]
        auth: list[str] = []
        if token is not None:
            path = self.tmp / f"token-{hashlib.sha256(token.encode()).hexdigest()[:8]}"
            path.write_text(token + "\n")
            auth = ["--token-file", str(path)]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.tmp)}
        return subprocess.run([*SWAPSERVE, *argv, "--url", self.srv.control_url, *tls, *auth],
                              capture_output=True, text=True, timeout=60, env=env)

    def create(self, name: str, *flags: str) -> str:
        proc = self.cli("token", "create", name, *flags, token=self.admin)
        assert proc.returncode == 0, proc.stderr + self.srv.log()[-2000:]
        return proc.stdout.strip()


@pytest.fixture(scope="module", params=["native", "python"])
def setup(request: pytest.FixtureRequest, example_repo: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp(f"identities-{request.param}")
    pki = Pki(tmp)
    admin = "ssw_" + secrets.token_urlsafe(32)
    auth = tmp / "auth.yaml"
    auth.write_text(f"""
principals:
  alice:
    roles: [admin]
    token_sha256: {hashlib.sha256(admin.encode()).hexdigest()}
  payments:
    models: [simple]
    mtls: [payments.internal]
    rate: {{requests_per_second: 5, burst: 5}}
inference:
  open: false
""")
    repo = copy_models(example_repo, tmp / "repo", ["simple", "digits"])
    registry = f"sqlite:///{tmp}/registry.db"
    with ServerProcess(repo, "--frontend", request.param, "--tls-cert", pki.server[0], "--tls-key", pki.server[1],
                       "--tls-ca", pki.ca, "--auth-file", str(auth), "--registry", registry) as srv:
        yield Setup(srv, pki, admin, registry, tmp)


def simple_inputs() -> list[grpcclient.InferInput]:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    for i in inputs:
        i.set_data_from_numpy(a)
    return inputs


def digits_inputs() -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("pixels", [1, 64], "FP32")
    x.set_data_from_numpy(np.zeros((1, 64), np.float32))
    return [x]


def refused(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as exc:
        fn(*args, **kwargs)
    return f"{exc.value.status()} {exc.value.message()}"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_inference_needs_a_principal_allowed_the_model(setup: Setup) -> None:
    with setup.triton("stranger.internal") as c:
        assert c.is_server_ready()  # health stays open for probes
        said = refused(c.infer, "simple", simple_inputs())
        assert "UNAUTHENTICATED" in said and "requires a credential" in said
        said = refused(c.infer, "simple", simple_inputs(), headers=bearer("ssw_not-a-real-token-000000000"))
        assert "UNAUTHENTICATED" in said and "not one the server accepts" in said
        said = refused(c.get_model_metadata, "simple")
        assert "UNAUTHENTICATED" in said
    with setup.triton("payments.internal") as c:  # the certificate is the identity
        out = c.infer("simple", simple_inputs()).as_numpy("OUTPUT0")
        assert (out == 2 * np.arange(16)).all()
        said = refused(c.infer, "digits", digits_inputs())
        assert "PERMISSION_DENIED" in said and "'payments' may not call model 'digits'" in said
    app = setup.create("scorer", "--models", "digits")
    with setup.triton("stranger.internal") as c:  # a token on an unmapped certificate's connection
        assert c.infer("digits", digits_inputs(), headers=bearer(app)).as_numpy("probabilities").shape == (1, 10)
        said = refused(c.infer, "simple", simple_inputs(), headers=bearer(app))
        assert "PERMISSION_DENIED" in said and "'scorer'" in said


def test_rate_limit_answers_resource_exhausted_with_the_wait(setup: Setup) -> None:
    with setup.triton("payments.internal") as c:
        time.sleep(1.2)  # a full bucket (5/s, burst 5), whatever the previous test took from it
        outcomes = []
        for _ in range(15):
            try:
                c.infer("simple", simple_inputs())
                outcomes.append("ok")
            except InferenceServerException as e:
                outcomes.append(f"{e.status()} {e.message()}")
    assert outcomes[0] == "ok" and outcomes.count("ok") >= 5
    limited = [o for o in outcomes if o != "ok"]
    assert limited, "15 back-to-back requests at 5/s, burst 5, were never limited"
    assert all("RESOURCE_EXHAUSTED" in o and "rate limit of 'payments' exceeded" in o and "retry in" in o
               for o in limited)


def test_roles_tokens_and_the_audit_log(setup: Setup) -> None:
    none = setup.cli("models", "--json")
    assert none.returncode == 1 and "UNAUTHENTICATED" in none.stderr  # the auth file closes loopback too
    viewer = setup.create("dashboard", "--role", "viewer")
    ci = setup.create("ci", "--role", "operator", "--expires-in", "1d")
    assert ci.startswith("ssw_") and ci != viewer

    assert json.loads(setup.cli("models", "--json", token=viewer).stdout)[0]["name"] in ("digits", "simple")
    denied = setup.cli("promote", "simple", "1", "--json", token=viewer)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr and "'operator' role" in denied.stderr
    ok = setup.cli("promote", "simple", "1", "--reason", "ci deploy", "--json", token=ci)
    assert ok.returncode == 0, ok.stderr
    denied = setup.cli("unload", "digits", "1", "--json", token=ci)
    assert denied.returncode == 1 and "'admin' role" in denied.stderr

    audit = json.loads(setup.cli("audit", "--json", "--limit", "20", token=viewer).stdout)
    promote = next(a for a in audit if a["reason"] == "ci deploy")
    assert promote["actor"].startswith("ci (token, ipv4:127.0.0.1:"), promote["actor"]
    created = [a for a in audit if a["action"] == "token.create"]
    assert {a["after"]["name"] for a in created} >= {"dashboard", "ci"}
    assert all(a["actor"].startswith("alice (token, ") for a in created)

    listed = setup.cli("token", "list", "--json", token=setup.admin)
    assert listed.returncode == 0 and ci not in listed.stdout  # only names, roles and a hash prefix
    assert {"dashboard", "ci"} <= {t["name"] for t in json.loads(listed.stdout)}
    assert setup.cli("token", "list", "--json", token=ci).returncode == 1  # tokens are an admin's

    assert setup.cli("token", "revoke", "ci", "--reason", "rotated", token=setup.admin).returncode == 0
    gone = setup.cli("models", "--json", token=ci)
    assert gone.returncode == 1 and "UNAUTHENTICATED" in gone.stderr  # at once on the server that revoked it


def test_a_token_written_to_the_registry_directly_is_picked_up(setup: Setup) -> None:
    """`swapserve token create --registry URL` (no server: the first admin of a fleet); every server
    reading that registry accepts the token within its refresh interval, and forgets it once revoked."""
    made = subprocess.run([*SWAPSERVE, "token", "create", "bootstrap", "--role", "admin", "--registry",
                           setup.registry], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert "shown once" in made.stderr
    assert wait_until(lambda: setup.cli("models", "--json", token=token).returncode == 0, timeout=15)
    revoked = subprocess.run([*SWAPSERVE, "token", "revoke", "bootstrap", "--registry", setup.registry],
                             capture_output=True, text=True, timeout=60)
    assert revoked.returncode == 0, revoked.stderr
    assert wait_until(lambda: setup.cli("models", "--json", token=token).returncode == 1, timeout=15)
