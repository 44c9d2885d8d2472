"""``swapserve bench`` and the rollout simulator against a server that takes credentials seriously.

One real ``swapserve serve`` with mTLS (trustme certificates) and an auth file that closes the
inference port and loopback's control access: a request needs a client certificate the CA
issued *and* a token whose principal may call the model, and a swap needs the control token.
The client certificate here maps to no principal, so the tokens are what authorise.

Like test_bench.py this process imports swapserve._proto, never tritonclient (its worker runs in
a subprocess); the CLI runs as a subprocess with a clean environment, so only the flags and
variables each test sets reach it.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from swapserve.bench.runner import BenchConfig, BenchError, run_bench
from swapserve.bench.simulator import Simulator, build_oracle_model
from swapserve.bench.workload import WorkloadError
from swapserve.tls import ClientTls
from tests.e2e.serverproc import ServerProcess, copy_models

trustme = pytest.importorskip("trustme")


@dataclass
class Secured:
    srv: ServerProcess
    ca: str
    cert: str                # a client certificate the CA issued, mapped to no principal
    key: str
    token: str               # principal "loadtest": may call digits and oracle, may report feedback
    token_file: str
    control_token: str       # principal "ops": admin
    control_token_file: str

    def tls_flags(self) -> list[str]:
        return ["--tls-ca", self.ca, "--tls-cert", self.cert, "--tls-key", self.key]

    def client_tls(self) -> ClientTls:
        return ClientTls(Path(self.ca), Path(self.cert), Path(self.key))


def _write(d: Path, name: str, data: bytes) -> str:
    path = d / name
    path.write_bytes(data)
    path.chmod(0o600)
    return str(path)


def _chain(issued: Any) -> bytes:  # a trustme.LeafCert
    return b"".join(b.bytes() for b in issued.cert_chain_pems)


@pytest.fixture(scope="module")
def secured(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    d = tmp_path_factory.mktemp("bench-tls")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("bench-client.internal")
    token, control_token = "ssw_" + secrets.token_urlsafe(32), "ssw_" + secrets.token_urlsafe(32)
    auth = d / "auth.yaml"
    auth.write_text(f"""
principals:
  ops:
    roles: [admin]
    token_sha256: {hashlib.sha256(control_token.encode()).hexdigest()}
  loadtest:
    roles: [feedback]
    models: [digits, oracle]
    token_sha256: {hashlib.sha256(token.encode()).hexdigest()}
inference:
  open: false
