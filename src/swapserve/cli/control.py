"""Operator verbs of the ``swapserve`` command: they talk to a running server's control service.

``models``, ``status``, ``register``, ``load``, ``unload``, ``promote``, ``rollback``,
``traffic``, ``events`` and ``audit``. Every verb takes ``--url`` (default ``localhost:8003``
or ``SWAPSERVE_URL``), ``--token`` (default ``SWAPSERVE_TOKEN``), ``--reason`` and ``--json``;
the verbs that change something take ``--force``. ``--json`` prints exactly one JSON document
(``events --follow``: one object per line); the schemas are in ``swapserve.cli.client``.

Exit codes: 0 success, 1 the server refused or failed (its status and message on stderr),
2 bad usage (caught here, before anything is sent), 3 no server at ``--url``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from swapserve import units
from swapserve.cli.tlsargs import add_tls_arguments, client_tls
from swapserve.errors import InvalidInput
from swapserve.routing.policy import check_split

if TYPE_CHECKING:
    from swapserve.cli.client import ControlClient

#: The verbs this module adds to ``swapserve``.
VERBS = ("models", "status", "register", "load", "unload", "promote", "rollback", "traffic", "events", "audit")

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class UsageError(Exception):
    """Bad command-line input found before calling the server (exit 2)."""


# -- argument parsing: pure, unit-tested -----------------------------------------------------------


def parse_version(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a version number (a positive integer, e.g. 2)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"version must be a positive integer, not {value}")
    return value


def percent_to_bp(text: str) -> int:
    """ "95" -> 9500, "33.33" -> 3333, "0.01" -> 1: :func:`swapserve.units.percent_to_bp` as an argparse type."""
    try:
        return units.percent_to_bp(text)
    except units.UnitError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_share(text: str) -> tuple[int, int]:
    """ "2=5" -> (2, 500): VERSION=PERCENT, as basis points."""
    version, sep, percent = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"'{text}': write traffic as VERSION=PERCENT, e.g. 1=95 2=5")
    return parse_version(version.strip()), percent_to_bp(percent)


def parse_cohort(text: str) -> tuple[str, str, int]:
    """ "country=de:3" -> ("country", "de", 3): requests whose ATTR parameter equals VALUE go to VERSION."""
    attribute, sep, rest = text.partition("=")
    value, colon, version = rest.rpartition(":")
    if not sep or not colon or not attribute.strip() or not value:
        raise argparse.ArgumentTypeError(f"'{text}': write a cohort rule as ATTR=VALUE:VERSION, e.g. country=de:3")
    return attribute.strip(), value, parse_version(version.strip())


def check_traffic(shares: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The split as given, or UsageError when :func:`swapserve.routing.policy.check_split` refuses it
    (a version repeats, the weights do not sum to exactly 100 %), before anything is sent."""
    try:
        check_split(shares)
    except InvalidInput as exc:
        raise UsageError(exc.message) from None
    return list(shares)


