"""Names become paths only after validation: the validator, and the repository that uses it.

Every model directory problem (a bad name, a symlink out, a file a config names outside the model
directory, a missing or oversized warmup sample) is the model's UNAVAILABLE reason or the caller's
INVALID_ARGUMENT, never an exception that stops a scan.
"""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swapserve.errors import InvalidInput, ModelNotFound
from swapserve.repository import ModelRepository
from swapserve.repository.paths import (MODEL_NAME_RULE, check_model_name, check_version, inside, model_directory,
                                        version_of_dirname)
from tests.fakes import write_model

WARMUP = """model_warmup [ {{ name: "w" batch_size: 1 inputs {{ key: "x" value: {{ data_type: TYPE_FP32 dims: [ {dims} ]
  {source} }} }} }} ]
"""


@pytest.mark.parametrize("name", ["simple", "digits_onnx", "a", "A-1.b_c", "x" * 128, "1model", "v1.2"])
def test_valid_names_pass(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../clf", "a/../b", "/etc", "a/b", "a\\b", ".hidden", "-x", "_x",
                                  "a..b", "x" * 129, "x" * 300, "caf\u00e9", "a b", "a\x00b", "a\nb", "~root"])
def test_invalid_names_are_invalid_argument_saying_what_is_allowed(name: str) -> None:
    with pytest.raises(InvalidInput) as err:
        check_model_name(name)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert MODEL_NAME_RULE in err.value.message
    assert len(err.value.message) < 400  # a 300-character name is not echoed whole


@given(st.text(max_size=200))
@settings(max_examples=400, deadline=None)
def test_a_name_that_passes_is_one_plain_directory_entry(name: str) -> None:
    try:
        check_model_name(name)
    except InvalidInput:
        return
    assert "/" not in name and "\\" not in name and ".." not in name and "\x00" not in name
    assert 1 <= len(name) <= 128 and name.isascii() and name[0].isalnum()
    assert Path(name).name == name and not Path(name).is_absolute()


@given(st.text(max_size=60))
@settings(max_examples=400, deadline=None)
def test_inside_never_returns_a_path_outside_its_base(tmp_path_factory: pytest.TempPathFactory, relative: str) -> None:
    base = tmp_path_factory.getbasetemp() / "base"
    base.mkdir(exist_ok=True)
    try:
        target = inside(base, relative, what="file")
    except (InvalidInput, ValueError, OSError):
        return
    root = base.resolve()
    assert target == root or root in target.parents


@pytest.mark.parametrize("value,expected", [(1, 1), ("7", 7), (2**63 - 1, 2**63 - 1), ("42", 42)])
def test_versions_are_positive_integers(value: object, expected: int) -> None:
    assert check_version(value) == expected


@pytest.mark.parametrize("value", [0, -1, 2**63, "0", "-1", "1.5", "", "1e3", "\u0661", True, None, "9" * 40])
def test_other_versions_are_invalid_argument(value: object) -> None:
    with pytest.raises(InvalidInput, match="versions are positive integers"):
        check_version(value, "m")


def test_version_directories_are_canonical_positive_integers() -> None:
    assert [version_of_dirname(n) for n in ("1", "12", "0", "01", "x", "1a", "\u0661", "9" * 25)] == \
        [1, 12, None, None, None, None, None, None]


def test_inside_refuses_absolute_parent_and_symlinked_escapes(tmp_path: Path) -> None:
    base = tmp_path / "model"
    (base / "warmup").mkdir(parents=True)
    (tmp_path / "secret").write_text("s3cret")
    os.symlink(tmp_path / "secret", base / "warmup" / "link")
    os.symlink("../model/warmup", base / "loop")  # a symlink that stays inside is fine
    assert inside(base, "warmup/x.bin", what="f") == (base / "warmup" / "x.bin").resolve()
    assert inside(base, "loop/x.bin", what="f") == (base / "warmup" / "x.bin").resolve()
    for bad, why in [("/etc/passwd", "relative path"), ("../secret", "without '..'"), ("warmup/../../secret", "'..'"),
                     ("warmup/link", "outside"), ("", "not allowed")]:
        with pytest.raises(InvalidInput, match=why):
            inside(base, bad, what="f")
    os.symlink(tmp_path, base / "escape")
    with pytest.raises(InvalidInput, match="outside"):
        model_directory(base, "escape")


# -- the repository --------------------------------------------------------------------------------


