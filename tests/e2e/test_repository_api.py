"""The repository API is locked down by default, and a bad model directory never stops the server.

Through the real server (``swapserve serve`` as a subprocess, tritonclient, the CLI):
* RepositoryModelLoad/Unload on the inference port are PERMISSION_DENIED unless ``--repository-api``;
* when enabled, names never become paths before validation (``../clf``, absolute paths and a
  300-character name are INVALID_ARGUMENT, nothing outside the repository loads), a failed load
  leaves ServerReady as it was, and load/unload go through the control plane (audited with the
  caller's peer, a recorded champion protected);
* a model whose directory is broken in any way (a missing warmup file, a warmup file or a model
  directory that leads out of the repository, a huge warmup allocation) is UNAVAILABLE with its
  reason while the others serve, and the poll goes on past it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.e2e.serverproc import ServerProcess, copy_models, wait_until
from tests.e2e.test_control_cli import control_url, run_cli
from tests.e2e.test_server_modes import index, simple


def refused(call, *args: object) -> InferenceServerException:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as err:
        call(*args)
    return err.value


def beside(repo: Path, example_repo: Path, name: str = "clf") -> Path:
    """A model directory next to the repository (what ``../clf`` would reach), renamed ``name``."""
    out = repo.parent / name
    shutil.copytree(example_repo / "simple", out)
    (out / "config.pbtxt").write_text((out / "config.pbtxt").read_text().replace('"simple"', f'"{name}"'))
    return out


def test_repository_load_and_unload_are_refused_by_default(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["simple", "digits"])
    with ServerProcess(repo, "--model-control-mode", "explicit", "--load-model", "simple") as srv:
        c = grpcclient.InferenceServerClient(srv.url)
        for call, name in ((c.load_model, "digits"), (c.unload_model, "simple"), (c.load_model, "../clf")):
            err = refused(call, name)
            assert "PERMISSION_DENIED" in str(err.status()), err
            assert "--repository-api" in err.message() and "SWAPSERVE_REPOSITORY_API" in err.message()
        assert c.is_model_ready("simple") and not c.is_model_ready("digits") and c.is_server_ready()
        idx = index(c)  # the index stays readable
        assert idx[("simple", "1")]["state"] == "READY" and idx[("digits", "")]["state"] == "UNAVAILABLE"


def test_the_repository_api_validates_names_and_goes_through_the_control_plane(example_repo: Path,
                                                                             tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["simple", "digits"])
    outside = beside(repo, example_repo)
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('platform: "pytorch_libtorch"\nmax_batch_size: oops\n')
    with ServerProcess(repo, "--model-control-mode", "explicit", "--load-model", "simple",
                       "--repository-api") as srv:
        c = grpcclient.InferenceServerClient(srv.url)
        for name in ("../clf", str(outside), "x" * 300, "..", "simple/1"):
            err = refused(c.load_model, name)
            assert "INVALID_ARGUMENT" in str(err.status()), (name, err)
            assert "model names are 1-128 characters" in err.message()
            assert "INVALID_ARGUMENT" in str(refused(c.unload_model, name).status())
        assert not c.is_model_ready("clf") and "clf" not in {n for n, _ in index(c)}
        assert "INVALID_ARGUMENT" in str(refused(c.load_model, "broken").status())
        assert "NOT_FOUND" in str(refused(c.load_model, "does_not_exist").status())
        assert c.is_server_ready()  # failed loads changed nothing: nothing that failed is wanted

        c.load_model("digits")
        assert c.is_model_ready("digits") and c.is_server_ready()
        c.unload_model("digits")
        assert not c.is_model_ready("digits") and c.is_server_ready()
        url = control_url(srv)
        audit = json.loads(run_cli("audit", "digits", "--json", url=url).stdout)
        actions = [(a["action"], a["actor"]) for a in audit]
        assert [a for a, _ in actions[:2]] == ["repository_unload", "repository_load"], actions
        assert all(actor.startswith("local (loopback, ipv4:127.0.0.1:") for _, actor in actions[:2]), actions

        # A champion the control plane recorded is protected from the repository API.
        out = run_cli("promote", "simple", "1", url=url)
        assert out.returncode == 0, out.stderr
        err = refused(c.unload_model, "simple")
        assert "FAILED_PRECONDITION" in str(err.status()) and "swapserve promote" in err.message()
        assert c.infer("simple", simple()).as_numpy("OUTPUT0")[0, 0] == 2


WARMUP = ('model_warmup [ {{ name: "w" batch_size: 1 inputs {{ key: "INPUT0" value: {{ data_type: TYPE_INT32 '
          'dims: [ {dims} ] {source} }} }} inputs {{ key: "INPUT1" value: {{ data_type: TYPE_INT32 dims: [ 16 ] '
          'zero_data: true }} }} }} ]\n')


def bad_copy(repo: Path, name: str, extra: str) -> None:
    """``simple`` under another name with ``extra`` appended to its config."""
    shutil.copytree(repo / "simple", repo / name)
    cfg = repo / name / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('"simple"', f'"{name}"') + extra)


def test_a_bad_model_directory_never_stops_the_server_or_the_poll(example_repo: Path, tmp_path: Path) -> None:
    repo = copy_models(example_repo, tmp_path / "repo", ["simple"])
    (tmp_path / "secret").write_bytes(b"\x01" * 64)  # 16 INT32: a well-formed warmup sample, if it were read
    bad_copy(repo, "aaa_missing", WARMUP.format(dims=16, source='input_data_file: "absent.bin"'))
    bad_copy(repo, "warm_out", WARMUP.format(dims=16, source='input_data_file: "../../../secret"'))
    bad_copy(repo, "warm_link", WARMUP.format(dims=16, source='input_data_file: "x.bin"'))
    (repo / "warm_link" / "warmup").mkdir()
    os.symlink(tmp_path / "secret", repo / "warm_link" / "warmup" / "x.bin")
    bad_copy(repo, "huge", WARMUP.format(dims=4_000_000_000, source="random_data: true"))
    os.symlink(beside(repo, example_repo, "linked"), repo / "linked")
    with ServerProcess(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.5") as srv:
        c = grpcclient.InferenceServerClient(srv.url)
        assert c.is_server_live() and c.is_model_ready("simple")
        assert c.infer("simple", simple()).get_response().model_version == "1"
        idx = index(c)
        expected = {"aaa_missing": "absent.bin", "warm_out": "without '..'", "warm_link": "outside",
                    "huge": "more than the", "linked": "outside"}
        for name, why in expected.items():
            entry = idx[(name, "")]
            assert entry["state"] == "UNAVAILABLE" and why in entry["reason"], entry
            assert not c.is_model_ready(name)
        status = run_cli("status", "aaa_missing", url=control_url(srv))
        assert "absent.bin" in status.stdout + status.stderr
        # The poll goes on past the bad models ("aaa_missing" sorts first).
        shutil.copytree(repo / "simple" / "1", repo / "simple" / "2")
        wait_until(lambda: c.infer("simple", simple()).get_response().model_version == "2", timeout=30)
