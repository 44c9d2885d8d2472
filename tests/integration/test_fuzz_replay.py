"""CI's share of the fuzzing (tests/fuzz, benchmarks/fuzz_run.py): replay each target's saved
corpus, then a short seeded pass of its structure-aware mutations, in process. Any input that
crashes a target (its contract: tests/fuzz/targets.py) fails here with the input in the message.
The network target needs server processes and runs only in benchmarks/fuzz_run.py."""
from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from tests.fuzz.targets import Target, corpus, make_target

#: Mutated inputs per target after the corpus (a few seconds each on the CI machine).
SHORT_PASS = 400


@pytest.fixture(scope="module", params=["infer", "config", "plan", "monitoring"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    t = make_target(request.param)
    t.setup()
    yield t
    t.close()


def test_saved_corpus_replays_without_a_crash(target: Target) -> None:
    saved = corpus(target.name)
    assert saved, f"tests/fuzz/corpus/{target.name}/ is empty (python -m tests.fuzz.seeds {target.name})"
    for path, data in saved:
        try:
            target.one_input(data)
        except Exception as exc:  # noqa: BLE001 - the input is what a person needs to reproduce it
            raise AssertionError(f"{path.name} crashes the {target.name} target: {exc!r}") from exc


def test_a_short_mutation_pass_finds_no_crash(target: Target) -> None:
    rng = random.Random(20261202)
    pool = [d for _, d in corpus(target.name)] or target.seeds() or [b""]
    for i in range(SHORT_PASS):
        data = target.mutate(rng.choice(pool), target.max_len, rng)
        try:
            target.one_input(data)
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"mutant {i} crashes the {target.name} target: {exc!r}; input {data!r}") from exc
