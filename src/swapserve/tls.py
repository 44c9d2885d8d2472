"""Transport security: the server's certificate, key and client CA, read from files and reloaded on SIGHUP.

One ``ServerTls`` serves every port of a server (inference on either front end, control,
metrics): the same certificate and key, and with a CA (``--tls-ca``) every port requires a
client certificate that CA issued (mTLS). Guarantees:

- ``reload()`` reads all three files and checks that the key matches the certificate before
  anything changes; a bad set is refused (``ConfigError``) and the previous one stays in use.
- After a successful reload, *new* handshakes use the new set; connections already open keep
  theirs (nothing is closed):
  - grpc.aio ports (``--frontend python`` inference, control): ``grpc.dynamic_ssl_server_credentials``
    asks ``_fetch`` at each new handshake, which hands over the new set once;
  - the native front end (grpc++ 1.51): a ``FileWatcherCertificateProvider`` watches private copies
    of the files (``staged``), rewritten only here, so the native port changes with SIGHUP like
    the others, within its 1 s refresh (editing the operator's files alone changes nothing);
  - metrics (HTTPS): each accepted connection is wrapped with the current ``ssl.SSLContext``.

Clients: ``channel_credentials`` for grpc channels (the CLI, ``swapserve bench``).
"""
from __future__ import annotations

import logging
import os
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swapserve.errors import ConfigError

log = logging.getLogger(__name__)

#: How often the native front end's FileWatcherCertificateProvider looks at the staged copies (s).
NATIVE_REFRESH_S = 1


@dataclass(frozen=True)
class _Material:
    cert: bytes
    key: bytes
    ca: bytes | None


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the TLS {what} {path} ({flag}): {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"the TLS {what} {path} ({flag}) is not PEM (no '-----BEGIN' line)")
    return data


