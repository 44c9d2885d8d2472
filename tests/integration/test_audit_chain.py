"""The audit log is a hash chain (promise 5, issue 16): an untouched log verifies; an edited, deleted or
inserted entry is found and named, on SQLite and on a real PostgreSQL, through the registry and through
``swapserve audit verify --registry URL`` (no server)."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from swapserve import errors
from swapserve.cli.control import main as cli
from swapserve.registry import Registry, chain
from swapserve.registry.audit import verify_registry
from swapserve.registry.engine import MIGRATIONS_DIR

from tests.fakes import FakeClock

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc).timestamp()


@pytest.fixture
def reg(url: str) -> Iterator[Registry]:
    r = Registry(url, clock=FakeClock(T0, step=0.001).utc)
    yield r
    r.close()


def write_log(reg: Registry) -> list[int]:
    """Entries through several writers (plain audit, register, publish); returns their ids, oldest first."""
    reg.audit(actor="alice", action="load", model="m", version=1, before={"resident": False},
              after={"resident": True, "tags": ("a", 1), 7: [1.5, None]}, reason="pre-warm")
    reg.register_version("m", 1, source_path="/repo/m/1", sha256="ab" * 32, actor="bob")
    reg.publish_deployment("m", champion=1, traffic=[(1, 10_000)], action="promote", actor="carol",
                           reason="first champion é ✓", expected_generation=0)
    reg.audit(actor="dave", action="traffic", model=None, version=None, reason="")
    reg.audit(actor="erin", action="unload", model="m", version=1, reason="done")
    return sorted(e.id for e in reg.audit_log(limit=1000))


@pytest.fixture
def sql(url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli(["audit", "verify", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_untouched_log_verifies_through_the_registry_and_the_cli(reg: Registry, url: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert reg.verify_audit().ok and reg.verify_audit().rows == 0  # an empty log is a valid chain
    ids = write_log(reg)
    v = reg.verify_audit()
    assert v.ok and v.rows == len(ids) == 5 and v.head_id == ids[-1] and len(v.head_hash) == 64
    assert verify_registry(url).to_dict() == v.to_dict()
    code, out, err = run_cli(capsys, "--registry", url)
    assert code == 0 and "audit log intact: 5 entries" in out and v.head_hash in out and not err
    code, out, _ = run_cli(capsys, "--registry", url, "--json", "--expect-head", v.head_hash)
    assert code == 0 and json.loads(out) == {**v.to_dict(), "ok": True}
    # a recorded head stays valid as the log grows
    reg.audit(actor="frank", action="rollback", model="m", reason="later")
    assert reg.verify_audit(expect_head=v.head_hash).ok


def test_an_edited_reason_is_found_and_named(reg: Registry, url: str, sql: sa.Engine,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    ids = write_log(reg)
    with sql.begin() as conn:
        conn.execute(sa.text("UPDATE audit_log SET reason = 'nothing to see' WHERE id = :i"), {"i": ids[2]})
    v = reg.verify_audit()
    assert not v.ok and [(p.id, p.kind) for p in v.problems] == [(ids[2], "edited")]
    code, _, err = run_cli(capsys, "--registry", url)
    assert code == 1 and f"BROKEN at entry {ids[2]}: audit entry {ids[2]} was edited" in err


def test_an_edit_with_a_recomputed_hash_still_breaks_the_chain(reg: Registry, sql: sa.Engine) -> None:
    ids = write_log(reg)
    with sql.begin() as conn:
        r = conn.execute(sa.text("SELECT prev_hash FROM audit_log WHERE id = :i"), {"i": ids[1]}).one()
        row = next(e for e in reg.audit_log(limit=100) if e.id == ids[1])
        fields = chain.entry_fields(id=row.id, at=row.at, actor="mallory", action=row.action, model=row.model,
                                    version=row.version, before=row.before, after=row.after, reason=row.reason)
        conn.execute(sa.text("UPDATE audit_log SET actor = 'mallory', hash = :h WHERE id = :i"),
                     {"h": chain.link(r.prev_hash, fields), "i": ids[1]})
    v = reg.verify_audit()
    assert [(p.id, p.kind) for p in v.problems] == [(ids[2], "deleted")]
    assert f"or entry {ids[1]} was rewritten" in v.problems[0].message


def test_a_deleted_entry_is_found_and_named(reg: Registry, url: str, sql: sa.Engine,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ids = write_log(reg)
    with sql.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log WHERE id = :i"), {"i": ids[2]})
    v = reg.verify_audit()
    assert [(p.id, p.kind) for p in v.problems] == [(ids[3], "deleted")]
    assert f"deleted between entry {ids[1]} and entry {ids[3]}" in v.problems[0].message
    code, _, err = run_cli(capsys, "--registry", url)
    assert code == 1 and f"BROKEN at entry {ids[3]}" in err
    with sql.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log WHERE id = :i"), {"i": ids[0]})
    assert [(p.id, p.kind) for p in reg.verify_audit().problems][0] == (ids[1], "deleted")


def test_entries_deleted_from_the_end_fail_an_expected_head(reg: Registry, sql: sa.Engine) -> None:
    write_log(reg)
    head = reg.verify_audit().head_hash
    with sql.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log WHERE id = (SELECT MAX(id) FROM audit_log)"))
    assert reg.verify_audit().ok  # without a recorded head a truncated end looks like a shorter log
    v = reg.verify_audit(expect_head=head)
    assert [(p.id, p.kind) for p in v.problems] == [(0, "head")]


def _bump_ids(conn: sa.Connection, by: int) -> None:
    """Leave a gap in the ids, as PostgreSQL does after a rolled-back write."""
    if conn.dialect.name == "sqlite":
        conn.execute(sa.text("UPDATE sqlite_sequence SET seq = seq + :n WHERE name = 'audit_log'"), {"n": by})
    else:
        conn.execute(sa.text("SELECT setval(pg_get_serial_sequence('audit_log', 'id'), "
                             "(SELECT MAX(id) FROM audit_log) + :n)"), {"n": by})


def test_inserted_entries_are_found_and_named(reg: Registry, url: str, sql: sa.Engine,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    first = write_log(reg)
    with sql.begin() as conn:
        _bump_ids(conn, 10)
    reg.audit(actor="gina", action="promote", model="m", version=1, reason="after a gap")
    assert reg.verify_audit().ok  # gaps in the ids are normal
    after = max(e.id for e in reg.audit_log(limit=1000))
    # A forger who knows the algorithm links a row into the gap after the last row before it.
    forged_id = first[-1] + 1
    with sql.begin() as conn:
        prev = conn.execute(sa.text("SELECT hash FROM audit_log WHERE id = :i"), {"i": first[-1]}).scalar_one()
        at = datetime(2025, 1, 1, 0, 0, 1, tzinfo=timezone.utc)
        fields = chain.entry_fields(id=forged_id, at=at, actor="alice", action="promote", model="m", version=9,
                                    before=None, after=None, reason="forged")
        conn.execute(sa.text("INSERT INTO audit_log (id, at, actor, action, model, version, reason, prev_hash, hash) "
                             "VALUES (:id, :at, 'alice', 'promote', 'm', 9, 'forged', :p, :h)"),
                     {"id": forged_id, "at": at if conn.dialect.name != "sqlite" else "2025-01-01 00:00:01.000000",
                      "p": prev, "h": chain.link(prev, fields)})
    v = reg.verify_audit()
    assert [(p.id, p.kind) for p in v.problems] == [(forged_id, "inserted")]
    assert f"entry {after} links to entry {first[-1]}" in v.problems[0].message
    code, _, err = run_cli(capsys, "--registry", url)
    assert code == 1 and f"BROKEN at entry {forged_id}: audit entry {forged_id} was inserted" in err
    # A row inserted by hand, knowing nothing of the chain.
    with sql.begin() as conn:
        conn.execute(sa.text("DELETE FROM audit_log WHERE id = :i"), {"i": forged_id})
        conn.execute(sa.text("INSERT INTO audit_log (at, actor, action, reason) VALUES (:at, 'x', 'y', 'z')"),
                     {"at": datetime(2025, 1, 2, tzinfo=timezone.utc)})
        hand = conn.execute(sa.text("SELECT MAX(id) FROM audit_log")).scalar_one()
    assert [(p.id, p.kind) for p in reg.verify_audit().problems] == [(hand, "unhashed")]


def test_concurrent_writers_keep_one_chain(reg: Registry) -> None:
    def write(i: int) -> None:
        for j in range(8):
            reg.audit(actor=f"w{i}", action="traffic", model=f"m{i % 2}", version=j, reason=f"{i}/{j}")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    v = reg.verify_audit()
    assert v.ok and v.rows == 48, v.problems[:3]


def test_rows_from_before_the_chain_are_chained_by_the_migration(url: str, sql: sa.Engine,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with sql.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004_fleet_rollouts")
        for i in range(3):
            conn.execute(sa.text("INSERT INTO audit_log (at, actor, action, model, version, before, after, reason) "
                                 "VALUES (:at, 'old', 'promote', 'm', :v, :b, :a, 'before the chain')"),
                         {"at": datetime(2024, 6, 1, 12, 0, i, 123456, tzinfo=timezone.utc)
                          if conn.dialect.name != "sqlite" else f"2024-06-01 12:00:0{i}.123456",
                          "v": i, "b": json.dumps({"traffic": {"1": 100.0}}), "a": json.dumps(None)})
    with pytest.raises(errors.FailedPrecondition, match="predates the audit chain"):
        verify_registry(url)
    code, _, err = run_cli(capsys, "--registry", url)
    assert code == 1 and "predates the audit chain" in err
    reg = Registry(url)
    try:
        v = reg.verify_audit()
        assert v.ok and v.rows == 3
        reg.audit(actor="new", action="rollback", model="m", reason="after the upgrade")
        assert reg.verify_audit().ok and reg.verify_audit(expect_head=v.head_hash).ok
    finally:
        reg.close()


def test_verify_of_an_unreachable_or_empty_registry_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--registry", f"sqlite:///{tmp_path / 'nothing.db'}")
    assert code == 1 and "no audit_log table" in err
    code, _, err = run_cli(capsys, "--registry", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert code == 3 and "cannot read the registry" in err
