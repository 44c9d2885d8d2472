"""Transport security through the real server: TLS and mTLS on the inference port (both front ends),
the control service and the metrics port; SIGHUP reload; plaintext beyond loopback refused.

Certificates come from trustme (a throwaway CA per module). One server per front end runs every
check, the reload last (it rotates the server's certificate to one from a second CA).
"""
from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.serverproc import SWAPSERVE, ServerProcess, copy_models, wait_until

trustme = pytest.importorskip("trustme")


class Certs:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.ca, self.other_ca = trustme.CA(), trustme.CA()
        self.ca_pem = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca_pem = self._write("other-ca.pem", self.other_ca.cert_pem.bytes())
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert = self._write("server.crt", b"".join(b.bytes() for b in server.cert_chain_pems))
        self.server_key = self._write("server.key", server.private_key_pem.bytes())
        client = self.ca.issue_cert("client@example.com")
        self.client_cert = self._write("client.crt", b"".join(b.bytes() for b in client.cert_chain_pems))
        self.client_key = self._write("client.key", client.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        (self.dir / name).write_bytes(data)
        return str(self.dir / name)

    def rotate(self) -> None:
        """The server's certificate and key from the other CA, written over the files it was started with."""
        new = self.other_ca.issue_cert("127.0.0.1", "localhost")
        Path(self.server_key).write_bytes(new.private_key_pem.bytes())
        Path(self.server_cert).write_bytes(b"".join(b.bytes() for b in new.cert_chain_pems))


@pytest.fixture(scope="module", params=["native", "python"])
def server_certs(request: pytest.FixtureRequest, example_repo: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Certs]]:
    """A server per front end, with certificates of its own (the reload test rotates them)."""
    scratch = tmp_path_factory.mktemp(f"tls-{request.param}")
    certs = Certs(scratch)
    repo = copy_models(example_repo, scratch / "repo", ["simple"])
    with ServerProcess(repo, "--frontend", request.param, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key, "--tls-ca", certs.ca_pem) as srv:
        yield srv, certs


@pytest.fixture()
def server(server_certs: tuple[ServerProcess, Certs]) -> ServerProcess:
    return server_certs[0]


@pytest.fixture()
def certs(server_certs: tuple[ServerProcess, Certs]) -> Certs:
    return server_certs[1]


def triton(srv: ServerProcess, certs: Certs, *, ca: str | None = None,
           client_cert: bool = True) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        srv.url, ssl=True, root_certificates=ca or certs.ca_pem,
        private_key=certs.client_key if client_cert else None,
        certificate_chain=certs.client_cert if client_cert else None)


def infer(client: grpcclient.InferenceServerClient) -> np.ndarray:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(a)
    return client.infer("simple", inputs, client_timeout=10).as_numpy("OUTPUT0")


def cli(srv: ServerProcess, certs: Certs, *tls: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SWAPSERVE, "models", "--json", "--url", srv.control_url, *tls],
                          capture_output=True, text=True, timeout=30)


def metrics(srv: ServerProcess, ca: str, cert: tuple[str, str] | None) -> str:
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(*cert)
    with urllib.request.urlopen(f"https://127.0.0.1:{srv.metrics_port}/metrics", context=ctx, timeout=10) as r:
        return r.read().decode()


def peer_issuer(port: int, ca: str) -> bool:
    """Whether a new TLS connection to ``port`` verifies against ``ca`` (mTLS: no client cert, so the
    handshake ends after the server's certificate was checked; only that check is asked about)."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
            return True
    except ssl.SSLCertVerificationError:
        return False
    except (ssl.SSLError, OSError):
        return True  # verified the server, then refused for want of a client certificate


def test_mtls_inference_with_tritonclient(server: ServerProcess, certs: Certs) -> None:
    with triton(server, certs) as c:
        assert c.is_server_ready()
        assert (infer(c) == 2 * np.arange(16)).all()
    with triton(server, certs, client_cert=False) as c, pytest.raises(InferenceServerException):
        c.is_server_live(client_timeout=5)
    with triton(server, certs, ca=certs.other_ca_pem) as c, pytest.raises(InferenceServerException):
        c.is_server_live(client_timeout=5)  # the server's certificate is not from this CA
    with grpcclient.InferenceServerClient(server.url) as c, pytest.raises(InferenceServerException):
        c.is_server_live(client_timeout=5)  # plaintext to a TLS port


def test_control_cli_over_mtls(server: ServerProcess, certs: Certs) -> None:
    ok = cli(server, certs, "--tls-ca", certs.ca_pem, "--tls-cert", certs.client_cert, "--tls-key", certs.client_key)
    assert ok.returncode == 0, ok.stderr
    assert [m["name"] for m in json.loads(ok.stdout)] == ["simple"]
    assert cli(server, certs, "--tls-ca", certs.ca_pem).returncode != 0  # no client certificate
    assert cli(server, certs).returncode != 0  # plaintext


def test_metrics_over_https(server: ServerProcess, certs: Certs) -> None:
    assert "swapserve" in metrics(server, certs.ca_pem, (certs.client_cert, certs.client_key))
    with pytest.raises(OSError):  # urllib's URLError and ssl's errors are OSErrors
        metrics(server, certs.ca_pem, None)


def test_sighup_reload_keeps_connections(server: ServerProcess, certs: Certs) -> None:
    """Rotate the files, SIGHUP: new handshakes get the new certificate, an open connection keeps working."""
    old = triton(server, certs)
    infer(old)
    certs.rotate()
    server.signal(signal.SIGHUP)
    # Every port: the native front end looks at its copies once a second, the others at once.
    for port in (server.grpc_port, server.metrics_port, int(server.control_url.rpartition(":")[2])):
        assert wait_until(lambda p=port: peer_issuer(p, certs.other_ca_pem), timeout=10)
        assert not peer_issuer(port, certs.ca_pem)
    with triton(server, certs, ca=certs.other_ca_pem) as new:
        assert (infer(new) == 2 * np.arange(16)).all()
    assert (infer(old) == 2 * np.arange(16)).all()  # made before the reload, on its old connection
    old.close()
    assert "TLS: reloaded" in server.log()


def test_plaintext_beyond_loopback_refused_unless_insecure(example_repo: Path,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    repo = copy_models(example_repo, tmp_path_factory.mktemp("insecure") / "repo", ["simple"])
    refused = ServerProcess(repo, "--host", "0.0.0.0", timeout=60)
    with pytest.raises(RuntimeError) as exc:
        refused.start()
    assert refused.proc is not None and refused.wait(10) == 2
    message = str(exc.value)
    assert "refusing to serve plaintext beyond loopback" in message
    assert "--tls-cert" in message and "--insecure" in message
    with ServerProcess(repo, "--host", "0.0.0.0", "--insecure") as srv:
        assert "INSECURE: serving PLAINTEXT beyond loopback" in srv.log()
        with grpcclient.InferenceServerClient(srv.url) as c:
            assert c.is_server_live()
