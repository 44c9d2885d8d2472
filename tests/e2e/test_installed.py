"""What a user who ran ``pip install`` gets: a complete package, the example repository, native parts
that need no system grpc++.

The first tests run everywhere (an editable install too). The others check a built artefact and
run only where ``scripts/test-dist.sh`` installed one into a fresh virtualenv and said so:
``SWAPSERVE_TEST_ARTEFACT=wheel`` (the auditwheel-repaired wheel) or ``sdist`` (with
``SWAPSERVE_TEST_SDIST`` naming the archive, built again here without grpc++).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.e2e.serverproc import ROOT, SWAPSERVE, ServerProcess

ARTEFACT = os.environ.get("SWAPSERVE_TEST_ARTEFACT", "")
installed_only = pytest.mark.skipif(not ARTEFACT, reason="checks a built wheel or sdist (scripts/test-dist.sh)")

#: Libraries every Linux base system has (in the manylinux policies' list, which auditwheel leaves out).
BASE_LIBRARIES = ("linux-vdso.so", "ld-linux", "libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "libpthread.so",
                  "libdl.so", "librt.so", "libz.so")
#: The system's grpc++ and what it brings (Debian's libgrpc++-dev): hidden from the wheel's test.
SYSTEM_GRPC = ("libgrpc", "libgpr", "libupb", "libaddress_sorting", "libre2", "libcares", "libabsl_")


def infer_simple(url: str) -> tuple[np.ndarray, str]:
    c = grpcclient.InferenceServerClient(url)
    try:
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        b = np.full((1, 16), 3, np.int32)
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"), grpcclient.InferInput("INPUT1", [1, 16], "INT32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        r = c.infer("simple", inputs)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
        return r.as_numpy("OUTPUT0"), r.get_response().model_version
    finally:
        c.close()


def test_serve_without_a_repository_writes_and_serves_the_examples(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with ServerProcess(None, env={"SWAPSERVE_HOME": str(home)}, timeout=300) as srv:
        out, version = infer_simple(srv.url)
        np.testing.assert_array_equal(out, np.arange(16, dtype=np.int32).reshape(1, 16) + 3)
        assert version == "1"
        assert "wrote the example models simple" in srv.log()
        c = grpcclient.InferenceServerClient(srv.url)
        try:
            assert c.is_server_ready()
            assert c.is_model_ready("convnet")
        finally:
            c.close()
    assert (home / "model_repository" / "simple" / "1" / "model.pt").is_file()
    # A second start serves what is there and writes nothing.
    model = (home / "model_repository" / "simple" / "1" / "model.pt").read_bytes()
    with ServerProcess(None, env={"SWAPSERVE_HOME": str(home)}) as srv:
        assert infer_simple(srv.url)[1] == "1"
        assert "wrote the example models" not in srv.log()
    assert (home / "model_repository" / "simple" / "1" / "model.pt").read_bytes() == model


def test_a_second_build_of_the_examples_is_accepted_by_the_same_registry(tmp_path: Path) -> None:
    """Two example repositories built apart (another checkout) share one SWAPSERVE_HOME: same sha256, served."""
    home = tmp_path / "home"
    repos = [tmp_path / "checkout-a" / "model_repository", tmp_path / "checkout-b" / "model_repository"]
    for repo in repos:
        subprocess.run([*SWAPSERVE, "examples", str(repo), "--models", "simple,digits"], check=True,
                       capture_output=True, timeout=300)
    for repo in repos:
        with ServerProcess(repo, env={"SWAPSERVE_HOME": str(home)}) as srv:
            assert infer_simple(srv.url)[1] == "1"
            c = grpcclient.InferenceServerClient(srv.url)
            try:
                assert c.is_model_ready("digits"), srv.log()
            finally:
                c.close()
            assert "already registered with sha256" not in srv.log()


def test_examples_verb(tmp_path: Path) -> None:
    out = subprocess.run([*SWAPSERVE, "examples", str(tmp_path / "repo"), "--models", "simple", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == {"simple": {"versions": [1]}}
    assert (tmp_path / "repo" / "simple" / "config.pbtxt").is_file()
    bad = subprocess.run([*SWAPSERVE, "examples", str(tmp_path / "repo"), "--models", "resnet"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown example model(s) ['resnet']" in bad.stderr


INSPECT = r"""
import importlib, json, os, pathlib
import swapserve
from swapserve import examples
from swapserve.bench import native
pkg = pathlib.Path(swapserve.__file__).parent
protos = {}
for name in ("grpc_service_pb2", "grpc_service_pb2_grpc", "model_config_pb2", "control_pb2", "control_pb2_grpc",
             "feedback_pb2", "feedback_pb2_grpc"):
    protos[name] = importlib.import_module("swapserve._proto." + name).__file__
def native_module(name):
    try:
        return importlib.import_module(name).__file__
    except ImportError as e:
        return "ImportError: %s" % e
