"""ControlPlane: operator actions validated first, recorded before published, audited, restored after a restart."""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from swapserve.errors import FailedPrecondition, InvalidInput, ModelNotFound
from swapserve.registry import RolloutRecord
from swapserve.types import ModelView
from tests.unit.stack import Stack, make_stack, run

ALICE = "alice"


def served_by(stack: Stack, n: int = 400) -> Counter[int]:
    return Counter(stack.manager.route("m", "", {"routing_key": f"k{i}"})[0].version for i in range(n))


def versions(view: ModelView) -> dict[int, tuple[str, bool]]:
    return {v.version: (v.state, v.resident) for v in view.versions}


async def resident(stack: Stack, *vs: int) -> None:
    for v in vs:
        await stack.control.load("m", v, actor=ALICE)


def test_promote_moves_all_traffic_and_keeps_the_old_champion_resident(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        await resident(stack, 1, 2)
        await c.promote("m", 1, actor=ALICE, reason="baseline")
        view = await c.promote("m", 2, actor=ALICE, reason="better on eval")
        assert (view.champion, view.previous_champions, view.traffic) == (2, (1,), ((2, 10_000),))
        assert versions(view) == {1: ("ready", True), 2: ("serving", True)}  # rollback loads nothing
        assert served_by(stack) == {2: 400}
        deployment = stack.registry.current_deployment("m")
        assert deployment is not None and (deployment.champion, deployment.generation) == (2, view.generation)
        promotes = [(a.actor, a.version, a.reason) for a in await c.audit_log("m") if a.action == "promote"]
        assert sorted(promotes) == [(ALICE, 1, "baseline"), (ALICE, 2, "better on eval")]
        await stack.manager.close()

    run(scenario())


def test_rollback_steps_back_one_champion_at_a_time(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2, 3))
    c = stack.control

    async def scenario() -> None:
        await resident(stack, 1, 2, 3)
        for v in (1, 2, 3):
            await c.promote("m", v, actor=ALICE)
        assert (await c.rollback("m", actor=ALICE)).champion == 2
        view = await c.rollback("m", actor=ALICE)
        assert (view.champion, view.previous_champions) == (1, ())
        assert served_by(stack) == {1: 400}
        with pytest.raises(FailedPrecondition, match="no previous champion to roll back to"):
            await c.rollback("m", actor=ALICE)
        await stack.manager.close()

    run(scenario())


def test_rollback_to_an_evicted_champion_preloads_it_before_switching(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        await resident(stack, 1, 2)
        await c.promote("m", 1, actor=ALICE)
        await c.promote("m", 2, actor=ALICE)
        await c.unload("m", 1, actor=ALICE)
        view = await c.rollback("m", actor=ALICE)
        assert view.champion == 1 and versions(view)[1] == ("serving", True)
        assert "version 1 was not resident; preloaded and warmed it before switching" in view.warnings
        assert served_by(stack) == {1: 400}
        await stack.manager.close()

    run(scenario())


def test_a_traffic_split_is_validated_before_anything_changes(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2, 3))
    c = stack.control

    async def scenario() -> None:
        await resident(stack, 1, 2)
        before = await c.promote("m", 1, actor=ALICE)
        with pytest.raises(InvalidInput, match="must sum to 100%, these sum to 90%"):
            await c.set_traffic("m", [(1, 6000), (2, 3000)], actor=ALICE)
        with pytest.raises(InvalidInput, match=r"version\(s\) \[3\] are not resident"):
            await c.set_traffic("m", [(1, 9000), (3, 1000)], actor=ALICE)
        with pytest.raises(InvalidInput, match="traffic is empty"):
            await c.set_traffic("m", [], actor=ALICE)
        unchanged = await c.status("m")
        assert (unchanged.generation, unchanged.traffic) == (before.generation, before.traffic)
        assert not [a for a in await c.audit_log("m") if a.action == "traffic"]

        view = await c.set_traffic("m", [(1, 7000), (2, 3000)], actor=ALICE, reason="canary")
        assert (view.champion, view.traffic) == (1, ((1, 7000), (2, 3000)))
        counts = served_by(stack, 2000)
        assert 0.25 < counts[2] / 2000 < 0.35
        view = await c.set_traffic("m", [(2, 10_000)], actor=ALICE)  # the champion got nothing: v2 takes over
        assert (view.champion, view.previous_champions) == (2, (1,))
        await stack.manager.close()

    run(scenario())


