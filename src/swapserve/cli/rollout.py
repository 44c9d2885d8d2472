"""Rollout, evaluation and drift verbs of the ``swapserve`` command.

``swapserve rollout start MODEL VERSION (--plan FILE | --strategy NAME) [--cohort ATTR=VALUE]``,
``swapserve rollout status|pause|resume|approve|abort MODEL``,
``swapserve evaluate MODEL VERSION --data FILE`` (offline gate: scores challenger and champion by
slice on a labelled holdout through the server, measures the challenger's p99 under a short
load at the champion's recent request rate, records both in the registry) and
``swapserve drift MODEL``. Same conventions as the other operator verbs (``--url``, ``--json``,
``--reason``, exit codes 0/1/2/3).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table
from rich.text import Text

from swapserve.cli.control import (
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    _common,
    _console,
    _mutating,
    _print_json,
    _print_warnings,
    _run,
    parse_version,
)

if TYPE_CHECKING:
    from swapserve.cli.client import ControlClient

ROLLOUT_ACTIONS = ("status", "pause", "resume", "approve", "abort")
DEFAULT_INFER_URL = "localhost:8001"


# -- rollout ---------------------------------------------------------------------------------------


def render_rollout(doc: dict[str, Any]) -> None:
    out = _console()
    _print_warnings(doc.get("model", {}))  # e.g. "registry write pending" while the registry is down
    r = doc.get("rollout")
    if not r:
        out.print(f"model {doc['model']['name']} has no rollout")
        return
    plan = r["plan"]
    ev = r.get("evidence", {})
    phase = ev.get("phase", "")
    stages = plan.get("stages", [])
    head = Text()
    head.append(f"rollout {r['id']}", style="bold")
    head.append(f"  {doc['model']['name']} v{r['challenger']} vs champion v{r['champion']}  state {r['state']}")
    out.print(head)
    table = Table("#", "STAGE", "TRAFFIC", "MIN DURATION", "MIN SAMPLES", "APPROVE", "")
    for i, s in enumerate(stages):
        mark = ("<- now" if i == r["stage_index"] and phase == "stages" and r["state"] in
                ("running", "paused", "awaiting_approval") else "")
        table.add_row(str(i), s["name"], f"{s['traffic']}%" + (" shadow" if s.get("shadow") else ""),
                      f"{s.get('min_duration', 0):g}s", str(s.get("min_samples", 0)),
                      "yes" if s.get("approve") else "", mark)
    out.print(table)
    if phase == "watch":
        out.print(f"watching for {plan.get('watch', 0):g}s after promotion; rollback gate armed")
    for key in ("last_hold", "waiting"):
        if ev.get(key):
            out.print(f"{key.replace('_', ' ')}: {ev[key]}")
    if ev.get("rollback"):
        rb = ev["rollback"]
        out.print(Text(f"rolled back: {rb.get('reason')}", style="red"))
    if r.get("fleet"):
        render_fleet(out, r["fleet"])
    if r.get("sources"):
        render_sources(out, r["sources"])
    if ev.get("report"):
        rep = Table("ARM", "VERSION", "SLICE", "REQUESTS", "LABELLED", "ACCURACY", "P99 MS")
        for arm in ("champion", "challenger"):
            a = ev["report"][arm]
            for s, c in a["slices"].items():
                acc = f"{c['accuracy']:.2%}" if c.get("accuracy") is not None else "-"
                p99 = f"{c['latency_p99_s'] * 1e3:.1f}" if c.get("latency_p99_s") is not None else "-"
                rep.add_row(arm, str(a["version"]), s, str(c["requests"]), str(c["labelled"]), acc, p99)
        out.print(rep)


def render_fleet(out: Any, fleet: dict[str, Any]) -> None:
    """Who decides (the rollout lease) and what each replica contributes to the evidence."""
    lead = fleet.get("leader") or {}
    who = lead.get("replica") or "nobody yet"
    note = " (this replica)" if lead.get("replica") == lead.get("this_replica") else ""
    out.print(f"decided by {who}{note}" + (f", lease epoch {lead['epoch']}" if lead.get("epoch") else ""))
    replicas = fleet.get("replicas") or {}
    if len(replicas) > 1 or (replicas and next(iter(replicas)) != lead.get("this_replica")):
        table = Table("REPLICA", "CHAMPION REQ", "CHAMPION LABELLED", "CHALLENGER REQ", "CHALLENGER LABELLED",
                      "STAGE LABELLED", title="evidence by replica (summed by the leader)", title_justify="left")
        for rid, e in replicas.items():
            table.add_row(rid, str(e["champion"]["requests"]), str(e["champion"]["labelled"]),
                          str(e["challenger"]["requests"]), str(e["challenger"]["labelled"]), str(e["stage_labelled"]))
        out.print(table)


def render_sources(out: Any, sources: dict[str, Any]) -> None:
    """Who the evidence came from (labels per reporter this stage) and what the gates left out, why."""
    cap = sources.get("max_reporter_share")
    reporters = sources.get("reporters") or {}
    title = "labels this stage by reporter" + (f" (max_reporter_share {cap:g})" if cap else " (no reporter cap)")
    table = Table("REPORTER", "VERSION", "COUNTED", "EXCLUDED", title=title, title_justify="left")
    for reporter, by_version in sorted(reporters.items()):
        for version, results in sorted(by_version.items()):
            excluded = ", ".join(f"{k} {n}" for k, n in sorted(results.items()) if k != "counted") or "-"
            table.add_row(reporter, version, str(results.get("counted", 0)), excluded)
    if not reporters:
        table.add_row("-", "-", "0", "no labels yet")
    out.print(table)
    excluded = Table("ARM", "VERSION", "KIND", "REASON", "COUNT",
                     title="kept out of the gates since the rollout started", title_justify="left")
    rows = 0
    for arm in ("champion", "challenger"):
        ex = (sources.get("excluded") or {}).get(arm) or {}
        for kind in ("request", "outcome"):
            for reason, n in sorted((ex.get(kind) or {}).items()):
                note = " (counted in 'other')" if reason == "undeclared_slice" else ""
                excluded.add_row(arm, str(ex.get("version", "")), kind, reason + note, str(n))
                rows += 1
    if rows:
        out.print(excluded)
    else:
        out.print("nothing kept out of the gates (no pinned or cohort requests, client errors, capped, "
                  "duplicate or evicted labels)")


def _cmd_rollout(args: argparse.Namespace) -> int:
    def action(c: ControlClient) -> int:
        if args.action == "start":
            if args.version is None:
                raise UsageError("rollout start needs MODEL VERSION")
            plan_text = ""
            if args.plan:
                try:
                    plan_text = Path(args.plan).read_text()
                except OSError as exc:
                    raise UsageError(f"cannot read plan {args.plan}: {exc.strerror}") from None
            elif not args.strategy:
                raise UsageError("rollout start needs --plan FILE or --strategy shadow|canary|blue-green|cohort|ab")
            cohorts = []
            for text in args.cohort:
                attr, sep, value = text.partition("=")
                if not sep or not attr:
                    raise UsageError(f"--cohort {text!r}: expected ATTR=VALUE, e.g. country=NL")
                cohorts.append((attr, value))
            doc = c.start_rollout(args.model, args.version, plan=plan_text, strategy=args.strategy or "",
                                  cohorts=cohorts, reason=args.reason, force=args.force)
        elif args.action == "status":
            doc = c.rollout(args.model)
        else:
            doc = c.rollout_action(args.model, args.action, reason=args.reason)
        if args.json:
            _print_json(doc)
        else:
            render_rollout(doc)
        return EXIT_OK

    return _run(args, action)


# -- evaluate ----------------------------------------------------------------------------------------


def load_holdout(path: Path, input_names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(inputs by name, labels, slices) from npz, CSV or Parquet.

    npz: one array per input name (or ``x`` for a single-input model), ``y`` (or ``label``),
    optional ``slice``. CSV/Parquet: a ``label`` (or ``y``) column, an optional ``slice`` column,
    every other column a feature of the single input, in column order.
    """
    suffix = path.suffix.lower()
    if suffix == ".npz":
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
        label_key = "y" if "y" in keys else "label" if "label" in keys else None
        if label_key is None:
            raise UsageError(f"{path}: no 'y' or 'label' array; found {sorted(keys)}")
        if all(n in keys for n in input_names):
            inputs = {n: data[n] for n in input_names}
        elif len(input_names) == 1 and "x" in keys:
            inputs = {input_names[0]: data["x"]}
        else:
            raise UsageError(f"{path}: needs arrays {input_names} (or 'x' for a single-input model); found {sorted(keys)}")
        y = data[label_key]
        slices = data["slice"].astype(str) if "slice" in keys else np.full(len(y), "overall")
        return inputs, y, slices
    if suffix in (".csv", ".parquet", ".pq"):
        if len(input_names) != 1:
            raise UsageError(f"{path}: CSV/Parquet holdouts are for single-input models; use npz for {input_names}")
        if suffix == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if not rows:
                raise UsageError(f"{path}: no rows")
            columns = list(rows[0])
            table = {c: [r[c] for r in rows] for c in columns}
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise UsageError("reading Parquet needs pyarrow: pip install pyarrow") from None
            table = pq.read_table(path).to_pydict()
            columns = list(table)
        label = "label" if "label" in columns else "y" if "y" in columns else None
        if label is None:
            raise UsageError(f"{path}: no 'label' or 'y' column; columns are {columns}")
        features = [c for c in columns if c not in (label, "slice")]
        x = np.array([[float(v) for v in table[c]] for c in features], dtype=np.float64).T
        y = np.array([int(float(v)) for v in table[label]])
        slices = np.array([str(v) for v in table["slice"]]) if "slice" in columns else np.full(len(y), "overall")
        return {input_names[0]: x}, y, slices
    raise UsageError(f"{path}: unknown holdout format '{suffix}'; use .npz, .csv or .parquet")


