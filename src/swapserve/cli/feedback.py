"""``swapserve feedback MODEL --file LABELS.csv``: upload ground truth to a running server.

The CSV has a header with ``id`` (the inference request's id, as returned in the response) and
exactly one of ``label`` (a class id), ``correct`` (true/false, 1/0, yes/no) or ``value`` (a
number), optionally ``row`` (the row of a multi-row request, default 0); other columns are
ignored. The whole file is checked before anything is sent. Outcomes go to the feedback
service on the *inference* port (``--url``, default ``$SWAPSERVE_INFER_URL`` or
``localhost:8001``) in batches of ``--batch`` (default 1000), with the feedback credential
``--token`` (default ``$SWAPSERVE_FEEDBACK_TOKEN``; sent as ``authorization: Bearer TOKEN``) when
the server requires one.

Excluded (joined but not counted by rollout gates), duplicate, unknown, expired or invalid ids
are counted and listed, not fatal. Exit codes: 0 sent (whatever
joined), 1 the server refused a batch (earlier batches stay counted), 2 bad usage or a bad file
(line number in the message), 3 no server at ``--url``.

``--json`` prints ``{"model", "sent", "joined", "excluded", "duplicate", "unknown", "expired",
"invalid", "not_joined": [{"id", "row", "status", "message"}, ...]}``.

Only ``swapserve._proto.feedback_pb2`` is imported (never the KServe inference protos), so this
runs beside ``tritonclient``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from swapserve.cli.control import positive_int
from swapserve.cli.tlsargs import add_tls_arguments, client_tls

if TYPE_CHECKING:
    from swapserve.tls import ClientTls

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_URL = "localhost:8001"
KINDS = ("label", "correct", "value")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
_PROBE_S = 1.0
#: Non-joined outcomes shown in the human output (all of them go to --json).
_SHOWN = 10


class FileError(Exception):
    """The labels file cannot be used (exit 2); the message names the line."""


Row = tuple[str, str, Any, int]  # (id, kind, value, row)


def read_outcomes(path: str) -> list[Row]:
    """Parse and check the whole CSV; FileError names the file and line of the first problem."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise FileError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise FileError(f"{path} is empty; expected a header such as: id,label") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise FileError(f"{path}:1: {exc}") from None
        columns = [h.strip().lower() for h in header]
        kinds = [k for k in KINDS if k in columns]
        if "id" not in columns or len(kinds) != 1:
            raise FileError(f"{path}:1: the header must have an 'id' column and exactly one of 'label', 'correct' "
                            f"or 'value' (optionally 'row'); it has {header}")
        kind = kinds[0]
        i_id, i_val = columns.index("id"), columns.index(kind)
        i_row = columns.index("row") if "row" in columns else None
        out: list[Row] = []
        try:
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) < len(columns):
                    raise FileError(f"{path}:{line}: expected {len(columns)} columns, found {len(cells)}")
                rid = cells[i_id].strip()
                if not rid:
                    raise FileError(f"{path}:{line}: empty id")
                row = 0
                if i_row is not None and cells[i_row].strip():
                    text = cells[i_row].strip()
                    if not text.isdigit():
                        raise FileError(f"{path}:{line}: row '{text}' is not a non-negative integer")
                    row = int(text)
                out.append((rid, kind, _value(kind, cells[i_val].strip(), f"{path}:{line}"), row))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise FileError(f"{path}:{reader.line_num}: {exc}") from None
    return out


def _value(kind: str, text: str, where: str) -> Any:
    if kind == "label":
        try:
            return int(text)
        except ValueError:
            raise FileError(f"{where}: label '{text}' is not an integer class id") from None
    if kind == "correct":
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise FileError(f"{where}: correct '{text}' is not true/false (or 1/0, yes/no)")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise FileError(f"{where}: value '{text}' is not a finite number")
    return value


def _batches(rows: Sequence[Row], size: int) -> Iterable[Sequence[Row]]:
    for i in range(0, len(rows), size):
        yield rows[i:i + size]


