"""The ``swapserve`` command: ``serve`` runs the server; the other verbs talk to a running one."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from swapserve import __version__


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve a model repository over KServe v2 / Triton gRPC")
    p.add_argument("--model-repository", type=Path, required=True, help="Triton-style model repository directory")
    p.add_argument("--host", default=None, help="address to bind the gRPC and metrics servers (default 0.0.0.0)")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC inference port (default 8001; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default 8002; -1 = off)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--model-control-mode", choices=["none", "explicit", "poll"], default=None,
                   help="none: load all at start; explicit: --load-model then RPC; poll: rescan the repository")
    p.add_argument("--load-model", action="append", default=None, metavar="NAME",
                   help="explicit mode: model to load at start (repeatable; '*' loads all)")
    p.add_argument("--repository-poll-secs", type=float, default=None, help="poll mode: rescan interval (default 15)")
    p.add_argument("--grpc-max-message-bytes", type=int, default=None,
                   help="largest gRPC message accepted or sent (default 256 MiB)")
    p.add_argument("--torch-threads", type=int, default=None, help="intra-op threads per torch worker (default 1)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default INFO)")


def _cmd_serve(args: argparse.Namespace) -> int:
    from swapserve.config import Settings
    from swapserve.server.app import serve

    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in {"command", "func"}}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(settings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swapserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"swapserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"serve": _cmd_serve}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