def _predict(stub: Any, pb: Any, model: str, version: int, inputs: dict[str, np.ndarray],
             meta: Any, batch: int) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    preds = []
    dtypes = {i.name: i.datatype for i in meta.inputs}
    from swapserve.dtypes import numpy_dtype

    for start in range(0, n, batch):
        req = pb.ModelInferRequest(model_name=model, model_version=str(version))
        for name, arr in inputs.items():
            chunk = np.ascontiguousarray(arr[start:start + batch], dtype=numpy_dtype(dtypes[name]))
            req.inputs.add(name=name, datatype=dtypes[name], shape=list(chunk.shape))
            req.raw_input_contents.append(chunk.tobytes())
        resp = stub.ModelInfer(req, timeout=60)
        out = resp.outputs[0]
        values = np.frombuffer(resp.raw_output_contents[0], dtype=numpy_dtype(out.datatype)).reshape(list(out.shape))
        preds.append(values.argmax(axis=-1) if values.shape[-1] > 1 else values.reshape(len(values)))
    return np.concatenate(preds)


def _by_slice(pred: np.ndarray, y: np.ndarray, slices: np.ndarray) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(slices):
        groups[str(s)].append(i)
    for s, idx in sorted(groups.items()):
        out[s] = {"accuracy": float((pred[idx] == y[idx]).mean()), "samples": float(len(idx))}
    out["overall"] = {"accuracy": float((pred == y).mean()), "samples": float(len(y))}
    return out