def read_metrics(path: str) -> dict[str, dict[str, float]]:
    """A JSON file ``{"slice": {"metric": number}}`` ("overall" for the whole), or UsageError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read --metrics {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--metrics {path} is not valid JSON: {exc}") from None
    example = '{"overall": {"accuracy": 0.97}, "mobile": {"accuracy": 0.95}}'
    if not isinstance(data, dict):
        raise UsageError(f"--metrics {path} must hold a JSON object of slices, e.g. {example}")
    out: dict[str, dict[str, float]] = {}
    for slice_, values in data.items():
        if not isinstance(values, dict):
            raise UsageError(f"--metrics {path}: slice '{slice_}' must map metric names to numbers, e.g. {example}")
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"--metrics {path}: {slice_}.{name} is {value!r}, not a number")
        out[str(slice_)] = {str(k): float(v) for k, v in values.items()}
    return out


def read_metadata(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--metadata is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError('--metadata must be a JSON object, e.g. {"framework": "torch"}')
    return data


# -- human output ----------------------------------------------------------------------------------


def format_percent(p: float) -> str:
    """95.0 -> "95%", 33.33 -> "33.33%", 0.5 -> "0.5%"."""
    return f"{p:.2f}".rstrip("0").rstrip(".") + "%"


def format_traffic(traffic: dict[str, float]) -> str:
    return ", ".join(f"v{v} {format_percent(p)}" for v, p in traffic.items()) or "-"


def format_bytes(n: int) -> str:
    if not n:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


_STATE_STYLE = {"serving": "green", "ready": "cyan", "failed": "red", "loading": "yellow", "warming": "yellow",
                "draining": "yellow", "unloaded": "dim", "registered": "dim", "READY": "green", "UNAVAILABLE": "red"}


def _state(s: str) -> Text:
    return Text(s, style=_STATE_STYLE.get(s, ""))


def _opt(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def render_status(status: dict[str, Any], out: Console) -> None:
    """The human view of a ``status`` dict (see swapserve.cli.client): header, versions table."""
    champion = status["champion"]
    head = Text()
    head.append(status["name"], style="bold")
    head.append(f"  champion {'v' + str(champion) if champion else 'none'}")
    head.append(f"  generation {status['generation']}  key {status['key_attribute']}")
    out.print(head)
    out.print(f"traffic: {format_traffic(status['traffic'])}")
    if status["shadows"]:
        out.print("shadows: " + ", ".join(f"v{v}" for v in status["shadows"]))
    if status["cohorts"]:
        out.print("cohorts: " + ", ".join(f"{c['attribute']}={c['value']} -> v{c['version']}"
                                          for c in status["cohorts"]))
    if status["previous_champions"]:
        out.print("previous champions: " + ", ".join(f"v{v}" for v in status["previous_champions"])
                  + " (rollback returns to the last)")
    if status["memory_budget_bytes"] or status["memory_used_bytes"]:
        out.print(f"memory: {format_bytes(status['memory_used_bytes'])} used of "
                  f"{format_bytes(status['memory_budget_bytes'])} budget")
    if status["rollout"]:
        r = status["rollout"]
        out.print(f"rollout {r.get('id')}: v{r.get('challenger')} vs v{r.get('champion')}, {r.get('state')}, "
                  f"stage {r.get('stage_index')} (`swapserve rollout status {status['name']}`)")
    table = Table("VERSION", "STATE", "TRAFFIC", "RESIDENT", "MEMORY", "SHA256", "STAGE", "REGISTERED", "NOTE")
    for v in status["versions"]:
        notes = []
        if v["version"] == champion:
            notes.append("champion")
        if v["shadow"]:
            notes.append("shadow")
        if v["reason"]:
            notes.append(v["reason"])
        table.add_row(str(v["version"]), _state(v["state"]), format_percent(v["traffic"]),
                      "yes" if v["resident"] else "no", format_bytes(v["memory_bytes"]),
                      v["sha256"][:12] or "-", _opt(v["stage"]), _opt(v["registered_at"]), "; ".join(notes))
    out.print(table)
    replicas = status.get("replicas") or []
    if replicas:
        converged = sum(1 for r in replicas if r["converged"])
        fleet = Table("REPLICA", "ADDRESS", "GENERATION", "CONVERGED", "NOTE",
                      title=f"fleet: {converged}/{len(replicas)} replicas on generation "
                            f"{status.get('registry_generation', 0)}")
        for r in replicas:
            fleet.add_row(r["replica_id"] + (" (this)" if r.get("this") else ""), r["address"] or "-",
                          str(r["generation"]), "yes" if r["converged"] else "no", r["reason"] or "")
        out.print(fleet)
    for version, d in (status.get("drift") or {}).items():
        out.print(f"drift v{version}: {d.get('state')} (score {d.get('score')}); most drifted: "
                  f"{', '.join(d.get('most_drifted', [])) or '-'}")
    live = status.get("live") or {}
    if live:
        slices = Table("VERSION", "SLICE", "REQUESTS", "ERRORS", "LABELLED", "ACCURACY", "MAE", "P99 MS")
        for version, by_slice in live.items():
            for name, c in by_slice.items():
                slices.add_row(version, name, str(c["requests"]), str(c["errors"]), str(c["labelled"]),
                               f"{c['accuracy']:.2%}" if c.get("accuracy") is not None else "-",
                               f"{c['mae']:.4g}" if c.get("mae") is not None else "-",
                               f"{c['latency_p99_ms']:.1f}" if c.get("latency_p99_ms") is not None else "-")
        out.print(slices)


def render_models(models: list[dict[str, Any]], out: Console) -> None:
    table = Table("MODEL", "STATE", "CHAMPION", "TRAFFIC", "RESIDENT", "ROLLOUT")
    for m in models:
        table.add_row(m["name"], _state(m["state"]), f"v{m['champion']}" if m["champion"] else "-",
                      format_traffic(m["traffic"]), ", ".join(f"v{v}" for v in m["resident_versions"]) or "-",
                      _opt(m["rollout_state"]))
    out.print(table)


def format_event(e: dict[str, Any]) -> str:
    where = e["model"] or "-"
    if e["version"]:
        where += f":{e['version']}"
    return f"{e['id']:>6}  {e['at']}  {e['kind']:<9}  {where}  {e['message']}"


def render_events(events: list[dict[str, Any]], out: Console) -> None:
    table = Table("ID", "AT", "KIND", "MODEL", "VERSION", "MESSAGE")
    for e in events:
        table.add_row(str(e["id"]), e["at"], e["kind"], _opt(e["model"]), _opt(e["version"]), e["message"])
    out.print(table)


def _short(value: Any, width: int = 60) -> str:
    text = "-" if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 3] + "..."


def render_audit(entries: list[dict[str, Any]], out: Console) -> None:
    table = Table("ID", "AT", "ACTOR", "ACTION", "MODEL", "VERSION", "REASON", "BEFORE", "AFTER")
    for a in entries:
        table.add_row(str(a["id"]), a["at"], a["actor"], a["action"], _opt(a["model"]), _opt(a["version"]),
                      a["reason"], _short(a["before"]), _short(a["after"]))
    out.print(table)


def _console(stderr: bool = False) -> Console:
    # markup off: model names, messages and JSON may contain [brackets]; colour comes from Text styles.
    # Piped or logged output is not squeezed to 80 columns (rich's default without a terminal).
    stream = sys.stderr if stderr else sys.stdout
    if "utf" not in (getattr(stream, "encoding", None) or "utf-8").lower() and hasattr(stream, "reconfigure"):
        stream.reconfigure(errors="replace")  # LANG=C terminals: a "?" beats a UnicodeEncodeError
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, markup=False, highlight=False, soft_wrap=False, width=width)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def _print_warnings(status: dict[str, Any]) -> None:
    err = _console(stderr=True)
    for w in status.get("warnings", ()):
        err.print(Text(f"warning: {w}", style="yellow"))


# -- running a verb --------------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> ControlClient:
    from swapserve.cli.client import DEFAULT_URL, ControlClient

    url = args.url or os.environ.get("SWAPSERVE_URL") or DEFAULT_URL
    token = args.token if args.token is not None else os.environ.get("SWAPSERVE_TOKEN")
    token_file = getattr(args, "token_file", None) or os.environ.get("SWAPSERVE_TOKEN_FILE")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise SystemExit(f"swapserve: cannot read --token-file {token_file}: {e.strerror}") from None
    return ControlClient(url, token=token or None, tls=client_tls(args))


def _usage_error(args: argparse.Namespace, exc: UsageError) -> int:
    print(f"{getattr(args, 'prog', 'swapserve')}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def _run(args: argparse.Namespace, action: Callable[[ControlClient], int]) -> int:
    """Run ``action`` with a client; map failures to exit codes and print the reason on stderr."""
    from swapserve.cli.client import ControlError, ServerUnreachable

    try:
        with _client(args) as client:
            return action(client)
    except UsageError as exc:
        return _usage_error(args, exc)
    except ServerUnreachable as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_SERVER


def _show_status(args: argparse.Namespace, status: dict[str, Any], headline: str | None = None) -> int:
    if args.json:
        _print_json(status)
    else:
        out = _console()
        if headline:
            out.print(Text(headline, style="bold green"))
        render_status(status, out)
        _print_warnings(status)
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    def action(c: ControlClient) -> int:
        models = c.list_models()
        if args.json:
            _print_json(models)
        else:
            render_models(models, _console())
        return EXIT_OK

    return _run(args, action)


def _cmd_status(args: argparse.Namespace) -> int:
    return _run(args, lambda c: _show_status(args, c.status(args.model)))


def _cmd_register(args: argparse.Namespace) -> int:
    def action(c: ControlClient) -> int:
        metrics = read_metrics(args.metrics) if args.metrics else None
        metadata = read_metadata(args.metadata) if args.metadata else None
        status = c.register(args.model, args.version, reason=args.reason, training_run=args.training_run,
                            data_ref=args.data_ref, parent_version=args.parent, metrics=metrics, metadata=metadata)
        return _show_status(args, status, f"registered {args.model} version {args.version}")

    return _run(args, action)


def _version_verb(name: str, done: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        def action(c: ControlClient) -> int:
            status = getattr(c, name)(args.model, args.version, reason=args.reason, force=args.force)
            return _show_status(args, status, f"{done} {args.model} version {args.version}")

        return _run(args, action)

    return handler


def _cmd_rollback(args: argparse.Namespace) -> int:
    def action(c: ControlClient) -> int:
        status = c.rollback(args.model, args.to, reason=args.reason, force=args.force)
        champion = status["champion"]
        return _show_status(args, status, f"rolled {args.model} back to version {champion}")

    return _run(args, action)


def _cmd_traffic(args: argparse.Namespace) -> int:
    def action(c: ControlClient) -> int:
        status = c.set_traffic(args.model, args.shares, shadows=args.shadow, cohorts=args.cohort,
                               key_attribute=args.key, reason=args.reason, force=args.force)
        return _show_status(args, status, f"traffic of {args.model}: {format_traffic(status['traffic'])}")

    try:  # before opening a channel: a bad split never reaches the server
        check_traffic(args.shares)
    except UsageError as exc:
        return _usage_error(args, exc)
    return _run(args, action)


def _cmd_events(args: argparse.Namespace) -> int:
    def action(c: ControlClient) -> int:
        stream = c.events(args.model, after_id=args.after, limit=args.limit, follow=args.follow)
        if not args.follow:
            events = list(stream)
            if args.json:
                _print_json(events)
            else:
                render_events(events, _console())
            return EXIT_OK
        try:
            for e in stream:
                print(json.dumps(e) if args.json else format_event(e), flush=True)
        except KeyboardInterrupt:  # the normal way to stop following
            pass
        finally:
            stream.close()
        return EXIT_OK

    return _run(args, action)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    """``swapserve audit verify``: read the registry itself (no server, nothing written) and walk the chain."""
    from swapserve import errors
    from swapserve.config import Settings
    from swapserve.registry.audit import verify_registry

    url = args.registry or Settings().registry_url
    try:
        verdict = verify_registry(url, expect_head=args.expect_head)
    except errors.SwapserveError as exc:
        _console(stderr=True).print(f"swapserve audit verify: {exc}", style="red", soft_wrap=True)
        return EXIT_UNREACHABLE if isinstance(exc, errors.RegistryUnavailable) else EXIT_SERVER
    if args.json:
        _print_json(verdict.to_dict())
    else:
        out = _console()
        if verdict.ok:
            out.print(f"audit log intact: {verdict.rows} entries, head entry {verdict.head_id} "
                      f"{verdict.head_hash}", style="green", soft_wrap=True)
        else:
            err = _console(stderr=True)
            first = verdict.problems[0]
            err.print(f"audit log BROKEN at entry {first.id}: {first.message}" if first.id else
                      f"audit log BROKEN: {first.message}", style="red", soft_wrap=True)
            for p in verdict.problems[1:]:
                err.print(f"  also: {p.message}", soft_wrap=True)
            out.print(f"{verdict.rows} entries, {len(verdict.problems)} problem(s), head entry {verdict.head_id} "
                      f"{verdict.head_hash}", soft_wrap=True)
    return EXIT_OK if verdict.ok else EXIT_SERVER


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.model == "verify" and not args.by_model:
        return _cmd_audit_verify(args)
    if args.registry is not None or args.expect_head is not None:
        return _usage_error(args, UsageError("--registry and --expect-head belong to `swapserve audit verify`"))
    model = args.by_model or args.model

    def action(c: ControlClient) -> int:
        entries = c.audit_log(model, limit=args.limit)
        if args.json:
            _print_json(entries)
        else:
            render_audit(entries, _console())
        return EXIT_OK

    return _run(args, action)


# -- the parsers -----------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--url", default=None, metavar="HOST:PORT",
                   help="control service address (default: $SWAPSERVE_URL or localhost:8003)")
    p.add_argument("--token", default=None, help="control service token (default: $SWAPSERVE_TOKEN; prefer "
                   "--token-file, argv is visible in ps)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the control service token (default: $SWAPSERVE_TOKEN_FILE)")
    add_tls_arguments(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (schemas: swapserve.cli.client)")
    p.add_argument("--reason", default="", metavar="TEXT", help="why: recorded in the audit log")
    return p


def _mutating() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, parents=[_common()])
    p.add_argument("--force", action="store_true",
                   help="override a conflict with a running rollout (the override is audited)")
    return p


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the operator verbs on the ``swapserve`` sub-parsers; each sets ``func(args) -> exit code``."""
    common, mutating = [_common()], [_mutating()]

    p = sub.add_parser("models", parents=common, help="list models with champion, traffic and resident versions")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("status", parents=common, help="a model's versions, states, traffic and memory")
    p.add_argument("model")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("register", parents=mutating, help="register a version directory with its metadata")
    p.add_argument("model")
    p.add_argument("version", type=parse_version)
    p.add_argument("--metrics", metavar="FILE", help='offline metrics, JSON: {"slice": {"metric": value}}')
    p.add_argument("--training-run", metavar="ID", help="the training run that produced the version")
    p.add_argument("--data-ref", metavar="REF", help="the training data (URI, dataset version, ...)")
    p.add_argument("--parent", type=parse_version, metavar="VERSION", help="the version this one derives from")
    p.add_argument("--metadata", metavar="JSON", help="free-form metadata, a JSON object")
    p.set_defaults(func=_cmd_register)

    for verb, method, done, text in (
            ("load", "load", "loaded", "preload and warm a version (registers it first if needed)"),
            ("unload", "unload", "unloaded", "drain and unload a version that takes no traffic"),
            ("promote", "promote", "promoted", "send 100%% of traffic to a version (the old champion stays resident)")):
        p = sub.add_parser(verb, parents=mutating, help=text)
        p.add_argument("model")
        p.add_argument("version", type=parse_version)
        p.set_defaults(func=_version_verb(method, done))

    p = sub.add_parser("rollback", parents=mutating, help="return to the previous champion (or --to a version)")
    p.add_argument("model")
    p.add_argument("--to", type=parse_version, default=None, metavar="VERSION", help="a resident version to return to")
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser("traffic", parents=mutating, help="set the traffic split, shadows and cohort rules",
                       description="Example: swapserve traffic digits 1=95 2=5 --shadow 3 --key user_id "
                                   "--cohort country=de:2")
    p.add_argument("model")
    p.add_argument("shares", nargs="+", type=parse_share, metavar="VERSION=PERCENT",
                   help="percent with up to two decimals; must sum to 100")
    p.add_argument("--shadow", action="append", type=parse_version, default=[], metavar="VERSION",
                   help="mirror requests to this version (never answered from it); repeatable")
    p.add_argument("--key", default=None, metavar="ATTR", help="request parameter used as the routing key")
    p.add_argument("--cohort", action="append", type=parse_cohort, default=[], metavar="ATTR=VALUE:VERSION",
                   help="send requests whose ATTR parameter is VALUE to VERSION; repeatable")
    p.set_defaults(func=_cmd_traffic)

    p = sub.add_parser("events", parents=common, help="lifecycle, control and rollout events (--follow to stream)")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming new events until interrupted")
    p.add_argument("--after", type=int, default=0, metavar="ID", help="only events with a larger id")
    p.add_argument("--limit", type=positive_int, default=100, metavar="N", help="past events to show (default 100)")
    p.set_defaults(func=_cmd_events)

    p = sub.add_parser("audit", parents=common, help="the audit log: who changed what, when and why; "
                                                     "`audit verify` checks its hash chain")
    p.add_argument("model", nargs="?", default=None, help="a model, or `verify`: check the hash chain")
    p.add_argument("--model", dest="by_model", default=None, metavar="NAME",
                   help="the model whose entries to show (for a model named `verify`)")
    p.add_argument("--limit", type=positive_int, default=100, metavar="N", help="entries to show (default 100)")
    p.add_argument("--registry", default=None, metavar="URL",
                   help="verify: the registry to read directly (default: SWAPSERVE_REGISTRY, else the SQLite "
                        "file under SWAPSERVE_HOME)")
    p.add_argument("--expect-head", default=None, metavar="HASH",
                   help="verify: a head hash printed by an earlier verify; fails when it is no longer in the "
                        "chain (entries deleted from the end, log rewritten)")
    p.set_defaults(func=_cmd_audit)

    for name in VERBS:  # for error messages in argparse's own form: "swapserve traffic: error: ..."
        sub.choices[name].set_defaults(prog=sub.choices[name].prog)


def positive_int(text: str) -> int:
    """argparse type: a positive integer (the verbs' --limit, --batch), else argparse's usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The operator verbs alone (``python -m swapserve.cli.control``); ``swapserve`` itself adds them too."""
    parser = argparse.ArgumentParser(prog="swapserve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    return parser


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
