"""No client steers a rollout (issue 14): a real server, the real CLI, honest and adversarial clients
as separate processes (``tests/e2e/clients.py``), tritonclient for the id checks.

- An A/A canary (v1 and v2: the same weights in different files) under honest traffic and labels
  plus an adversary who pins the challenger, sends it malformed requests and reports false labels
  (without a credential; with one; with one under the plan's reporter cap, also lying about its
  own routed requests) is never rolled back: each run ends ``promoted``.
- A canary worse on one slice (85 points on slice c) plus an adversary reporting its answers correct is still rolled back,
  on that slice.
- Guessed ids label nothing; re-sending an id is refused (ALREADY_EXISTS).
"""
from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.serverproc import ROOT, SWAPSERVE, ServerProcess

HONEST_TOKENS = [secrets.token_hex(16) for _ in range(80)]  # a fleet of labellers, one credential each
MALLORY = secrets.token_hex(16)
#: A short canary, the challenger at 100%, a short watch. The cap keeps one reporter under 2% of a stage's labels per version.
PLAN = """
stages:
  - {{name: canary, traffic: 50, min_duration: 4s, min_samples: 150}}
  - {{name: full, traffic: 100, min_duration: 2s}}
watch: 2s
{gates}
"""
CAPPED = "gates: {max_reporter_share: 0.02}"


def clients(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.e2e.clients", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)  # type: ignore[no-any-return]


class Ctl:
    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SWAPSERVE, *argv, "--url", self.srv.control_url], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    def json(self, *argv: str) -> Any:
        done = self.run(*argv, "--json")
        assert done.returncode == 0, f"{argv}: {done.stderr}\n{self.srv.log()[-3000:]}"
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    subprocess.run([sys.executable, "-m", "tests.e2e.clients", "build", str(repo)], cwd=ROOT, check=True, timeout=300)
    tokens = repo.parent / "feedback-tokens"
    tokens.write_text("".join(f"honest-{i} {t}\n" for i, t in enumerate(HONEST_TOKENS)) + f"mallory {MALLORY}\n")
    with ServerProcess(repo, "--feedback-token-file", str(tokens)) as proc:
        Ctl(proc).json("promote", "oracle", "1", "--reason", "the A/A baseline")
        yield proc


@pytest.fixture(scope="module")
def ctl(srv: ServerProcess) -> Ctl:
    return Ctl(srv)