def test_promote_and_unload_refuse_what_would_break_serving(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        await resident(stack, 1)
        await c.promote("m", 1, actor=ALICE)
        with pytest.raises(FailedPrecondition, match=r"version 2 is not loaded; .*`swapserve load m 2` first"):
            await c.promote("m", 2, actor=ALICE)
        with pytest.raises(FailedPrecondition, match=r"version 1 is serving \(100% of traffic\); move traffic away"):
            await c.unload("m", 1, actor=ALICE)
        with pytest.raises(ModelNotFound, match="`swapserve models` lists the models"):
            await c.promote("nope", 1, actor=ALICE)
        assert served_by(stack) == {1: 400}
        await stack.manager.close()

    run(scenario())


def test_a_running_rollout_blocks_operator_changes_unless_forced_and_audited(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        await resident(stack, 1, 2)
        await c.promote("m", 1, actor=ALICE)
        rollout = stack.registry.save_rollout(RolloutRecord(model="m", challenger=2, champion=1, state="running"))
        with pytest.raises(FailedPrecondition, match=f"has a running rollout \\(id {rollout.id}.*--force"):
            await c.promote("m", 2, actor=ALICE)
        assert (await c.status("m")).champion == 1
        await c.promote("m", 2, actor=ALICE, reason="hotfix", force=True)
        audit = [a for a in await c.audit_log("m") if a.action == "promote" and a.version == 2]
        assert [a.reason for a in audit] == [f"[forced over rollout {rollout.id}] hotfix"]
        await stack.manager.close()

    run(scenario())


def test_a_stale_view_catches_up_first_and_a_lost_race_publishes_nothing(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        await resident(stack, 1, 2)
        await c.promote("m", 1, actor=ALICE)
        # Another replica records a deployment meanwhile: this one catches up, then changes it.
        stack.registry.publish_deployment("m", champion=1, traffic=[(1, 5000), (2, 5000)], action="traffic",
                                          actor="replica-b")
        view = await c.promote("m", 2, actor=ALICE)
        assert (view.champion, view.generation, view.previous_champions) == (2, 3, (1,))
        assert served_by(stack) == {2: 400}
        assert [d.actor for d in stack.registry.deployment_history("m")] == [ALICE, "replica-b", ALICE]
        # Another writer wins every time: refused after the retries, nothing published.
        real = stack.registry.record_decision

        def always_beaten(model: str, **kw: object) -> object:
            stack.registry.publish_deployment("m", champion=2, traffic=[(2, 10_000)], action="promote",
                                              actor="replica-b")
            return real(model, **kw)  # type: ignore[arg-type]

        stack.registry.record_decision = always_beaten  # type: ignore[method-assign]
        with pytest.raises(FailedPrecondition, match="generation"):
            await c.set_traffic("m", [(1, 5000), (2, 5000)], actor=ALICE)
        assert served_by(stack) == {2: 400}  # nothing of the refused change was published
        await stack.manager.close()

    run(scenario())


def test_a_restart_restores_champion_history_and_split(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        await resident(stack, 1, 2)
        await c.promote("m", 1, actor=ALICE)
        await c.promote("m", 2, actor=ALICE)
        before = await c.set_traffic("m", [(2, 8000), (1, 2000)], actor=ALICE)
        await stack.manager.close()
        again = stack.restarted()
        await again.manager.restore()
        after = await again.control.status("m")
        assert (after.champion, after.previous_champions, after.traffic, after.generation) == \
            (before.champion, before.previous_champions, before.traffic, before.generation)
        assert set(served_by(again)) == {1, 2}
        await again.manager.close()

    run(scenario())


def test_register_records_the_files_hash_and_lineage(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        view = await c.register("m", 2, actor=ALICE, training_run="run-9", parent_version=1,
                                metrics={"overall": {"accuracy": 0.93}})
        (v2,) = [v for v in view.versions if v.version == 2]
        digest = hashlib.sha256((stack.repo / "m" / "2" / "model.pt").read_bytes()).hexdigest()
        assert (v2.state, v2.sha256, v2.training_run, v2.parent_version) == ("registered", digest, "run-9", 1)
        assert stack.registry.metrics("m", 2, source="offline") == {"overall": {"accuracy": 0.93}}
        with pytest.raises(InvalidInput, match="versions are positive integers"):
            await c.register("m", 0, actor=ALICE)
        with pytest.raises(ModelNotFound, match="no version directory 5"):
            await c.register("m", 5, actor=ALICE)
        await stack.manager.close()

    run(scenario())


def test_the_repository_api_loads_and_unloads_through_the_control_plane(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1, 2))
    c = stack.control

    async def scenario() -> None:
        for bad in ("../m", "/etc", "x" * 300):
            with pytest.raises(InvalidInput, match="not allowed"):
                await c.load_model(bad, actor=ALICE)
            with pytest.raises(InvalidInput, match="not allowed"):
                await c.unload_model(bad, actor=ALICE)
        view = await c.load_model("m", actor="repository-api (ipv4:127.0.0.1:5)")
        assert view.champion == 2 and stack.manager.server_ready()
        await c.unload_model("m", actor="repository-api (ipv4:127.0.0.1:5)")
        assert not stack.manager.is_ready("m") and stack.manager.server_ready()
        audit = [(a.action, a.actor) for a in await c.audit_log("m")]
        assert audit[:2] == [("repository_unload", "repository-api (ipv4:127.0.0.1:5)"),
                             ("repository_load", "repository-api (ipv4:127.0.0.1:5)")]
        # A champion the control plane recorded is not unloaded by the repository API.
        await c.load_model("m", actor=ALICE)
        await c.promote("m", 2, actor=ALICE)
        with pytest.raises(FailedPrecondition, match=r"recorded by the control plane.*swapserve promote\|traffic"):
            await c.unload_model("m", actor=ALICE)
        assert served_by(stack) == {2: 400}
        # Nor anything during a rollout (a reload could replace the versions it compares).
        await c.load("m", 1, actor=ALICE)
        stack.registry.save_rollout(RolloutRecord(model="m", challenger=1, champion=2, state="running"))
        with pytest.raises(FailedPrecondition, match="running rollout") as err:
            await c.load_model("m", actor=ALICE)
        assert "--force" not in err.value.message  # the repository API cannot force
        with pytest.raises(FailedPrecondition, match="running rollout"):
            await c.unload_model("m", actor=ALICE)
        assert served_by(stack) == {2: 400}
        await stack.manager.close()

    run(scenario())


def test_control_verbs_validate_names_and_versions(tmp_path: Path) -> None:
    stack = make_stack(tmp_path, (1,))
    c = stack.control

    async def scenario() -> None:
        for verb in (c.load, c.register, c.unload):
            with pytest.raises(InvalidInput, match="not allowed"):
                await verb("../m", 1, actor=ALICE)  # type: ignore[operator]
            with pytest.raises(InvalidInput, match="positive integers"):
                await verb("m", 0, actor=ALICE)  # type: ignore[operator]
        await stack.manager.close()

    run(scenario())


def test_repository_access_is_closed_by_default_and_names_the_flag() -> None:
    from swapserve.errors import PermissionDenied
    from swapserve.server.access import RepositoryAccess

    from swapserve.errors import Unauthenticated
    from swapserve.server.auth import Authenticator

    class Context:
        def __init__(self, peer: str, token: str = "") -> None:
            self._peer, self._token = peer, token

        def peer(self) -> str:
            return self._peer

        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {self._token}"),) if self._token else ()

        def auth_context(self) -> dict[str, list[bytes]]:
            return {}

    remote = Context("ipv4:10.0.0.7:5123")
    with pytest.raises(PermissionDenied, match=r"--repository-api \(SWAPSERVE_REPOSITORY_API=true\)"):
        RepositoryAccess().authorize("RepositoryModelLoad", remote)
    with pytest.raises(Unauthenticated, match="RepositoryModelLoad needs a credential"):
        RepositoryAccess(enabled=True).authorize("RepositoryModelLoad", remote)
    assert RepositoryAccess(enabled=True).authorize("RepositoryModelLoad", Context("ipv4:127.0.0.1:5123")) == \
        "local (loopback, ipv4:127.0.0.1:5123)"
    admin = RepositoryAccess(enabled=True, auth=Authenticator(control_token="t" * 20))
    assert admin.authorize("RepositoryModelUnload", Context("ipv4:10.0.0.7:5123", "t" * 20)) == \
        "admin (control-token, ipv4:10.0.0.7:5123)"
