"""The registry keeps promise 5 ("nothing is lost") on SQLite and on a real PostgreSQL."""
from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from swapserve import errors
from swapserve.registry import Deployment, Registry, RolloutRecord
from swapserve.registry.models import Base
from swapserve.routing.policy import RoutingPolicy

# `tests.pg` must be importable however pytest was started (rootdir on sys.path).
from tests.fakes import FakeClock

REGISTRY_T0 = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()
SHA = {v: f"{v:02x}" * 32 for v in range(1, 10)}


@pytest.fixture
def reg(url: str) -> Iterator[Registry]:
    # One millisecond per reading: distinct, ordered, deterministic times.
    r = Registry(url, clock=FakeClock(REGISTRY_T0, step=0.001).utc)
    yield r
    r.close()


def register(reg: Registry, model: str, *versions: int) -> None:
    for v in versions:
        reg.register_version(model, v, source_path=f"/repo/{model}/{v}", sha256=SHA[v])


def publish(reg: Registry, model: str, change: Callable[[RoutingPolicy | None], RoutingPolicy], *, action: str,
            actor: str, reason: str = "") -> Deployment:
    """What ControlPlane.publish records: a transition of the current deployment, at the expected generation."""
    cur = reg.current_deployment(model)
    p = change(RoutingPolicy.from_deployment(cur) if cur is not None else None)
    return reg.publish_deployment(
        model, champion=p.champion, traffic=list(p.traffic), shadows=list(p.shadows), cohorts=list(p.cohorts),
        key_attribute=p.key_attribute, previous_champions=list(p.previous_champions), action=action, actor=actor,
        reason=reason, expected_generation=cur.generation if cur is not None else 0)


def promote(reg: Registry, model: str, version: int, *, actor: str, reason: str = "") -> Deployment:
    return publish(reg, model, lambda p: (p or RoutingPolicy.single(version)).promoted(version), action="promote",
                   actor=actor, reason=reason)


def rollback(reg: Registry, model: str, *, actor: str, reason: str = "") -> Deployment:
    def back(p: RoutingPolicy | None) -> RoutingPolicy:
        assert p is not None
        return p.rolled_back()

    return publish(reg, model, back, action="rollback", actor=actor, reason=reason)


# -- schema -----------------------------------------------------------------------------


