"""The ``swapserve`` command: ``serve`` runs the server; the other verbs talk to a running one."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from swapserve import __version__


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve a model repository over KServe v2 / Triton gRPC")
    p.add_argument("--model-repository", type=Path, default=None,
                   help="Triton-style model repository directory (default: $SWAPSERVE_HOME/model_repository, "
                        "where the example models are written on first start)")
    p.add_argument("--host", default=None, help="address to bind the gRPC and metrics servers (default 127.0.0.1; "
                   "beyond loopback needs --tls-cert/--tls-key or --insecure)")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="FILE",
                   help="server certificate chain (PEM): every port (inference, control, metrics) speaks TLS; "
                        "reloaded on SIGHUP")
    p.add_argument("--tls-key", type=Path, default=None, metavar="FILE", help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", type=Path, default=None, metavar="FILE",
                   help="CA bundle (PEM): every port then requires a client certificate it issued (mTLS)")
    p.add_argument("--insecure", action="store_const", const=True, default=None,
                   help="serve plaintext beyond loopback (only where the network encrypts and authenticates, "
                        "e.g. a service mesh with mTLS); logged as a warning")
    p.add_argument("--grpc-port", type=int, default=None, help="gRPC inference port (default 8001; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics port (default 8002; -1 = off)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--model-control-mode", choices=["none", "explicit", "poll"], default=None,
                   help="none: load all at start; explicit: --load-model then RPC; poll: rescan the repository")
    p.add_argument("--load-model", action="append", default=None, metavar="NAME",
                   help="explicit mode: model to load at start (repeatable; '*' loads all)")
    p.add_argument("--repository-api", action="store_const", const=True, default=None,
                   help="allow RepositoryModelLoad/Unload on the inference port (explicit mode; audited, through "
                        "the control plane); refused with PERMISSION_DENIED by default")
    p.add_argument("--repository-poll-secs", type=float, default=None, help="poll mode: rescan interval (default 15)")
    p.add_argument("--grpc-max-message-bytes", type=int, default=None,
                   help="largest gRPC message accepted or sent on the inference port (default 64 MiB = 67108864)")
    p.add_argument("--max-queue-bytes", type=int, default=None,
                   help="input bytes queued per model version before RESOURCE_EXHAUSTED (default 256 MiB = "
                        "268435456; a model's parameter swapserve.max_queue_bytes sets its own)")
    p.add_argument("--stream-max-inflight", type=int, default=None,
                   help="requests of one ModelStreamInfer stream read and not yet answered; at the limit the "
                        "server stops reading the stream until the client reads a response (default 64)")
    p.add_argument("--stream-max-queued-bytes", type=int, default=None,
                   help="response bytes one stream may hold unread by its client before it ends "
                        "RESOURCE_EXHAUSTED (default 64 MiB = 67108864)")
    p.add_argument("--frontend", choices=["auto", "native", "python"], default=None,
                   help="inference port transport: native (grpc++), python (grpc.aio); default auto = native if built")
    p.add_argument("--torch-threads", type=int, default=None, help="intra-op threads per torch worker (default 1)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--registry", default=None,
                   help="registry URL, any SQLAlchemy URL (default: SQLite under $SWAPSERVE_HOME, ~/.swapserve)")
    p.add_argument("--control-address", default=None,
                   help="control service HOST:PORT (default 127.0.0.1:8003; non-loopback needs a control token "
                        "and TLS or --insecure)")
    p.add_argument("--control-token", default=None,
                   help="bearer token the control service requires (visible in ps: prefer --control-token-file)")
    p.add_argument("--control-token-file", type=Path, default=None, metavar="FILE",
                   help="file holding the control service token (SWAPSERVE_CONTROL_TOKEN_FILE)")
    p.add_argument("--auth-file", type=Path, default=None, metavar="FILE",
                   help="identities and roles (YAML): principals with token hashes or client certificate names, "
                        "roles, the models they may call, rate limits (docs/security.md)")
    open_ = p.add_mutually_exclusive_group()
    open_.add_argument("--inference-open", dest="inference_open", action="store_const", const=True, default=None,
                       help="any caller may call any model on the inference port (the default only on loopback)")
    open_.add_argument("--no-inference-open", dest="inference_open", action="store_const", const=False,
                       help="every inference call needs a principal allowed the model, even on loopback")
    p.add_argument("--feedback-token-file", type=Path, default=None, metavar="FILE",
                   help="feedback credentials, one 'NAME TOKEN' per line: reporting ground truth then needs one "
                        "(metadata 'authorization: Bearer TOKEN'); NAME is the reporter every label records")
    p.add_argument("--feedback-token", default=None,
                   help="one feedback credential (reporter 'default'); SWAPSERVE_FEEDBACK_TOKEN")
    p.add_argument("--feedback-open", action="store_const", const=True, default=None,
                   help="accept feedback without a credential from any peer (reporter 'anonymous'); by default "
                        "only loopback peers may, and only while no feedback token is configured")
    p.add_argument("--device-memory-budget", default=None,
                   help="memory resident versions may use, e.g. 4GiB (default: half the free RAM on cpu, "
                        "80%% of free GPU memory)")
    p.add_argument("--replica-id", default=None,
                   help="this replica's name in the fleet (default: $POD_NAME, else hostname-pid)")
    p.add_argument("--fleet-poll-s", type=float, default=None,
                   help="how often to poll the registry for new deployments (default 1; PostgreSQL also "
                        "LISTENs, so changes arrive at once)")
    p.add_argument("--rollout-lease-s", type=float, default=None,
                   help="time to live of the rollout lease: a fleet's leader that stops renewing it is replaced "
                        "after about this long (default 4)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from swapserve.config import Settings
    from swapserve.server.app import serve
    from swapserve.server.transport import native as native_frontend

    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in {"command", "func"}}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.model_repository is None:
        settings.model_repository = _example_repository(settings.home.expanduser() / "model_repository")
    from swapserve.errors import ConfigError

    try:
        return native_frontend.run(serve(settings))
    except ConfigError as e:  # a setting the operator must fix: the message, not a traceback
        print(f"swapserve serve: error: {e}", file=sys.stderr)
        return 2


def _example_repository(path: Path) -> Path:
    """``path``, with the example models written into it first if it holds none (a fresh install)."""
    from swapserve import examples

    log = logging.getLogger("swapserve.examples")
    log.info("no --model-repository: serving %s", path)
    try:
        built = examples.ensure(path)
    except ValueError as e:
        raise SystemExit(f"swapserve serve: {e}") from None
    if built:
        log.info("wrote the example models %s to %s", ", ".join(built), path)
        if skipped := [m for m in examples.MODELS if m not in built]:
            log.info("left out the examples %s (they need %s): pip install 'swapserve[examples]', then empty %s",
                     ", ".join(skipped), ", ".join(sorted({r for m in skipped for r in examples.missing_requirements(m)})),
                     path)
    return path


def _examples_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # swapserve.examples imports torch: only the verb itself loads it, never the parser (every
    # operator verb builds this parser, and must not pay torch's import).
    p = sub.add_parser("examples", help="write the example model repository (configs and deterministic weights)")
    p.add_argument("directory", type=Path, help="repository directory to write (created if missing)")
    p.add_argument("--models", default=None,
                   help="comma-separated subset of simple,digits,convnet,digits_onnx (default: every one this "
                        "environment can build)")
    p.add_argument("--json", action="store_true", help="print the build summary (versions, accuracies) as JSON")
    p.set_defaults(func=_cmd_examples)


def _cmd_examples(args: argparse.Namespace) -> int:
    import json

    from swapserve import examples

    models = ([m.strip() for m in args.models.split(",") if m.strip()] if args.models is not None
              else examples.buildable())
    try:
        summary = examples.make(args.directory, models)
    except ValueError as e:
        print(f"swapserve examples: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for name, info in summary.items():
            versions = ", ".join(str(v) for v in info["versions"])
            print(f"{args.directory / name}: version{'s' if len(info['versions']) > 1 else ''} {versions}")
        if skipped := [m for m in examples.MODELS if m not in summary and args.models is None]:
            print(f"left out {', '.join(skipped)}: pip install 'swapserve[examples]' to build them", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swapserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"swapserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _examples_parser(sub)
    # Each verb family registers its own sub-parsers and sets ``func``.
    from swapserve.cli.bench import add_parser as add_bench
    from swapserve.cli.control import add_parsers as add_control
    from swapserve.cli.feedback import add_parsers as add_feedback
    from swapserve.cli.rollout import add_parsers as add_rollout
    from swapserve.cli.tokens import add_parsers as add_tokens

    add_control(sub)
    add_rollout(sub)
    add_feedback(sub)
    add_tokens(sub)
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
