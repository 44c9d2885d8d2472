"""The operator CLI and the control service's conversions, without a server (no sockets).

Parsing (percent -> basis points exactly, cohort rules, bad input exits 2 before any call),
the JSON documents ``--json`` prints (ModelView -> protobuf -> dict is stable), the human
tables, and the servicer's thin edge (auth, caller identity, argument conversion) driven
with a fake context and a fake control plane.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from rich.console import Console

from swapserve._proto import control_pb2 as pb
from swapserve.cli import control as control_cli
from swapserve.cli.client import audit_to_dict, event_to_dict, status_to_dict, summary_to_dict, traffic_to_percent
from swapserve.cli.control import UsageError, check_traffic, parse_cohort, parse_share, percent_to_bp
from swapserve.errors import InvalidInput, ModelNotFound
from swapserve.registry.records import AuditEntry, Event
from swapserve.identity import hash_token
from swapserve.server import control as server_control
from swapserve.server.auth import Authenticator, AuthPolicy
from swapserve.types import ModelSummaryView, ModelView, ReplicaView, VersionView


def parse(*argv: str) -> argparse.Namespace:
    return control_cli.build_parser().parse_args(list(argv))


# -- percent -> basis points ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "bp"), [
    ("100", 10000), ("95", 9500), ("5", 500), ("33.33", 3333), ("33.34", 3334), ("0.01", 1), ("0", 0),
    ("12.5", 1250), ("12.50", 1250), ("7%", 700), (" 50 ", 5000), ("99.99", 9999),
])
def test_percent_to_bp_is_exact(text: str, bp: int) -> None:
    assert percent_to_bp(text) == bp


def test_every_basis_point_round_trips_through_its_percent_text() -> None:
    # What the server reports (bp / 100 as a float, printed) parses back to the same bp: no float drift.
    for bp in range(0, 10001):
        assert percent_to_bp(str(bp / 100)) == bp
        assert percent_to_bp(control_cli.format_percent(bp / 100)) == bp


@pytest.mark.parametrize("text", ["95.001", "0.005", "-1", "100.01", "101", "abc", "nan", "inf", "", "1/2"])
def test_percent_to_bp_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        percent_to_bp(text)


def test_thirds_sum_to_exactly_100_percent() -> None:
    args = parse("traffic", "digits", "1=33.33", "2=33.33", "3=33.34")
    assert args.shares == [(1, 3333), (2, 3333), (3, 3334)]
    assert check_traffic(args.shares) == [(1, 3333), (2, 3333), (3, 3334)]


def test_parse_share() -> None:
    assert parse_share("2=5") == (2, 500)
    assert parse_share("10=0.5") == (10, 50)
    for bad in ("2", "x=5", "0=5", "2=", "=5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_share(bad)


@pytest.mark.parametrize(("shares", "message"), [
    ([(1, 9500), (2, 400)], "sum to 99%"),
    ([(1, 9500), (2, 499)], "sum to 99.99%"),
    ([(1, 6000), (2, 6000)], "sum to 120%"),
    ([(1, 5000), (1, 5000)], "version 1 is given twice"),
])
def test_check_traffic_rejects(shares: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_traffic(shares)


# -- cohorts and the other flags ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "rule"), [
    ("country=de:3", ("country", "de", 3)),
    ("region=us:east:2", ("region", "us:east", 2)),  # the version follows the last colon
    ("tier=a=b:1", ("tier", "a=b", 1)),  # the attribute ends at the first '='
])
def test_parse_cohort(text: str, rule: tuple[str, str, int]) -> None:
    assert parse_cohort(text) == rule


@pytest.mark.parametrize("text", ["country=de", "=de:3", "country:3", "country=:3", "country=de:x", "country=de:0"])
def test_parse_cohort_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="ATTR=VALUE:VERSION|version"):
        parse_cohort(text)


def test_traffic_flags() -> None:
    args = parse("traffic", "digits", "1=95", "2=5", "--shadow", "3", "--shadow", "4", "--key", "user_id",
                 "--cohort", "country=de:2", "--cohort", "beta=yes:3", "--reason", "canary", "--force",
                 "--url", "h:1", "--json", "--token", "t")
    assert (args.model, args.shares, args.shadow, args.key) == ("digits", [(1, 9500), (2, 500)], [3, 4], "user_id")
    assert args.cohort == [("country", "de", 2), ("beta", "yes", 3)]
    assert (args.reason, args.force, args.url, args.json, args.token) == ("canary", True, "h:1", True, "t")


def test_common_flags_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse("status", "digits")
    assert (args.url, args.token, args.json, args.reason) == (None, None, False, "")
    assert not hasattr(args, "force")  # only the verbs that change something take --force
    assert parse("rollback", "digits").to is None and parse("rollback", "digits", "--to", "1").to == 1
    ev = parse("events", "--follow", "--after", "7", "--limit", "5")
    assert (ev.model, ev.follow, ev.after, ev.limit) == (None, True, 7, 5)
    reg = parse("register", "digits", "3", "--training-run", "r1", "--data-ref", "s3://d", "--parent", "2")
    assert (reg.version, reg.training_run, reg.data_ref, reg.parent) == (3, "r1", "s3://d", 2)
    minimal = {"models": [], "status": ["m"], "register": ["m", "1"], "load": ["m", "1"], "unload": ["m", "1"],
               "promote": ["m", "1"], "rollback": ["m"], "traffic": ["m", "1=100"], "events": [], "audit": []}
    assert set(minimal) == set(control_cli.VERBS)
    for verb, rest in minimal.items():
        assert callable(parse(verb, *rest).func)


@pytest.mark.parametrize("argv", [
    ["traffic", "digits", "1=abc"],
    ["traffic", "digits", "1=95.001", "2=4.999"],
    ["traffic", "digits"],
    ["promote", "digits", "x"],
    ["promote", "digits", "0"],
    ["rollback", "digits", "--to", "-1"],
    ["events", "--limit", "0"],
    ["traffic", "digits", "1=95", "--cohort", "country"],
    ["status"],
])
def test_bad_arguments_exit_2_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        control_cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_traffic_not_summing_to_100_exits_2_before_calling(capsys: pytest.CaptureFixture[str]) -> None:
    # --url points nowhere: a call would exit 3, so 2 proves the split was refused locally.
    assert control_cli.main(["traffic", "digits", "1=95", "2=4", "--url", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "swapserve traffic: error: traffic weights must sum to 100%, these sum to 99% (1=95% + 2=4%)" in err


def test_read_metrics(tmp_path: Path) -> None:
    good = tmp_path / "m.json"
    good.write_text(json.dumps({"overall": {"accuracy": 0.97, "n": 100}, "mobile": {"accuracy": 0.95}}))
    assert control_cli.read_metrics(str(good)) == {"overall": {"accuracy": 0.97, "n": 100.0},
                                                   "mobile": {"accuracy": 0.95}}
    cases = {"[1, 2]": "JSON object of slices", '{"overall": 0.9}': "slice 'overall' must map",
             '{"overall": {"acc": "high"}}': "overall.acc is 'high', not a number",
             '{"overall": {"acc": true}}': "not a number", "{nope": "not valid JSON"}
    for text, message in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(UsageError, match=message):
            control_cli.read_metrics(str(bad))
    with pytest.raises(UsageError, match="cannot read --metrics"):
        control_cli.read_metrics(str(tmp_path / "missing.json"))


# -- JSON documents: ModelView -> protobuf -> dict ------------------------------------------------


VIEW = ModelView(
    name="digits", champion=2, previous_champions=(1,), traffic=((2, 9500), (3, 500)), shadows=(4,),
    cohorts=(("country", "de", 3),), key_attribute="user_id", generation=7,
    versions=(
        VersionView(1, "ready", resident=True, memory_bytes=1000, sha256="a" * 64, stage="archived",
                    source_path="/m/digits/1", registered_at="2025-01-01T00:00:00+00:00"),
        VersionView(2, "serving", traffic_bp=9500, resident=True, memory_bytes=2000, sha256="b" * 64,
                    stage="production", source_path="/m/digits/2", registered_at="2025-01-02T00:00:00+00:00",
                    training_run="run-2", data_ref="s3://data/v2", parent_version=1,
                    last_used_at="2025-01-03T00:00:00+00:00"),
        VersionView(3, "serving", traffic_bp=500, resident=True),
        VersionView(4, "serving", shadow=True, resident=True),
        VersionView(5, "failed", reason="sha256 mismatch: [model.pt] changed after registration"),
    ),
    memory_budget_bytes=10_000, memory_used_bytes=3000,
    warnings=("version 1 was evicted; preloaded it again",),
    rollout={"stage": 1, "plan": ["shadow", "canary 5%"]},
    registry_generation=7,
    replicas=(ReplicaView("pod-a", "10.0.0.5:8001", 7, True, "", "2025-01-01T00:00:01+00:00", this=True),
              ReplicaView("pod-b", "10.0.0.6:8001", 6, False, "cannot apply generation 7: out of memory",
                          "2025-01-01T00:00:00+00:00")),
)

EXPECTED: dict[str, Any] = {
    "name": "digits", "champion": 2, "previous_champions": [1], "traffic": {"2": 95.0, "3": 5.0},
    "shadows": [4], "cohorts": [{"attribute": "country", "value": "de", "version": 3}],
    "key_attribute": "user_id", "generation": 7,
    "versions": [
        {"version": 1, "state": "ready", "reason": "", "traffic": 0.0, "shadow": False, "resident": True,
         "memory_bytes": 1000, "sha256": "a" * 64, "stage": "archived", "source_path": "/m/digits/1",
         "registered_at": "2025-01-01T00:00:00+00:00", "training_run": None, "data_ref": None,
         "parent_version": None, "last_used_at": None},
        {"version": 2, "state": "serving", "reason": "", "traffic": 95.0, "shadow": False, "resident": True,
         "memory_bytes": 2000, "sha256": "b" * 64, "stage": "production", "source_path": "/m/digits/2",
         "registered_at": "2025-01-02T00:00:00+00:00", "training_run": "run-2", "data_ref": "s3://data/v2",
         "parent_version": 1, "last_used_at": "2025-01-03T00:00:00+00:00"},
        {"version": 3, "state": "serving", "reason": "", "traffic": 5.0, "shadow": False, "resident": True,
         "memory_bytes": 0, "sha256": "", "stage": "", "source_path": "", "registered_at": None,
         "training_run": None, "data_ref": None, "parent_version": None, "last_used_at": None},
        {"version": 4, "state": "serving", "reason": "", "traffic": 0.0, "shadow": True, "resident": True,
         "memory_bytes": 0, "sha256": "", "stage": "", "source_path": "", "registered_at": None,
         "training_run": None, "data_ref": None, "parent_version": None, "last_used_at": None},
        {"version": 5, "state": "failed", "reason": "sha256 mismatch: [model.pt] changed after registration",
         "traffic": 0.0, "shadow": False, "resident": False, "memory_bytes": 0, "sha256": "", "stage": "",
         "source_path": "", "registered_at": None, "training_run": None, "data_ref": None,
         "parent_version": None, "last_used_at": None},
    ],
    "memory_budget_bytes": 10_000, "memory_used_bytes": 3000,
    "warnings": ["version 1 was evicted; preloaded it again"],
    "rollout": {"stage": 1, "plan": ["shadow", "canary 5%"]},
    "live": {},
    "drift": {},
    "registry_generation": 7,
    "replicas": [{"replica_id": "pod-a", "address": "10.0.0.5:8001", "generation": 7, "converged": True,
                  "reason": "", "heartbeat_at": "2025-01-01T00:00:01+00:00", "stale": False, "this": True},
                 {"replica_id": "pod-b", "address": "10.0.0.6:8001", "generation": 6, "converged": False,
                  "reason": "cannot apply generation 7: out of memory", "heartbeat_at": "2025-01-01T00:00:00+00:00",
                  "stale": False, "this": False}],
}


def _through_the_wire(view: ModelView) -> dict[str, Any]:
    message = server_control.model_view_to_pb(view)
    return status_to_dict(pb.ModelStatus.FromString(message.SerializeToString()))


def test_status_json_is_stable() -> None:
    doc = _through_the_wire(VIEW)
    assert doc == EXPECTED
    assert list(doc) == list(EXPECTED)  # key order too: scripts and diffs see the same document
    assert json.loads(json.dumps(doc)) == EXPECTED


def test_status_json_of_a_model_with_nothing_serving() -> None:
    doc = _through_the_wire(ModelView(name="simple"))
    assert (doc["champion"], doc["traffic"], doc["versions"], doc["rollout"]) == (None, {}, [], None)
    assert doc["key_attribute"] == "routing_key"


def test_traffic_is_percent_keyed_by_version_string() -> None:
    shares = [pb.TrafficShare(version=v, weight_bp=w) for v, w in ((1, 3333), (2, 3333), (3, 3334))]
    assert traffic_to_percent(shares) == {"1": 33.33, "2": 33.33, "3": 33.34}
    assert json.dumps(traffic_to_percent(shares)) == '{"1": 33.33, "2": 33.33, "3": 33.34}'


def test_summary_event_and_audit_json() -> None:
    s = ModelSummaryView("digits", 2, ((2, 10000),), (1, 2), "READY")
    assert summary_to_dict(server_control.summary_to_pb(s)) == {
        "name": "digits", "state": "READY", "champion": 2, "traffic": {"2": 100.0}, "resident_versions": [1, 2],
        "rollout_state": None}
    at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    e = Event(id=9, at=at, kind="control", message="promoted 2", model="digits", version=2, data={"from": 1})
    assert event_to_dict(server_control.event_to_pb(e)) == {
        "id": 9, "at": "2025-01-02T03:04:05+00:00", "kind": "control", "model": "digits", "version": 2,
        "message": "promoted 2", "data": {"from": 1}}
    bare = Event(id=10, at=at, kind="lifecycle", message="server started")
    assert event_to_dict(server_control.event_to_pb(bare))["model"] is None
    a = AuditEntry(id=3, at=at, actor="alice@box (ipv4:127.0.0.1:5)", action="promote", model="digits", version=2,
                   before={"champion": 1}, after={"champion": 2}, reason="eval +3pp")
    assert audit_to_dict(server_control.audit_to_pb(a)) == {
        "id": 3, "at": "2025-01-02T03:04:05+00:00", "actor": "alice@box (ipv4:127.0.0.1:5)", "action": "promote",
        "model": "digits", "version": 2, "before": {"champion": 1}, "after": {"champion": 2}, "reason": "eval +3pp"}


# -- human output ---------------------------------------------------------------------------------


def _render(fn: Any, doc: Any) -> str:
    out = Console(file=io.StringIO(), width=200, markup=False)
    fn(doc, out)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text


def test_status_table() -> None:
    text = _render(control_cli.render_status, EXPECTED)
    assert "digits  champion v2  generation 7  key user_id" in text
    assert "traffic: v2 95%, v3 5%" in text and "shadows: v4" in text and "country=de -> v3" in text
    assert "previous champions: v1" in text
    assert "b" * 12 in text and "b" * 13 not in text  # a sha256 prefix, not the whole hash
    assert "2.0 KiB" in text and "1000 B" in text and "production" in text and "champion" in text
    assert "[model.pt]" in text  # brackets in messages are text, not rich markup
    assert "fleet: 1/2 replicas on generation 7" in text
    assert "pod-a (this)" in text and "cannot apply generation 7" in text


def test_status_prints_warnings_in_yellow_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(json=False)
    assert control_cli._show_status(args, EXPECTED, "promoted digits version 2") == 0
    out, err = capsys.readouterr()
    assert "promoted digits version 2" in out and "VERSION" in out
    assert "warning: version 1 was evicted; preloaded it again" in err


def test_json_mode_prints_one_document(capsys: pytest.CaptureFixture[str]) -> None:
    assert control_cli._show_status(argparse.Namespace(json=True), EXPECTED) == 0
    assert json.loads(capsys.readouterr().out) == EXPECTED


def test_models_events_audit_tables() -> None:
    models = [{"name": "digits", "state": "READY", "champion": 2, "traffic": {"2": 100.0}, "resident_versions": [1, 2],
               "rollout_state": None}]
    assert "v2 100%" in _render(control_cli.render_models, models)
    ev = {"id": 9, "at": "2025-01-02T03:04:05+00:00", "kind": "control", "model": "digits", "version": 2,
          "message": "promoted 2", "data": {}}
    assert "promoted 2" in _render(control_cli.render_events, [ev])
    assert control_cli.format_event(ev) == "     9  2025-01-02T03:04:05+00:00  control    digits:2  promoted 2"
    audit = [{"id": 3, "at": "t", "actor": "alice@box (ipv4:127.0.0.1:5)", "action": "promote", "model": "digits",
              "version": 2, "before": {"champion": 1}, "after": {"champion": 2}, "reason": "eval"}]
    text = _render(control_cli.render_audit, audit)
    assert "alice@box (ipv4:127.0.0.1:5)" in text and '{"champion":2}' in text


@pytest.mark.parametrize(("p", "text"), [(95.0, "95%"), (33.33, "33.33%"), (0.5, "0.5%"), (0.0, "0%"), (100.0, "100%")])
def test_format_percent(p: float, text: str) -> None:
    assert control_cli.format_percent(p) == text


# -- the servicer's thin edge, with a fake context (no server) ------------------------------------


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), peer: str = "ipv4:127.0.0.1:50412") -> None:
        self.metadata = metadata
        self._peer = peer
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


class FakePlane:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    async def status(self, model: str) -> ModelView:
        if model != "digits":
            raise ModelNotFound(f"model '{model}' is not in the repository")
        return VIEW

    async def rollback(self, *args: Any, **kwargs: Any) -> ModelView:
        self.calls.append(("rollback", args, kwargs))
        return VIEW

    async def register(self, *args: Any, **kwargs: Any) -> ModelView:
        self.calls.append(("register", args, kwargs))
        return VIEW

    async def set_traffic(self, *args: Any, **kwargs: Any) -> ModelView:
        self.calls.append(("set_traffic", args, kwargs))
        return VIEW


def _call(servicer: server_control.ControlServicer, method: str, request: Any, ctx: FakeContext) -> Any:
    async def go() -> Any:
        try:
            return await getattr(servicer, method)(request, ctx)
        except grpc.aio.AbortError:
            return None

    return asyncio.run(go())


def test_servicer_requires_the_token() -> None:
    servicer = server_control.ControlServicer(FakePlane(), Authenticator(control_token="s3cret"))  # type: ignore[arg-type]
    for md, says in (((), "--token-file"), ((("authorization", "Bearer nope"),), "not one the server accepts"),
                     ((("authorization", "s3cret"),), "--token-file")):
        ctx = FakeContext(md)  # loopback: no exemption once a control token is configured
        assert _call(servicer, "GetStatus", pb.ModelRequest(model="digits"), ctx) is None
        assert ctx.aborted is not None and ctx.aborted[0] is grpc.StatusCode.UNAUTHENTICATED
        assert says in ctx.aborted[1]
    ok = FakeContext((("authorization", "Bearer s3cret"),))
    assert _call(servicer, "GetStatus", pb.ModelRequest(model="digits"), ok).name == "digits"


def test_roles_decide_which_verbs_a_principal_may_call() -> None:
    plane = FakePlane()
    policy = AuthPolicy.parse({"principals": {
        "viewer-bot": {"roles": ["viewer"], "token_sha256": hash_token("v" * 20)},
        "ci": {"roles": ["operator"], "token_sha256": hash_token("o" * 20)},
        "payments": {"models": ["fraud"], "mtls": ["payments.internal"]}}})
    servicer = server_control.ControlServicer(plane, Authenticator(policy))  # type: ignore[arg-type]
    viewer, operator = (FakeContext((("authorization", f"Bearer {t * 20}"),), peer="ipv4:10.0.0.9:4000")
                        for t in "vo")
    assert _call(servicer, "GetStatus", pb.ModelRequest(model="digits"), viewer).name == "digits"
    assert _call(servicer, "Rollback", pb.RollbackRequest(model="digits"), viewer) is None
    assert viewer.aborted is not None and viewer.aborted[0] is grpc.StatusCode.PERMISSION_DENIED
    assert "needs the 'operator' role; 'viewer-bot' (token) has: viewer" in viewer.aborted[1]
    assert _call(servicer, "Rollback", pb.RollbackRequest(model="digits"), operator).name == "digits"
    assert plane.calls[-1][2]["actor"] == "ci (token, ipv4:10.0.0.9:4000)"
    _call(servicer, "Register", pb.RegisterRequest(model="digits", version=3), operator)
    assert operator.aborted is not None and operator.aborted[0] is grpc.StatusCode.PERMISSION_DENIED
    assert "'admin' role" in operator.aborted[1] and len(plane.calls) == 1
    # An auth file closes loopback: without a credential even a local caller is refused.
    local = FakeContext()
    _call(servicer, "GetStatus", pb.ModelRequest(model="digits"), local)
    assert local.aborted is not None and local.aborted[0] is grpc.StatusCode.UNAUTHENTICATED


LOCAL = "local (loopback, ipv4:127.0.0.1:50412)"


def test_servicer_maps_errors_and_converts_arguments() -> None:
    plane = FakePlane()
    servicer = server_control.ControlServicer(plane, None)  # type: ignore[arg-type]
    ctx = FakeContext()
    _call(servicer, "GetStatus", pb.ModelRequest(model="nope"), ctx)
    assert ctx.aborted == (grpc.StatusCode.NOT_FOUND, "model 'nope' is not in the repository")

    alice = FakeContext((("x-swapserve-actor", "alice@box"),))  # a self-declared name: never recorded
    _call(servicer, "Rollback", pb.RollbackRequest(model="digits", reason="bad canary"), alice)
    _call(servicer, "Rollback", pb.RollbackRequest(model="digits", to_version=1, force=True), FakeContext())
    _call(servicer, "SetTraffic", pb.SetTrafficRequest(
        model="digits", traffic=[pb.TrafficShare(version=1, weight_bp=9500), pb.TrafficShare(version=2, weight_bp=500)],
        shadows=[3], cohorts=[pb.CohortRule(attribute="country", value="de", version=2)]), alice)
    reg = pb.RegisterRequest(model="digits", version=3, metadata_json='{"framework": "torch"}', parent_version=2)
    reg.metrics["overall"].values["accuracy"] = 0.97
    _call(servicer, "Register", reg, alice)
    assert plane.calls == [
        ("rollback", ("digits", None), {"actor": LOCAL, "reason": "bad canary", "force": False}),
        ("rollback", ("digits", 1), {"actor": LOCAL, "reason": "", "force": True}),
        ("set_traffic", ("digits", [(1, 9500), (2, 500)]),
         {"shadows": [3], "cohorts": [("country", "de", 2)], "key_attribute": None,
          "actor": LOCAL, "reason": "", "force": False}),
        ("register", ("digits", 3),
         {"actor": LOCAL, "reason": "", "training_run": None, "data_ref": None,
          "parent_version": 2, "metrics": {"overall": {"accuracy": 0.97}}, "metadata": {"framework": "torch"}}),
    ]

    bad = FakeContext()
    _call(servicer, "Register", pb.RegisterRequest(model="digits", version=3, metadata_json="{nope"), bad)
    assert bad.aborted is not None and bad.aborted[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert "metadata_json is not valid JSON" in bad.aborted[1]


def test_metadata_must_be_an_object() -> None:
    assert server_control.metadata_from_json("") is None
    with pytest.raises(InvalidInput, match="JSON object, not list"):
        server_control.metadata_from_json("[1]")
