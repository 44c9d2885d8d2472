"""``--tls-ca/--tls-cert/--tls-key`` for every verb that talks to a server (imports nothing heavy:
every verb builds its parser). The flags fall back to SWAPSERVE_TLS_CA/_CERT/_KEY."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swapserve.tls import ClientTls


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="talk TLS, trusting this CA bundle (PEM; default $SWAPSERVE_TLS_CA; with only "
                        "--tls-cert/--tls-key: the system roots)")
    p.add_argument("--tls-cert", default=None, metavar="FILE",
                   help="client certificate for a server that requires one (mTLS; default $SWAPSERVE_TLS_CERT)")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="key of --tls-cert (default $SWAPSERVE_TLS_KEY)")


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    """The verb's TLS from its flags, else the environment; None: plaintext. SystemExit on half a pair."""
    from swapserve.errors import ConfigError
    from swapserve.tls import ClientTls

    try:
        return ClientTls.from_args(getattr(args, "tls_ca", None), getattr(args, "tls_cert", None),
                                   getattr(args, "tls_key", None))
    except ConfigError as e:
        raise SystemExit(f"swapserve: {e}") from None