def rollout_with_counts(ctl: Ctl, tmp_path: Path, version: int, gates: str, adversary: list[str],
                        seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a rollout of ``version`` while honest traffic and the adversary run; (final rollout, adversary's counts)."""
    plan = tmp_path / f"plan-{version}-{seed}.yaml"
    plan.write_text(PLAN.format(gates=gates))
    url = ctl.srv.url
    good = clients("honest", url, "--tokens", *HONEST_TOKENS, "--rate", "150", "--duration", "16",
                   "--seed", str(seed))
    bad = clients("adversary", url, *adversary, "--duration", "16", "--seed", str(seed + 1))
    time.sleep(1.0)
    ctl.json("rollout", "start", "oracle", str(version), "--plan", str(plan), "--reason", "adversarial e2e")
    deadline = time.monotonic() + 60
    while True:
        r = ctl.json("rollout", "status", "oracle")["rollout"]
        if r["state"] not in ("running", "paused", "awaiting_approval") or r["evidence"].get("phase") == "done":
            break
        assert time.monotonic() < deadline, f"rollout still {r['state']}:\n{ctl.srv.log()[-3000:]}"
        time.sleep(0.5)
    honest, adv = finished(good), finished(bad)
    assert honest["joined"] > 300, honest
    return r, adv


def champion(ctl: Ctl) -> int:
    return int(ctl.json("status", "oracle")["champion"])


AA_RUNS = [
    # (name, adversary arguments, plan gates): every run is an A/A canary and must end promoted.
    ("no credential", ["--pin", "{challenger}", "--guess", "20"], ""),
    ("own credential", ["--token", MALLORY, "--pin", "{challenger}", "--guess", "20"], ""),
    ("capped credential", ["--token", MALLORY, "--pin", "{challenger}", "--against", "{challenger}"], CAPPED),
]


def test_an_aa_canary_is_never_rolled_back_by_an_adversary(ctl: Ctl, tmp_path: Path) -> None:
    for i, (name, argv, gates) in enumerate(AA_RUNS):
        current = champion(ctl)
        challenger = 2 if current == 1 else 1  # v1 and v2 hold the same weights
        adversary = [a.format(challenger=challenger) for a in argv]
        r, adv = rollout_with_counts(ctl, tmp_path, challenger, gates, adversary, seed=10 * i)
        assert r["state"] == "promoted", f"{name}: {r['state']}: {r['evidence'].get('rollback')}"
        assert adv.get(f"pinned:{challenger}", 0) > 50 and adv.get("malformed:INVALID_ARGUMENT", 0) > 50, adv
        sources = r["sources"]
        excluded = sources["excluded"]
        if name == "no credential":
            assert adv.get("report:UNAUTHENTICATED", 0) > 0 and not any(k.startswith("label:") for k in adv), adv
            assert "mallory" not in sources["reporters"]
        elif name == "own credential":
            assert adv.get("label:joined", 0) == 0, adv  # pinned labels are excluded, guessed ids match nothing
            assert adv.get("label:excluded", 0) > 50 and adv.get("label:unknown", 0) + adv.get("label:expired", 0) > 50
        else:  # its routed requests' labels count up to the cap; the rest are excluded
            assert adv.get("label:joined", 0) > 0 and adv.get("label:excluded", 0) > 0, adv
            assert sum(e["request"].get("client_error", 0) for e in excluded.values()) > 50, excluded
            assert sum(e["outcome"].get("reporter_cap", 0) for e in excluded.values()) > 0, excluded
        # Pinned requests (malformed ones included) never reach the gates; the exclusions cover the whole rollout.
        assert excluded["challenger"]["request"].get("pinned", 0) > 100, excluded
        assert ctl.json("status", "oracle")["champion"] == challenger


def test_a_worse_canary_is_rolled_back_although_an_adversary_vouches_for_it(ctl: Ctl, tmp_path: Path) -> None:
    r, adv = rollout_with_counts(ctl, tmp_path, 3, CAPPED, ["--token", MALLORY, "--pin", "3", "--favour", "3"],
                                 seed=77)
    assert r["state"] == "rolled_back", json.dumps({k: r[k] for k in ("state", "evidence", "sources")}, default=str)[:6000]
    rb = r["evidence"]["rollback"]
    assert rb["gate"] == "accuracy" and rb["slice"] == "c", rb
    assert rb["seconds_since_start"] < 30
    assert adv.get("label:joined", 0) > 0 and adv.get("label:excluded", 0) > 0, adv
    assert r["sources"]["reporters"]["mallory"]  # named in the evidence
    text = ctl.run("rollout", "status", "oracle")
    assert text.returncode == 0, text.stderr
    for word in ("mallory", "honest-", "reporter_cap", "pinned", "client_error"):
        assert word in text.stdout, (word, text.stdout)


def test_guessed_ids_label_nothing_and_a_re_sent_id_is_refused(srv: ServerProcess) -> None:
    client = grpcclient.InferenceServerClient(srv.url)
    x = np.array([[3, 0, 0.9]], np.float32)
    inp = grpcclient.InferInput("features", [1, 3], "FP32")
    inp.set_data_from_numpy(x)
    first = client.infer("oracle", [inp]).get_response()
    assert len(first.id) == 40 and int(first.id, 16) >= 0  # the replica's 8-hex tag, then 128 random bits
    with pytest.raises(InferenceServerException) as refused:
        client.infer("oracle", [inp], request_id=first.id)
    assert refused.value.status() == "StatusCode.ALREADY_EXISTS" and "already used" in refused.value.message()
    mine = client.infer("oracle", [inp], request_id="client-chosen-1").get_response()
    assert mine.id == "client-chosen-1"
    with pytest.raises(InferenceServerException):
        client.infer("oracle", [inp], request_id="client-chosen-1")
    client.close()
    guesser = clients("adversary", srv.url, "--token", MALLORY, "--guess", "200", "--duration", "1")
    adv = finished(guesser)
    assert adv.get("label:joined", 0) == 0 and adv.get("label:unknown", 0) > 0, adv
