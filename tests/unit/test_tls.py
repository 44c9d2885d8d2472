"""swapserve.tls on its own: which file sets are refused and why, reload keeps the old set on a bad
one, the native front end's staged copies follow reloads only, the client flags (trustme certificates)."""
from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from swapserve.errors import ConfigError
from swapserve.tls import ClientTls, ServerTls, server_tls

trustme = pytest.importorskip("trustme")


def issue(d: Path, ca: trustme.CA, name: str, host: str = "127.0.0.1") -> tuple[Path, Path]:
    cert = ca.issue_cert(host)
    c, k = d / f"{name}.crt", d / f"{name}.key"
    c.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    k.write_bytes(cert.private_key_pem.bytes())
    return c, k


@pytest.fixture()
def files(tmp_path: Path) -> tuple[trustme.CA, Path, Path, Path]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    cert, key = issue(tmp_path, ca, "server")
    return ca, cert, key, ca_file


def test_partial_settings_name_the_missing_flag(tmp_path: Path) -> None:
    assert server_tls(None, None, None) is None
    with pytest.raises(ConfigError, match="--tls-ca needs --tls-cert and --tls-key"):
        server_tls(None, None, tmp_path / "ca.pem")
    with pytest.raises(ConfigError, match="needs both --tls-cert FILE and --tls-key FILE"):
        server_tls(tmp_path / "c", None, None)


def test_unreadable_non_pem_and_mismatched_files_are_refused(tmp_path: Path, files) -> None:  # type: ignore[no-untyped-def]
    ca, cert, key, ca_file = files
    with pytest.raises(ConfigError, match=r"cannot read the TLS certificate .*missing\.crt \(--tls-cert\)"):
        ServerTls(tmp_path / "missing.crt", key)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"is not PEM \(no '-----BEGIN' line\)"):
        ServerTls(cert, junk)
    _, other_key = issue(tmp_path, ca, "other")
    with pytest.raises(ConfigError, match="cannot be used together"):
        ServerTls(cert, other_key)
    assert ServerTls(cert, key, ca_file).mutual and not ServerTls(cert, key).mutual


def test_a_bad_reload_keeps_the_previous_set(tmp_path: Path, files) -> None:  # type: ignore[no-untyped-def]
    ca, cert, key, _ = files
    tls = ServerTls(cert, key)
    good_cert, good_key = cert.read_bytes(), key.read_bytes()
    key.write_text("garbage")
    with pytest.raises(ConfigError):
        tls.reload()
    assert tls.generation == 0
    key.write_bytes(good_key)
    new_cert, new_key = issue(tmp_path, ca, "rotated")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    tls.reload()
    assert tls.generation == 1 and cert.read_bytes() != good_cert


def test_staged_copies_change_only_on_reload(tmp_path: Path, files) -> None:  # type: ignore[no-untyped-def]
    ca, cert, key, ca_file = files
    tls = ServerTls(cert, key, ca_file)
    k, c, a = map(Path, tls.staged())
    assert c.read_bytes() == cert.read_bytes() and a.read_bytes() == ca_file.read_bytes()
    assert (c.parent.stat().st_mode & 0o077) == 0  # a private directory
    before = c.read_bytes()
    new_cert, new_key = issue(tmp_path, ca, "rotated")
    cert.write_bytes(new_cert.read_bytes())
    key.write_bytes(new_key.read_bytes())
    assert c.read_bytes() == before  # editing the operator's files alone changes nothing
    tls.reload()
    assert c.read_bytes() == new_cert.read_bytes() and k.read_bytes() == new_key.read_bytes()
    tls.close()
    assert not c.parent.exists()


def test_metrics_wrap_uses_the_current_context_and_requires_client_certs(tmp_path: Path, files) -> None:  # type: ignore[no-untyped-def]
    """Over a socketpair (no network): a client with a certificate the CA issued gets through, one
    without is refused."""
    ca, cert, key, ca_file = files
    tls = ServerTls(cert, key, ca_file)
    client_cert, client_key = issue(tmp_path, ca, "client", host="client.example")

    def handshake(with_cert: bool) -> str:
        server_end, client_end = socket.socketpair()
        outcome: list[str] = []

        def serve() -> None:
            wrapped = tls.wrap(server_end)
            try:
                wrapped.do_handshake()
                wrapped.recv(1)  # TLS 1.3 checks the client's certificate after the client's Finished
                outcome.append(dict(wrapped.getpeercert()["subjectAltName"]).get("DNS", "?"))
            except (ssl.SSLError, OSError):
                outcome.append("refused")
            finally:
                wrapped.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        ctx = ssl.create_default_context(cafile=str(ca_file))
        if with_cert:
            ctx.load_cert_chain(str(client_cert), str(client_key))
        try:
            with ctx.wrap_socket(client_end, server_hostname="127.0.0.1") as s:
                s.sendall(b"x")
        except (ssl.SSLError, OSError):
            pass
        t.join(10)
        return outcome[0] if outcome else "hung"

    assert handshake(True) == "client.example"
    assert handshake(False) == "refused"


def test_client_flags_and_environment(monkeypatch: pytest.MonkeyPatch, files) -> None:  # type: ignore[no-untyped-def]
    _, cert, key, ca_file = files
    for var in ("SWAPSERVE_TLS_CA", "SWAPSERVE_TLS_CERT", "SWAPSERVE_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert ClientTls.from_args(None, None, None) is None
    with pytest.raises(ConfigError, match="needs both --tls-cert and --tls-key"):
        ClientTls.from_args(None, str(cert), None)
    monkeypatch.setenv("SWAPSERVE_TLS_CA", str(ca_file))
    tls = ClientTls.from_args(None, None, None)
    assert tls is not None and tls.ca == ca_file and tls.pem()[0] == ca_file.read_bytes()
    both = ClientTls.from_args(str(ca_file), str(cert), str(key))
    assert both is not None and both.pem() == (ca_file.read_bytes(), key.read_bytes(), cert.read_bytes())