def _ssl_context(cert: Path, key: Path, ca: Path | None, *, server: bool) -> ssl.SSLContext:
    """An SSLContext from the files; ConfigError naming the file when one is wrong (or the key does not match)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"the TLS certificate {cert} and key {key} (--tls-cert, --tls-key) cannot be used "
                          f"together: {e}") from None
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"the TLS CA {ca} (--tls-ca) cannot be read as certificates: {e}") from None
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ServerTls:
    """The server's TLS files, their current contents, and the credentials each transport needs.

    Thread-safe: ``reload`` (the event loop, on SIGHUP) may run while gRPC's handshake threads
    call ``_fetch`` and the metrics thread calls ``wrap``.
    """

    def __init__(self, cert: Path, key: Path, ca: Path | None = None) -> None:
        self.cert, self.key, self.ca = Path(cert), Path(key), (Path(ca) if ca else None)
        self._lock = threading.Lock()
        self._generation = 0
        self._staged: Path | None = None
        self._material, self._context = self._load()

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate the CA issued."""
        return self.ca is not None

    @property
    def generation(self) -> int:
        """How many successful reloads so far (0: the set read at start)."""
        return self._generation

    def _load(self) -> tuple[_Material, ssl.SSLContext]:
        material = _Material(_read(self.cert, "certificate", "--tls-cert"), _read(self.key, "key", "--tls-key"),
                             _read(self.ca, "CA", "--tls-ca") if self.ca else None)
        return material, _ssl_context(self.cert, self.key, self.ca, server=True)

    def reload(self) -> None:
        """Read the files again; new handshakes on every port use them. ConfigError leaves the old set."""
        material, context = self._load()
        with self._lock:
            self._material, self._context = material, context
            self._generation += 1
            if self._staged is not None:
                self._stage(self._staged)
        log.info("TLS: reloaded %s, %s%s (generation %d); open connections keep their certificate",
                 self.cert, self.key, f", CA {self.ca}" if self.ca else "", self._generation)

    # -- grpc.aio --------------------------------------------------------------------------------

    def _configuration(self, m: _Material) -> Any:
        import grpc

        return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.ca)

    def grpc_credentials(self) -> Any:
        """Server credentials for a grpc.aio port; each new handshake picks up the latest reload."""
        import grpc

        seen = [self._generation]

        def fetch() -> Any:  # gRPC's handshake thread: None keeps the configuration it has
            with self._lock:
                if seen[0] == self._generation:
                    return None
                seen[0] = self._generation
                return self._configuration(self._material)

        with self._lock:
            initial = self._configuration(self._material)
        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=self.mutual)

    # -- native front end ------------------------------------------------------------------------

    def staged(self) -> tuple[str, str, str]:
        """(key, cert, ca) paths of private copies the native front end watches ("" for no CA).

        The copies change only in ``reload`` (each file replaced atomically), so the native port
        follows SIGHUP like the others. Removed by ``close``.
        """
        with self._lock:
            if self._staged is None:
                self._staged = Path(tempfile.mkdtemp(prefix="swapserve-tls-"))  # mode 0700
                self._stage(self._staged)
            d = self._staged
        return str(d / "tls.key"), str(d / "tls.crt"), str(d / "ca.crt") if self.ca else ""

    def _stage(self, d: Path) -> None:
        # The key first: a refresh that reads between the two finds a pair that does not match,
        # which grpc++ refuses (it keeps the old pair), and takes the new one on its next look.
        for name, data in (("tls.key", self._material.key), ("tls.crt", self._material.cert),
                           ("ca.crt", self._material.ca)):
            if data is None:
                continue
            fd, tmp = tempfile.mkstemp(dir=d)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, d / name)

    def close(self) -> None:
        with self._lock:
            if self._staged is not None:
                shutil.rmtree(self._staged, ignore_errors=True)
                self._staged = None

    # -- metrics (HTTPS) -------------------------------------------------------------------------

    def wrap(self, sock: Any) -> ssl.SSLSocket:
        """An accepted connection, wrapped with the current context (the handshake runs on first read)."""
        with self._lock:
            context = self._context
        return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def server_tls(cert: Path | None, key: Path | None, ca: Path | None) -> ServerTls | None:
    """The settings' TLS, or None without it; ConfigError when only part of it is given."""
    if cert is None and key is None:
        if ca is not None:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key (the server's own certificate and key)")
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both --tls-cert FILE and --tls-key FILE (SWAPSERVE_TLS_CERT, SWAPSERVE_TLS_KEY)")
    return ServerTls(cert, key, ca)


# -- clients -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """What a client trusts (``ca``; None: the system's roots) and, for mTLS, its own certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def from_args(cls, ca: str | None, cert: str | None, key: str | None) -> ClientTls | None:
        """Flags first, then SWAPSERVE_TLS_CA / _CERT / _KEY; None when none of them is set (plaintext)."""
        ca = ca or os.environ.get("SWAPSERVE_TLS_CA") or None
        cert = cert or os.environ.get("SWAPSERVE_TLS_CERT") or None
        key = key or os.environ.get("SWAPSERVE_TLS_KEY") or None
        if not (ca or cert or key):
            return None
        if bool(cert) != bool(key):
            raise ConfigError("a client certificate needs both --tls-cert and --tls-key")
        return cls(Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None)

    def pem(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(root certificates, private key, certificate chain) as tritonclient and grpc take them."""
        return (_read(self.ca, "CA", "--tls-ca") if self.ca else None,
                _read(self.key, "key", "--tls-key") if self.key else None,
                _read(self.cert, "certificate", "--tls-cert") if self.cert else None)

    def channel_credentials(self) -> Any:
        import grpc

        roots, key, chain = self.pem()
        return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)


def channel(url: str, tls: ClientTls | None, options: Any = None) -> Any:
    """A synchronous grpc channel: TLS when ``tls`` is given, else plaintext."""
    import grpc

    if tls is None:
        return grpc.insecure_channel(url, options=options)
    return grpc.secure_channel(url, tls.channel_credentials(), options=options)