""")
    repo = copy_models(example_repo, d / "repo", ["digits"])
    build_oracle_model(repo, "oracle", {1: [0.1] * 5})
    ca_pem = _write(d, "ca.pem", ca.cert_pem.bytes())
    srv = ServerProcess(repo, "--tls-cert", _write(d, "server.crt", _chain(server)),
                        "--tls-key", _write(d, "server.key", server.private_key_pem.bytes()), "--tls-ca", ca_pem,
                        "--auth-file", str(auth))
    s = Secured(srv=srv, ca=ca_pem, cert=_write(d, "client.crt", _chain(client)),
                key=_write(d, "client.key", client.private_key_pem.bytes()), token=token,
                token_file=_write(d, "token", token.encode() + b"\n"), control_token=control_token,
                control_token_file=_write(d, "control-token", control_token.encode() + b"\n"))
    with s.srv:
        yield s


def bench_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``swapserve bench ARGV`` with no SWAPSERVE_* variable but those in ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SWAPSERVE_")}
    return subprocess.run([sys.executable, "-m", "swapserve.cli", "bench", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**clean, **(env or {})})


def test_cli_over_mtls_with_tokens_and_swaps(secured: Secured, tmp_path: Path) -> None:
    """The flags: mTLS to both ports, the inference token on every request, the control token on the swaps."""
    out = tmp_path / "bench.json"
    proc = bench_cli("--url", secured.srv.url, "--model", "digits", "--concurrency", "2", "--duration", "1.5",
                     "--warmup", "0.3", *secured.tls_flags(), "--token-file", secured.token_file,
                     "--swap-every", "0.5", "--versions", "1,2", "--control-url", secured.srv.control_url,
                     "--control-token-file", secured.control_token_file, "--json", str(out))
    assert proc.returncode == 0, proc.stderr + secured.srv.log()[-2000:]
    assert "using --client raw" in proc.stderr and "mTLS" in proc.stderr  # auto cannot pick native here
    s = json.loads(out.read_text())
    assert s["completed"] > 0 and s["errors"] == 0, s["errors_by_status"]
    assert s["completed"] == s["sent"] == sum(s["versions"].values())
    assert s["swaps"] and all(e["ok"] for e in s["swaps"]), s["swaps"]
    assert set(s["versions"]) == {"1", "2"}
    cfg = s["config"]
    assert cfg["client"] == "raw"
    assert cfg["tls"] == {"ca": secured.ca, "cert": secured.cert, "key": secured.key}
    assert cfg["token"] is True and cfg["control_token"] is True
    for secret in (secured.token, secured.control_token):  # the summary says a token was sent, never which
        assert secret not in out.read_text() and secret not in proc.stdout + proc.stderr
    assert "mTLS + token" in proc.stdout  # the table's title


def test_tritonclient_worker_from_the_environment(secured: Secured, tmp_path: Path) -> None:
    """SWAPSERVE_TLS_CA/_CERT/_KEY and SWAPSERVE_INFERENCE_TOKEN instead of flags, through tritonclient's aio client."""
    out = tmp_path / "bench.json"
    env = {"SWAPSERVE_TLS_CA": secured.ca, "SWAPSERVE_TLS_CERT": secured.cert, "SWAPSERVE_TLS_KEY": secured.key,
           "SWAPSERVE_INFERENCE_TOKEN": secured.token}
    proc = bench_cli("--url", secured.srv.url, "--model", "digits", "--concurrency", "2", "--duration", "1",
                     "--warmup", "0.2", "--client", "tritonclient", "--json", str(out), "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(out.read_text())
    assert s["config"]["client"] == "tritonclient" and s["config"]["token"] is True
    assert s["completed"] > 0 and s["errors"] == 0, s["errors_by_status"]


def test_each_credential_is_needed(secured: Secured) -> None:
    """The checks above can fail: without the token, or without the client certificate, the run stops
    at the metadata call, naming the status; a swap without the control token fails."""
    with pytest.raises(WorkloadError, match="UNAUTHENTICATED"):
        run_bench(BenchConfig(url=secured.srv.url, model="digits", duration=0.5, warmup=0.0,
                              tls=secured.client_tls()))
    with pytest.raises(WorkloadError, match="cannot read metadata of model 'digits'"):
        run_bench(BenchConfig(url=secured.srv.url, model="digits", duration=0.5, warmup=0.0,
                              tls=ClientTls(Path(secured.ca)), token=secured.token))
    proc = bench_cli("--url", secured.srv.url, "--model", "digits", "--duration", "0.5", "--warmup", "0",
                     *secured.tls_flags(), "--token-file", secured.token_file, "--swap-every", "0.2",
                     "--versions", "1,2", "--control-url", secured.srv.control_url, "--quiet")
    assert proc.returncode == 2 and "UNAUTHENTICATED" in proc.stderr, proc.stderr  # the swap before the clock


def test_simulator_over_mtls(secured: Secured) -> None:
    sim = Simulator(secured.srv.url, "oracle", rate=40, seed=7, tls=secured.client_tls(),
                    inference_token=secured.token, token=secured.token).start()
    try:
        time.sleep(1.5)
    finally:
        stats = sim.stop()
    assert stats.ok > 0 and not stats.errors, stats
    assert stats.labels_sent > 0


def test_native_client_refuses_tls_and_tokens(tmp_path: Path) -> None:
    """A usage error before anything starts, naming why; no server needed (nothing is contacted)."""
    token = tmp_path / "token"
    token.write_text("ssw_x\n")
    for flags, why in ((["--tls-ca", "ca.pem"], "TLS (--tls-ca)"),
                       (["--tls-cert", "c.crt", "--tls-key", "c.key"], "mTLS (--tls-cert/--tls-key)"),
                       (["--token-file", str(token)], "an inference token (--token-file)")):
        proc = bench_cli("--url", "127.0.0.1:1", "--model", "digits", "--client", "native", *flags, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("swapserve bench: error: --client native speaks plaintext"), proc.stderr
        assert why in proc.stderr and "use --client raw or --client tritonclient" in proc.stderr
    with pytest.raises(BenchError, match=r"--client native .* needs TLS \(--tls-ca\)"):
        run_bench(BenchConfig(url="127.0.0.1:1", model="digits", client="native", tls=ClientTls(Path("ca.pem"))))
    missing = bench_cli("--url", "127.0.0.1:1", "--model", "digits", "--token-file", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "cannot read --token-file" in missing.stderr