def _head_revision() -> str:
    """The newest shipped migration (one head: migrations form a line)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from swapserve.registry.store import MIGRATIONS_DIR

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    (head,) = ScriptDirectory.from_config(cfg).get_heads()
    return head


def test_migration_applies_on_empty_db_and_is_a_noop_the_second_time(url: str) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() is None
        first = Registry(url)
        head = _head_revision()
        assert first.schema_revision() == head
        register(first, "m", 1)
        first.close()
        with engine.connect() as conn:
            tables_before = sorted(sa.inspect(conn).get_table_names())
        second = Registry(url)
        assert second.schema_revision() == head
        assert second.get_version("m", 1) is not None
        second.close()
        with engine.connect() as conn:
            assert sorted(sa.inspect(conn).get_table_names()) == tables_before
            assert {"model_versions", "deployments", "rollouts", "audit_log", "events",
                    "metric_values", "alembic_version"} <= set(tables_before)
            # The ORM models and the migrations describe the same schema.
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()


def test_default_url_lives_under_swapserve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Registry.default_url(tmp_path) == f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("SWAPSERVE_HOME", str(tmp_path / "home"))
    with Registry() as r:
        register(r, "m", 1)
    assert (tmp_path / "home" / "registry.db").is_file()


def test_sqlite_uses_wal_and_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Registry(url).close()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


# -- versions -----------------------------------------------------------------------------


def test_register_is_idempotent_and_refuses_different_files(reg: Registry) -> None:
    first = reg.register_version("resnet", 1, source_path="/repo/resnet/1", sha256=SHA[1].upper(),
                                 training_run="run-7", data_ref="s3://d/v1", metadata={"lr": 0.1},
                                 actor="alice", reason="new model")
    assert first.sha256 == SHA[1] and first.state == "registered" and first.stage == "staging"
    again = reg.register_version("resnet", 1, source_path="/elsewhere", sha256=SHA[1])
    assert again == first
    with pytest.raises(errors.AlreadyExists) as exc:
        reg.register_version("resnet", 1, source_path="/repo/resnet/1b", sha256=SHA[2])
    assert SHA[1] in exc.value.message and SHA[2] in exc.value.message and "resnet" in exc.value.message
    child = reg.register_version("resnet", 2, source_path="/repo/resnet/2", sha256=SHA[2], parent_version=1)
    assert child.parent_version == 1
    assert [v.version for v in reg.list_versions("resnet")] == [1, 2]
    assert reg.list_models() == ["resnet"]
    assert reg.get_version("resnet", 3) is None
    audit = reg.audit_log("resnet", action="register")
    assert [(a.version, a.actor) for a in audit] == [(2, "system"), (1, "alice")]
    assert audit[1].reason == "new model" and audit[1].before is None
    assert audit[1].after["metadata"] == {"lr": 0.1}
    assert [e.version for e in reg.events("resnet", kinds=["registry"])] == [1, 2]


def test_lifecycle_state_changes_emit_events(reg: Registry) -> None:
    register(reg, "m", 1)
    for state in ("loading", "warming", "ready", "serving"):
        reg.set_state("m", 1, state, reason=f"to {state}")
    v = reg.get_version("m", 1)
    assert v is not None and v.state == "serving" and v.state_reason == "to serving"
    assert v.deployed_at is not None
    first_served = v.deployed_at
    reg.set_state("m", 1, "draining")
    reg.set_state("m", 1, "serving")
    reg.mark_deployed("m", 1)
    assert reg.require_version("m", 1).deployed_at == first_served
    events = reg.events("m", kinds=["lifecycle"])
    assert [(e.data["from"], e.data["to"]) for e in events][:4] == [
        ("registered", "loading"), ("loading", "warming"), ("warming", "ready"), ("ready", "serving")]
    with pytest.raises(errors.ModelNotFound, match="'m' version 9"):
        reg.set_state("m", 9, "loading")
    with pytest.raises(errors.InvalidInput, match="use one of"):
        reg.set_state("m", 1, "exploded")


def test_stage_changes_are_audited(reg: Registry) -> None:
    register(reg, "m", 1)
    rec = reg.set_stage("m", 1, "production", actor="bob", reason="approved")
    assert rec.stage == "production"
    (entry,) = reg.audit_log("m", action="stage")
    assert (entry.actor, entry.before, entry.after, entry.reason) == (
        "bob", {"stage": "staging"}, {"stage": "production"}, "approved")
    with pytest.raises(errors.InvalidInput, match="staging, production, archived"):
        reg.set_stage("m", 1, "prod", actor="bob")
    rec = reg.set_rollback_thresholds("m", 1, {"accuracy_drop_pp": 1.0}, actor="bob")
    assert rec.rollback_thresholds == {"accuracy_drop_pp": 1.0}


def test_metrics_by_slice_latest_value_wins(reg: Registry) -> None:
    register(reg, "m", 1)
    reg.record_metrics("m", 1, {"overall": {"accuracy": 0.90, "f1": 0.8}, "mobile": {"accuracy": 0.85}})
    reg.record_metrics("m", 1, {"overall": {"accuracy": 0.91}}, source="live")
    assert reg.metrics("m", 1) == {"overall": {"accuracy": 0.91, "f1": 0.8}, "mobile": {"accuracy": 0.85}}
    assert reg.metrics("m", 1, source="offline")["overall"]["accuracy"] == 0.90
    assert reg.metrics("m", 1, source="live") == {"overall": {"accuracy": 0.91}}
    with pytest.raises(errors.InvalidInput, match="finite"):
        reg.record_metrics("m", 1, {"overall": {"accuracy": float("nan")}})
    with pytest.raises(errors.InvalidInput, match="offline, live"):
        reg.record_metrics("m", 1, {"overall": {"accuracy": 1.0}}, source="guess")
    with pytest.raises(errors.ModelNotFound):
        reg.record_metrics("m", 2, {"overall": {"accuracy": 1.0}})


# -- deployments ---------------------------------------------------------------------------


def test_publish_increments_generation_and_audits_in_one_transaction(reg: Registry) -> None:
    register(reg, "m", 1, 2, 3)
    assert reg.current_deployment("m") is None
    d1 = reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], action="deploy", actor="ci")
    d2 = reg.publish_deployment(
        "m", champion=1, traffic=[(1, 9_000), (2, 1_000)], shadows=[3], cohorts=[("country", "fr", 2)],
        key_attribute="user_id", action="canary", actor="rollout", reason="stage 1",
    )
    assert (d1.generation, d2.generation) == (1, 2)
    assert d2.weight_of(2) == 1_000 and d2.versions == (1, 2, 3)
    assert reg.current_deployment("m") == d2
    assert reg.deployment_history("m") == [d2, d1]
    assert reg.live_models() == ["m"]
    entries = reg.audit_log("m", action="canary")
    assert len(entries) == 1
    assert entries[0].before == d1.to_dict() and entries[0].after == d2.to_dict()
    json.dumps([d2.to_dict(), entries[0].to_dict()])  # JSON-safe for the CLI's --json

    n_audit = len(reg.audit_log("m"))
    bad_traffic = [
        [(1, 9_000), (2, 999)],                 # does not sum to 10000
        [(1, 5_000), (1, 5_000)],               # duplicate version
        [(1, 11_000), (2, -1_000)],             # weight out of range
        [],
    ]
    for traffic in bad_traffic:
        with pytest.raises(errors.InvalidInput, match="model 'm'"):
            reg.publish_deployment("m", champion=1, traffic=traffic, action="x", actor="ci")
    with pytest.raises(errors.InvalidInput, match="champion and shadow"):
        reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], shadows=[1], action="x", actor="ci")
    with pytest.raises(errors.ModelNotFound, match=r"\[7\]"):
        reg.publish_deployment("m", champion=1, traffic=[(1, 5_000), (7, 5_000)], action="x", actor="ci")
    # Fails after the deployment row was written (the audit row needs an actor): both go.
    with pytest.raises(errors.InvalidInput, match="actor"):
        reg.publish_deployment("m", champion=2, traffic=[(2, 10_000)], action="promote", actor="")
    assert reg.current_deployment("m") == d2
    assert len(reg.deployment_history("m")) == 2
    assert len(reg.audit_log("m")) == n_audit


def test_expected_generation_is_optimistic_concurrency(reg: Registry) -> None:
    register(reg, "m", 1, 2)
    with pytest.raises(errors.FailedPrecondition, match="generation 0, not 1"):
        reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], action="deploy", actor="a",
                               expected_generation=1)
    d1 = reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], action="deploy", actor="a",
                                expected_generation=0)
    reg.publish_deployment("m", champion=1, traffic=[(1, 5_000), (2, 5_000)], action="traffic",
                           actor="replica-a", expected_generation=d1.generation)
    with pytest.raises(errors.FailedPrecondition, match="replica-a") as exc:
        reg.publish_deployment("m", champion=1, traffic=[(1, 9_000), (2, 1_000)], action="traffic",
                               actor="replica-b", expected_generation=d1.generation)
    assert exc.value.code.name == "FAILED_PRECONDITION"
    cur = reg.current_deployment("m")
    assert cur is not None and cur.generation == 2 and cur.actor == "replica-a"


def test_champion_history_promote_pushes_rollback_pops(reg: Registry) -> None:
    register(reg, "m", 1, 2, 3)
    promote(reg, "m", 1, actor="a")
    promote(reg, "m", 2, actor="a")
    # A canary keeps the champion and therefore the history.
    canary = reg.publish_deployment("m", champion=2, traffic=[(2, 9_500), (3, 500)], action="canary",
                                    actor="rollout")
    assert canary.previous_champions == (1,)
    d = promote(reg, "m", 3, actor="a", reason="canary passed")
    assert (d.champion, d.previous_champions, d.traffic[0].weight_bp) == (3, (1, 2), 10_000)
    d = rollback(reg, "m", actor="oncall", reason="accuracy drop on mobile")
    assert (d.champion, d.previous_champions, d.action) == (2, (1,), "rollback")
    d = rollback(reg, "m", actor="oncall")
    assert (d.champion, d.previous_champions) == (1, ())
    with pytest.raises(errors.FailedPrecondition, match="no previous champion"):
        rollback(reg, "m", actor="oncall")
    assert reg.current_deployment("other") is None  # no deployment: nothing to roll back
    assert [e.after["champion"] for e in reversed(reg.audit_log("m", limit=100))
            if e.after and "champion" in e.after] == [1, 2, 2, 3, 2, 1]


def test_concurrent_publishers_never_duplicate_a_generation(reg: Registry) -> None:
    register(reg, "m", 1, 2)
    n_threads, per_thread = 6, 5
    failures: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def blind(i: int) -> None:
        try:
            start.wait()
            for j in range(per_thread):
                reg.publish_deployment("m", champion=1, traffic=[(1, 10_000 - i - j), (2, i + j)],
                                       action="traffic", actor=f"t{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def careful(i: int) -> None:
        try:
            start.wait()
            done = 0
            while done < per_thread:
                cur = reg.current_deployment("m")
                gen = cur.generation if cur else 0
                try:
                    reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], action="traffic",
                                           actor=f"c{i}", expected_generation=gen)
                    done += 1
                except errors.FailedPrecondition:
                    pass
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=blind if i % 2 else careful, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures
    gens = [d.generation for d in reg.deployment_history("m", limit=1000)]
    assert sorted(gens) == list(range(1, n_threads * per_thread + 1))
    assert len(reg.audit_log("m", action="traffic", limit=1000)) == n_threads * per_thread


# -- rollouts ------------------------------------------------------------------------------


def test_rollouts_one_active_per_model(reg: Registry) -> None:
    register(reg, "m", 1, 2, 3)
    register(reg, "other", 1, 2)
    plan = {"stages": [{"traffic_bp": 100, "min_requests": 500}, {"traffic_bp": 1_000}]}
    r = reg.save_rollout(RolloutRecord(model="m", challenger=2, champion=1, plan=plan))
    assert r.id is not None and r.started_at is not None and r.active
    assert reg.active_rollout("m") == r
    with pytest.raises(errors.FailedPrecondition, match=f"rollout {r.id}"):
        reg.save_rollout(RolloutRecord(model="m", challenger=3, champion=1))
    reg.save_rollout(RolloutRecord(model="other", challenger=2, champion=1))  # other models are free

    r2 = reg.save_rollout(dataclasses.replace(r, stage_index=1, evidence={"accuracy_delta_pp": 0.3}))
    assert (r2.id, r2.stage_index, r2.evidence) == (r.id, 1, {"accuracy_delta_pp": 0.3})
    with pytest.raises(errors.FailedPrecondition, match="reload"):
        reg.save_rollout(dataclasses.replace(r, state="paused"))  # stale copy
    done = reg.save_rollout(dataclasses.replace(r2, state="rolled_back"))
    assert not done.active and reg.active_rollout("m") is None
    r3 = reg.save_rollout(RolloutRecord(model="m", challenger=3, champion=1, strategy="shadow"))
    assert [x.id for x in reg.rollouts("m")] == [r3.id, r.id]
    with pytest.raises(errors.FailedPrecondition):
        reg.save_rollout(dataclasses.replace(done, state="running"))  # would be a second active one
    with pytest.raises(errors.InvalidInput, match="unknown rollout state"):
        reg.save_rollout(RolloutRecord(model="m", challenger=3, champion=1, state="vibing"))
    kinds = [(e.data["rollout_id"], e.data["state"]) for e in reg.events("m", kinds=["rollout"])]
    assert kinds == [(r.id, "running"), (r.id, "running"), (r.id, "rolled_back"), (r3.id, "running")]
    json.dumps(r3.to_dict())


# -- audit + events ------------------------------------------------------------------------


def test_events_page_by_after_id(reg: Registry) -> None:
    assert reg.events() == [] and reg.last_event_id() == 0
    for i in range(25):
        reg.add_event("drift", f"psi={i}", model="a" if i % 2 else "b", data={"i": i})
    seen: list[int] = []
    after = 0
    while page := reg.events(after_id=after, limit=10):
        assert len(page) <= 10
        seen += [e.data["i"] for e in page]
        after = page[-1].id
    assert seen == list(range(25))
    assert after == reg.last_event_id()
    assert [e.data["i"] for e in reg.events("a")] == list(range(1, 25, 2))
    ids = [e.id for e in reg.events(limit=100)]
    assert ids == sorted(ids) and len(set(ids)) == 25


def test_audit_entries_are_kept(reg: Registry) -> None:
    e = reg.audit(actor="alice", action="load", model="m", version=3, before={"resident": False},
                  after={"resident": True}, reason="pre-warm for rollout")
    assert reg.audit_log() == [e]
    assert e.at.tzinfo is not None and e.to_dict()["at"].endswith("+00:00")


# -- nothing lost --------------------------------------------------------------------------


def test_reopening_restores_everything(url: str) -> None:
    reg = Registry(url)
    register(reg, "m", 1, 2)
    reg.set_state("m", 2, "ready", reason="warmed")
    reg.record_metrics("m", 2, {"overall": {"accuracy": 0.93}})
    promote(reg, "m", 1, actor="a")
    dep = reg.publish_deployment("m", champion=1, traffic=[(1, 9_000), (2, 1_000)], shadows=[],
                                 cohorts=[("tier", "beta", 2)], key_attribute="user_id",
                                 action="canary", actor="rollout", reason="stage 1")
    ro = reg.save_rollout(RolloutRecord(model="m", challenger=2, champion=1, plan={"stages": [1, 2]},
                                        stage_index=1, evidence={"n": 1000}))
    snapshot = (reg.list_versions("m"), reg.deployment_history("m"), reg.audit_log(), reg.events(),
                reg.metrics("m", 2))
    reg.close()

    reopened = Registry(url)
    try:
        assert reopened.current_deployment("m") == dep
        assert reopened.active_rollout("m") == ro
        assert (reopened.list_versions("m"), reopened.deployment_history("m"), reopened.audit_log(),
                reopened.events(), reopened.metrics("m", 2)) == snapshot
        v2 = reopened.require_version("m", 2)
        assert (v2.state, v2.state_reason) == ("ready", "warmed")
        # New events continue after the old ones.
        assert reopened.add_event("control", "hello").id > snapshot[3][-1].id
    finally:
        reopened.close()


def test_in_memory_sqlite_is_shared_between_threads() -> None:
    with Registry("sqlite://") as reg:
        register(reg, "m", 1)
        out: list[Deployment] = []
        t = threading.Thread(target=lambda: out.append(
            promote(reg, "m", 1, actor="thread")))
        t.start()
        t.join()
        assert reg.current_deployment("m") == out[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(-10, 10_500)), max_size=5))
def test_traffic_is_accepted_exactly_when_it_is_a_valid_split(traffic: list[tuple[int, int]]) -> None:
    valid = (
        bool(traffic)
        and len({v for v, _ in traffic}) == len(traffic)
        and all(0 <= w <= 10_000 for _, w in traffic)
        and sum(w for _, w in traffic) == 10_000
    )
    with Registry("sqlite://") as reg:
        register(reg, "m", 1, 2, 3, 4)
        if valid:
            d = reg.publish_deployment("m", champion=traffic[0][0], traffic=traffic, action="t", actor="h")
            assert [(t.version, t.weight_bp) for t in d.traffic] == traffic
        else:
            with pytest.raises(errors.InvalidInput, match="model 'm'"):
                reg.publish_deployment("m", champion=1, traffic=traffic, action="t", actor="h")
            assert reg.current_deployment("m") is None


def test_concurrent_rollout_starts_leave_exactly_one_active(reg: Registry) -> None:
    register(reg, "m", 1, 2)
    results: list[object] = []
    start = threading.Barrier(6)

    def begin() -> None:
        start.wait()
        try:
            results.append(reg.save_rollout(RolloutRecord(model="m", challenger=2, champion=1)))
        except errors.FailedPrecondition as exc:
            results.append(exc)

    threads = [threading.Thread(target=begin) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    started = [r for r in results if isinstance(r, RolloutRecord)]
    assert len(results) == 6 and len(started) == 1
    assert reg.active_rollout("m") == started[0]