loadgen = native.find_binary()
print(json.dumps({
    "package": str(pkg), "protos": protos,
    "native": native_module("swapserve._native"), "frontend": native_module("swapserve._frontend"),
    "loadgen": str(loadgen) if loadgen else None,
    "examples": str(examples.config_root()),
    "migrations": sorted(p.name for p in (pkg / "registry" / "migrations" / "versions").glob("*.py")),
    "alembic_ini": (pkg / "registry" / "alembic.ini").is_file(),
    "stubs": sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.pyi")) + sorted(
        str(p.relative_to(pkg)) for p in pkg.glob("py.typed")),
}))
"""


def inspect_installed(cwd: Path) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", INSPECT], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@installed_only
def test_the_installed_package_is_complete_and_outside_the_source_tree(tmp_path: Path) -> None:
    info = inspect_installed(tmp_path)
    pkg = Path(str(info["package"]))
    assert "site-packages" in pkg.parts and not pkg.is_relative_to(ROOT), pkg
    for name, file in dict(info["protos"]).items():  # type: ignore[call-overload]
        assert Path(file).is_relative_to(pkg), (name, file)
    for key in ("native", "frontend"):
        assert Path(str(info[key])).is_relative_to(pkg), info[key]
    assert info["loadgen"] and Path(str(info["loadgen"])).is_relative_to(pkg)
    assert Path(str(info["examples"])) == pkg / "examples" / "repository"
    assert info["migrations"] and info["alembic_ini"]
    stubs = set(info["stubs"])  # type: ignore[call-overload]
    assert {"_native.pyi", "py.typed", "_proto/grpc_service_pb2.pyi", "_proto/control_pb2.pyi"} <= stubs, stubs
    help_out = subprocess.run([*SWAPSERVE, "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert help_out.returncode == 0
    for verb in ("serve", "examples", "models", "status", "promote", "rollback", "traffic", "rollout", "bench"):
        assert verb in help_out.stdout
        sub = subprocess.run([*SWAPSERVE, *verb.split(), "--help"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert sub.returncode == 0 and "usage: swapserve" in sub.stdout, (verb, sub.stderr)


def _ldd(path: Path) -> list[tuple[str, str]]:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    deps = []
    for line in out.splitlines():
        name, _, where = line.strip().partition(" => ")
        resolved = where.split(" (")[0].strip() if where else ""
        if resolved and resolved != "not found":
            resolved = os.path.normpath(resolved)  # auditwheel's RPATH reads swapserve/../swapserve.libs
        deps.append((os.path.basename(name.split()[0]), resolved))
    return deps


def _hide_system_grpc() -> list[str]:
    """A command prefix that runs its command with the system's grpc++ libraries unreadable (a private mount)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to hide the system's grpc++ from one process")
    libdir = Path("/usr/lib/x86_64-linux-gnu")
    hidden = [str(p) for p in sorted(libdir.glob("lib*.so*")) if p.name.startswith(SYSTEM_GRPC) and not p.is_symlink()]
    assert hidden, "expected the build machine's grpc++ under /usr/lib/x86_64-linux-gnu"
    script = 'for f in "$@"; do case "$f" in --) shift; break;; esac; mount --bind /dev/null "$f"; shift; done; ' \
             'exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *hidden, "--"]


@pytest.mark.skipif(ARTEFACT != "wheel", reason="checks the repaired wheel (scripts/test-dist.sh)")
def test_the_wheel_needs_no_system_grpcpp(tmp_path: Path) -> None:
    info = inspect_installed(tmp_path)
    pkg = Path(str(info["package"]))
    libs = pkg.parent / "swapserve.libs"
    for binary in (Path(str(info["frontend"])), Path(str(info["loadgen"]))):
        deps = _ldd(binary)
        assert any(where.startswith(f"{libs}/") for _, where in deps), f"{binary} bundles nothing: {deps}"
        for name, where in deps:
            assert where != "not found", f"{binary}: {name} not found"
            inside = where.startswith(f"{libs}/")
            assert inside or name.startswith(BASE_LIBRARIES), f"{binary} needs {name} from {where}, outside the wheel"
    hide = _hide_system_grpc()
    probe = subprocess.run([*hide, sys.executable, "-c", "import swapserve._frontend, sys; print('ok')"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr
    # The server on its native front end, and swapserve-loadgen against it, with grpc++ hidden.
    srv = ServerProcess(None, "--frontend", "native", env={"SWAPSERVE_HOME": str(tmp_path / "home")}, timeout=300)
    srv.command = [*hide, *SWAPSERVE]
    with srv:
        assert "(native front end)" in srv.log()
        assert infer_simple(srv.url)[1] == "1"
        bench = subprocess.run([*hide, *SWAPSERVE, "bench", "--url", srv.url, "--model", "simple", "--client", "native",
                                "--duration", "1", "--warmup", "0.2", "--json", str(tmp_path / "bench.json")],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert bench.returncode == 0, bench.stderr + bench.stdout
        result = json.loads((tmp_path / "bench.json").read_text())
        assert result["config"]["client"] == "native", result["config"]
        assert result["completed"] > 0 and result["errors"] == 0, result


@pytest.mark.skipif(ARTEFACT != "sdist", reason="builds the sdist without grpc++ (scripts/test-dist.sh)")
def test_the_sdist_builds_without_grpcpp_and_says_so(tmp_path: Path) -> None:
    sdist = Path(os.environ["SWAPSERVE_TEST_SDIST"])
    empty = tmp_path / "no-pkgconfig"
    empty.mkdir()
    env = {**os.environ, "PKG_CONFIG_LIBDIR": str(empty), "PKG_CONFIG_PATH": ""}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path / "wheel"),
                            str(sdist)], capture_output=True, text=True, timeout=900, env=env)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    log = build.stdout + build.stderr
    assert log.count("WARNING: grpc++ not found") == 1, log[-3000:]
    assert "libgrpc++-dev" in log
    (wheel,) = (tmp_path / "wheel").glob("swapserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = [n for n in names if n.endswith(".so")]
    assert any(n.startswith("swapserve/_native.") for n in modules), modules
    assert not any(n.startswith("swapserve/_frontend.") for n in modules), modules  # its .pyi stub stays
    assert "swapserve/bench/swapserve-loadgen" not in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    srv = ServerProcess(None, env={"SWAPSERVE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(site)}, timeout=300)
    srv.command = [sys.executable, "-m", "swapserve.cli"]
    with srv:
        assert "(python front end)" in srv.log()
        assert "native gRPC front end is not in this install" in srv.log()
        assert infer_simple(srv.url)[1] == "1"