def test_entry_refuses_names_before_they_become_paths(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m")
    write_model(tmp_path, "clf")  # beside the repository: never reachable by name
    r = ModelRepository(repo)
    for name in ("../clf", str(tmp_path / "clf"), "x" * 300, "..", "m/1"):
        with pytest.raises(InvalidInput, match="not allowed"):
            r.entry(name)
    with pytest.raises(ModelNotFound):
        r.entry("absent")
    assert r.entry("m").spec is not None


def test_a_model_directory_symlinked_out_of_the_repository_is_unavailable(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m")
    write_model(tmp_path / "elsewhere", "out")
    os.symlink(tmp_path / "elsewhere" / "out", repo / "out")
    os.symlink(tmp_path / "elsewhere" / "out" / "1", repo / "m" / "2")  # a version symlinked out
    scan = ModelRepository(repo).scan()
    assert scan["out"].spec is None and "outside" in (scan["out"].error or "")
    assert scan["m"].spec is None and "version directory" in (scan["m"].error or "")


def test_directories_that_are_not_model_names_are_not_listed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m")
    (repo / "has space").mkdir()
    (repo / "-dash").mkdir()
    assert ModelRepository(repo).names() == ["m"]


@pytest.mark.parametrize("extra,reason", [
    (WARMUP.format(dims=4, source='input_data_file: "../../../etc/passwd"'), "without '..'"),
    (WARMUP.format(dims=4, source='input_data_file: "/etc/passwd"'), "relative path"),
    (WARMUP.format(dims=4, source='input_data_file: "absent.bin"'), "is missing"),
    (WARMUP.format(dims=4, source='input_data_file: "short.bin"'), "holds 3 bytes"),
    (WARMUP.format(dims="4000000000", source="random_data: true"), "more than the"),
    (WARMUP.format(dims=-1, source="zero_data: true"), "must all be positive"),
    ('default_model_filename: "../../../etc/passwd"\n', "default_model_filename"),
    ('default_model_filename: "/etc/passwd"\n', "default_model_filename"),
    ("instance_group [ { count: 100000 } ]\n", "at most 64"),
    ('version_policy: { specific: { versions: [ 1 ] } }\nmodel_warmup [ { name: "w" count: 2000000000 '
     'inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]\n', "count"),
    ("max_batch_size: oops\n", "max_batch_size"),
    ('parameters { key: "swapserve.max_queue_bytes" value: { string_value: "lots" } }\n', "swapserve.max_queue_bytes"),
    ('parameters { key: "swapserve.max_queue_bytes" value: { string_value: "0" } }\n', "at least 1 byte"),
])
def test_anything_wrong_in_a_model_directory_is_that_models_reason(tmp_path: Path, extra: str, reason: str) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "good")
    write_model(repo, "bad", extra=extra)
    (repo / "bad" / "warmup").mkdir()
    (repo / "bad" / "warmup" / "short.bin").write_bytes(b"abc")
    scan = ModelRepository(repo).scan()
    assert scan["good"].spec is not None and scan["good"].error is None
    assert scan["bad"].spec is None and reason in (scan["bad"].error or ""), scan["bad"].error
    assert (scan["bad"].error or "").startswith("model 'bad'")


def test_an_unreadable_model_directory_is_that_models_reason(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "good")
    write_model(repo, "bad")
    (repo / "bad" / "config.pbtxt").unlink()
    (repo / "bad" / "config.pbtxt").mkdir()  # reading it raises IsADirectoryError, an OSError
    scan = ModelRepository(repo).scan()
    assert scan["good"].spec is not None
    assert scan["bad"].spec is None and "cannot read" in (scan["bad"].error or "")
    assert "config.pbtxt: Is a directory" in (scan["bad"].error or "")


def test_a_warmup_file_inside_the_model_directory_is_read(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "m", extra=WARMUP.format(dims=4, source='input_data_file: "x.bin"'))
    (repo / "m" / "warmup").mkdir()
    (repo / "m" / "warmup" / "x.bin").write_bytes(b"\0" * 16)
    entry = ModelRepository(repo).entry("m")
    assert entry.spec is not None and entry.spec.warmup[0].inputs["x"].shape == (1, 4)


@pytest.mark.parametrize("value,expected", [("1MiB", 1 << 20), ("5000", 5000), (None, 0)])
def test_a_model_sets_its_own_queue_byte_bound(tmp_path: Path, value: str | None, expected: int) -> None:
    extra = f'parameters {{ key: "swapserve.max_queue_bytes" value: {{ string_value: "{value}" }} }}\n' if value else ""
    write_model(tmp_path / "repo", "m", extra=extra)
    spec = ModelRepository(tmp_path / "repo").scan()["m"].spec
    assert spec is not None and spec.max_queue_bytes == expected  # 0: the server's --max-queue-bytes