class _Refused(Exception):
    def __init__(self, code: str, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.code, self.message, self.unreachable = code, message, unreachable


#: What ``send`` totals, in the order the table shows them.
_COUNTS = ("joined", "excluded", "duplicate", "unknown", "expired", "invalid")


def send(url: str, model: str, rows: Sequence[Row], batch: int, timeout: float = 60,
         token: str | None = None, tls: ClientTls | None = None) -> dict[str, Any]:
    """Send ``rows`` in batches; the totals document (see the module docstring). Raises _Refused."""
    import grpc

    from swapserve._proto import feedback_pb2 as pb
    from swapserve._proto import feedback_pb2_grpc as pb_grpc

    totals: dict[str, Any] = {"model": model, "sent": 0, **{k: 0 for k in _COUNTS}, "not_joined": []}
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    from swapserve.tls import channel as open_channel

    with open_channel(url, tls) as channel:
        stub = pb_grpc.FeedbackStub(channel)
        for chunk in _batches(rows, batch):
            request = pb.ReportRequest(model=model)
            for rid, kind, value, row in chunk:
                request.outcomes.add(id=rid, row=row, **{kind: value})
            try:
                response = stub.Report(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
                detail = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
                unreachable = False
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    try:
                        grpc.channel_ready_future(channel).result(timeout=_PROBE_S)
                    except grpc.FutureTimeoutError:
                        unreachable = True
                raise _Refused(code.name, detail, unreachable) from None
            totals["sent"] += len(chunk)
            for key in _COUNTS:
                totals[key] += getattr(response, key)
            for (rid, _, _, row), r in zip(chunk, response.results):
                if r.status != "joined":
                    totals["not_joined"].append({"id": r.id or rid, "row": row, "status": r.status,
                                                 "message": r.message})
    return totals


def _render(totals: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(markup=False, highlight=False, soft_wrap=False,
                  width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
    table = Table("MODEL", "SENT", *(k.upper() for k in _COUNTS))
    table.add_row(totals["model"], *(str(totals[k]) for k in ("sent", *_COUNTS)))
    out.print(table)
    missed = totals["not_joined"]
    for m in missed[:_SHOWN]:
        print(f"{m['status']}: {m['id']} row {m['row']}: {m['message']}", file=sys.stderr)
    if len(missed) > _SHOWN:
        print(f"... and {len(missed) - _SHOWN} more not joined (--json lists them all)", file=sys.stderr)


def _cmd_feedback(args: argparse.Namespace) -> int:
    prog = getattr(args, "prog", "swapserve feedback")
    if args.batch > 10_000:
        print(f"{prog}: error: --batch may be at most 10000 (the server's limit per report)", file=sys.stderr)
        return EXIT_USAGE
    try:
        rows = read_outcomes(args.file)
    except FileError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    url = args.url or os.environ.get("SWAPSERVE_INFER_URL") or DEFAULT_URL
    try:
        totals = send(url, args.model, rows, args.batch, token=args.token or os.environ.get("SWAPSERVE_FEEDBACK_TOKEN"),
                      tls=client_tls(args))
    except _Refused as exc:
        if exc.unreachable:
            print(f"error: cannot reach the swapserve inference service at {url} ({exc.message}); is `swapserve "
                  "serve` running there? Point --url or SWAPSERVE_INFER_URL at its gRPC inference address",
                  file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_SERVER
    if args.json:
        sys.stdout.write(json.dumps(totals, indent=2) + "\n")
    else:
        _render(totals)
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``feedback`` on the ``swapserve`` sub-parsers; it sets ``func(args) -> exit code``."""
    p = sub.add_parser("feedback", help="upload ground-truth outcomes (CSV) to join with logged predictions",
                       description="Example: swapserve feedback digits --file labels.csv  "
                                   "(CSV header: id,label | id,correct | id,value; optional row)")
    p.add_argument("model")
    p.add_argument("--file", required=True, metavar="LABELS.csv", help="CSV with id and label|correct|value [row]")
    p.add_argument("--url", default=None, metavar="HOST:PORT",
                   help="inference gRPC address (default: $SWAPSERVE_INFER_URL or localhost:8001)")
    p.add_argument("--token", default=None, help="feedback credential (default: $SWAPSERVE_FEEDBACK_TOKEN)")
    add_tls_arguments(p)
    p.add_argument("--json", action="store_true", help="print the totals and non-joined outcomes as JSON")
    p.add_argument("--batch", type=positive_int, default=1000, metavar="N", help="outcomes per request (default 1000)")
    p.set_defaults(func=_cmd_feedback, prog=p.prog)