def _recent_rate(c: ControlClient, model: str, champion: int, seconds: float = 2.0) -> float:
    def requests() -> float:
        live = c.status(model).get("live", {})
        return float(live.get(str(champion), {}).get("overall", {}).get("requests", 0))

    first = requests()
    time.sleep(seconds)
    return (requests() - first) / seconds


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import grpc

    from swapserve._proto import grpc_service_pb2 as pb
    from swapserve._proto import grpc_service_pb2_grpc as pb_grpc

    def action(c: ControlClient) -> int:
        status = c.status(args.model)
        champion = args.champion or status["champion"]
        if not champion:
            raise UsageError(f"model '{args.model}' has no champion; pass --champion VERSION")
        infer_url = args.infer_url or os.environ.get("SWAPSERVE_INFER_URL") or DEFAULT_INFER_URL
        from swapserve.cli.tlsargs import client_tls
        from swapserve.tls import channel

        with channel(infer_url, client_tls(args), options=[("grpc.max_receive_message_length", 256 << 20),
                                                           ("grpc.max_send_message_length", 256 << 20)]) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            try:
                meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model), timeout=30)
                config = stub.ModelConfig(pb.ModelConfigRequest(name=args.model), timeout=30).config
            except grpc.RpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()} (inference server at {infer_url})", file=sys.stderr)
                return 1
            inputs, y, slices = load_holdout(Path(args.data), [i.name for i in meta.inputs])
            batch = max(1, config.max_batch_size or 1)
            results = {}
            for role, v in (("champion", champion), ("challenger", args.version)):
                try:
                    pred = _predict(stub, pb, args.model, v, inputs, meta, batch)
                except grpc.RpcError as exc:
                    print(f"error: version {v}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
                results[role] = _by_slice(pred, y, slices)
        p99 = None
        rate = args.rate or max(20.0, min(500.0, _recent_rate(c, args.model, champion)))
        if args.load_seconds > 0:
            from swapserve.bench.runner import BenchConfig, run_bench

            summary = run_bench(BenchConfig(url=infer_url, model=args.model, model_version=str(args.version),
                                            rate=rate, duration=args.load_seconds, warmup=0.5)).summary
            p99 = summary["latency_ms"]["p99"]
            results["challenger"]["overall"]["p99_ms"] = float(p99) if p99 is not None else float("nan")
            results["challenger"]["overall"]["load_rate_rps"] = rate
        if not args.no_record:
            c.record_metrics(args.model, champion, results["champion"], reason=args.reason or "swapserve evaluate")
            c.record_metrics(args.model, args.version, results["challenger"],
                             reason=args.reason or "swapserve evaluate")
        doc = {"model": args.model, "champion": champion, "challenger": args.version, "data": str(args.data),
               "metrics": results, "p99_ms": p99, "load_rate_rps": rate if args.load_seconds > 0 else None,
               "recorded": not args.no_record}
        if args.json:
            _print_json(doc)
            return EXIT_OK
        out = _console()
        table = Table("SLICE", "SAMPLES", f"CHAMPION v{champion}", f"CHALLENGER v{args.version}", "DIFF (points)")
        for s in results["challenger"]:
            a, b = results["champion"][s]["accuracy"], results["challenger"][s]["accuracy"]
            diff = 100 * (b - a)
            table.add_row(s, str(int(results["challenger"][s]["samples"])), f"{a:.2%}", f"{b:.2%}",
                          Text(f"{diff:+.1f}", style="red" if diff < -1 else "green"))
        out.print(table)
        if p99 is not None:
            out.print(f"challenger p99 under {rate:.0f} req/s for {args.load_seconds:g}s: {p99:.2f} ms")
        if not args.no_record:
            out.print("recorded as offline metrics in the registry (the rollout's offline gate reads them)")
        return EXIT_OK

    try:
        return _run(args, action)
    except UsageError as exc:
        print(f"swapserve evaluate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


# -- drift -------------------------------------------------------------------------------------------


def _cmd_drift(args: argparse.Namespace) -> int:
    def action(c: ControlClient) -> int:
        report = c.drift(args.model)
        if args.json:
            _print_json(report)
            return EXIT_OK
        out = _console()
        head = Text()
        head.append(f"{report.get('model', args.model)} v{report.get('version', '?')}", style="bold")
        head.append(f"  drift state {report.get('state', '-')}  profile {report.get('profile', '-')}")
        out.print(head)
        if report.get("error"):
            out.print(Text(f"error: {report['error']}", style="red"))
        windows = Table("WINDOW", "SAMPLES", "STATE", "SCORE", "INPUT", "PREDICTION")
        for w in report.get("windows", []):
            windows.add_row(str(w["window"]), str(w["samples"]), str(w["state"]), f"{w['score']:.3f}",
                            f"{w['input_score']:.3f}", f"{w['prediction_score']:.3f}")
        out.print(windows)
        top = Table("WINDOW", "FEATURE", "PSI", "TEST", "P-VALUE", "SIGNIFICANT")
        for f in report.get("most_drifted", [])[: args.top]:
            top.add_row(str(f["window"]), str(f["feature"]), f"{f['psi']:.3f}", str(f.get("test", "")),
                        f"{f['p_value']:.2g}", "yes" if f.get("significant") else "")
        out.print(top)
        return EXIT_OK

    return _run(args, action)


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common, mutating = [_common()], [_mutating()]
    p = sub.add_parser("rollout", parents=mutating, help="start and steer a gated rollout",
                       description="swapserve rollout start MODEL VERSION --plan FILE | --strategy NAME; "
                                   "swapserve rollout status|pause|resume|approve|abort MODEL")
    p.add_argument("action", choices=("start", *ROLLOUT_ACTIONS))
    p.add_argument("model")
    p.add_argument("version", nargs="?", type=parse_version, default=None)
    p.add_argument("--plan", metavar="FILE", help="rollout plan, YAML or JSON (see docs/rollouts.md)")
    p.add_argument("--strategy", metavar="NAME", help="built-in plan: shadow, canary, blue-green, cohort, ab")
    p.add_argument("--cohort", action="append", default=[], metavar="ATTR=VALUE",
                   help="cohort strategy: requests with this attribute go to the challenger; repeatable")
    p.set_defaults(func=_cmd_rollout, prog=p.prog)

    p = sub.add_parser("evaluate", parents=mutating,
                       help="score a version against the champion by slice on a labelled holdout (offline gate)")
    p.add_argument("model")
    p.add_argument("version", type=parse_version)
    p.add_argument("--data", required=True, metavar="FILE", help="labelled holdout: .npz, .csv or .parquet")
    p.add_argument("--champion", type=parse_version, default=None, metavar="VERSION",
                   help="compare against this version (default: the current champion)")
    p.add_argument("--infer-url", default=None, metavar="HOST:PORT",
                   help="inference server (default: $SWAPSERVE_INFER_URL or localhost:8001)")
    p.add_argument("--load-seconds", type=float, default=5.0,
                   help="measure the challenger's p99 under load this long (0: skip)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="load rate in req/s (default: the champion's recent rate, 20..500)")
    p.add_argument("--no-record", action="store_true", help="print only; do not record in the registry")
    p.set_defaults(func=_cmd_evaluate, prog=p.prog)

    p = sub.add_parser("drift", parents=common, help="the most drifted input features and prediction drift")
    p.add_argument("model")
    p.add_argument("--top", type=int, default=10, help="features to show (default 10)")
    p.set_defaults(func=_cmd_drift, prog=p.prog)
