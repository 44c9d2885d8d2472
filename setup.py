"""Build description: the native core (pybind11), the generated gRPC code and the bench's native worker.

setuptools is the real build here (see shared/STYLE.md): csrc/ has no third-party
C++ dependencies, so Pybind11Extension compiles it directly. The protos are
compiled by the pinned grpcio-tools before build_py and build_ext run, so wheels,
sdists and editable installs all see the generated modules (never committed);
``swapserve._proto`` is listed as a package explicitly because it does not exist yet
when a clean checkout or an sdist is first read.

The native gRPC front end (``swapserve._frontend``) and csrc/loadgen/loadgen.cc, a
standalone executable (``swapserve bench``'s native client), link the system's grpc++
found through pkg-config; both are optional: without grpc++ the build says so once and
the server falls back to grpc.aio, the harness to its Python client. A wheel built here
links the system's grpc++ shared libraries; ``scripts/build-dist.sh`` repairs it with
auditwheel so that those libraries travel inside it (``swapserve.libs/``).

The example configs (``model_repository/*/config.pbtxt``, ``monitoring.yaml``) are copied
into the package as ``swapserve/examples/repository/`` so that an installed
``swapserve serve`` can write the example repository (``swapserve.examples``).
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "src"


def generate_protos() -> None:
    """Compile protos/swapserve/_proto/*.proto into src/swapserve/_proto/."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "swapserve" / "_proto").glob("*.proto"))
    if not protos:
        return
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={OUT}", f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}", *protos]
    cwd = os.getcwd()
    os.chdir(PROTO_ROOT)
    try:
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {protos}")
    finally:
        os.chdir(cwd)


EXAMPLE_CONFIGS = ("config.pbtxt", "monitoring.yaml")


class BuildPy(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()
        self.copy_example_configs()

    def copy_example_configs(self) -> None:
        """Ship the committed example configs as package data (the weights are built at run time)."""
        target = Path(self.build_lib, "swapserve", "examples", "repository")
        for model_dir in sorted((ROOT / "model_repository").glob("*/")):
            for name in EXAMPLE_CONFIGS:
                if (model_dir / name).is_file():
                    (target / model_dir.name).mkdir(parents=True, exist_ok=True)
                    self.copy_file(str(model_dir / name), str(target / model_dir.name / name))


LOADGEN_SOURCE = "csrc/loadgen/loadgen.cc"
LOADGEN_TARGET = ("swapserve", "bench", "swapserve-loadgen")  # package-relative; found by swapserve/bench/native.py


def grpcpp_flags() -> list[str] | None:
    """Compiler and linker flags for grpc++ from pkg-config, or None when it is not installed."""
    if shutil.which("pkg-config") is None:
        return None
    try:
        if subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode != 0:
            return None
        out = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out.stdout)


NO_GRPCPP = ("WARNING: grpc++ not found (pkg-config --exists grpc++ failed): building swapserve WITHOUT its native "
             "gRPC front end and swapserve-loadgen. The server will serve the inference port with grpc.aio (about "
             "half the throughput) and `swapserve bench` will use its Python client. To get them, install grpc++ "
             "(Debian/Ubuntu: apt-get install libgrpc++-dev pkg-config, or scripts/ensure-build-deps.sh) and "
             "reinstall, or install swapserve's wheel, which carries them.")


class BuildExt(build_ext):
    def run(self) -> None:
        generate_protos()
        super().run()
        self.build_loadgen()

    def build_loadgen(self) -> None:
        """Compile swapserve-loadgen into build_lib (wheels) and, for editable installs, next to the sources."""
        flags = grpcpp_flags()
        if flags is None:
            print(NO_GRPCPP, file=sys.stderr)  # the one notice: build_ext runs once per build, setup.py several times
            return
        target = Path(self.build_lib, *LOADGEN_TARGET)
        target.parent.mkdir(parents=True, exist_ok=True)
        cxx = shlex.split(os.environ.get("CXX", "c++"))
        cmd = [*cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", str(ROOT / LOADGEN_SOURCE), "-o", str(target), *flags]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        if self.inplace:  # editable install: the package is imported from src/
            # Copy, then rename over the old binary: a bench still running it keeps its file
            # (writing into a running executable fails with ETXTBSY).
            dest = OUT.joinpath(*LOADGEN_TARGET)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
            shutil.copy2(target, tmp)
            os.replace(tmp, dest)
            print(f"copied {target} -> {dest}")


extra = ["-O3", "-Wall", "-Wextra"]
if os.environ.get("SWAPSERVE_SANITIZE"):
    extra = ["-O1", "-g", f"-fsanitize={os.environ['SWAPSERVE_SANITIZE']}"]

ext_modules = [
    Pybind11Extension(
        "swapserve._native",
        sorted(glob.glob("csrc/core/*.cc")),
        include_dirs=["csrc/core"],
        cxx_std=17,
        extra_compile_args=extra,
        extra_link_args=["-pthread"],
    )
]

# The native gRPC front end (swapserve._frontend) links grpc++; without it the server uses grpc.aio.
GRPCPP = grpcpp_flags()
if GRPCPP is not None and not os.environ.get("SWAPSERVE_SANITIZE"):
    ext_modules.append(Pybind11Extension(
        "swapserve._frontend",
        sorted(glob.glob("csrc/frontend/*.cc")),
        include_dirs=["csrc/frontend"],
        cxx_std=17,
        extra_compile_args=["-O2", "-Wall", "-Wextra", *[f for f in GRPCPP if f.startswith(("-I", "-D"))]],
        extra_link_args=["-pthread", *[f for f in GRPCPP if not f.startswith(("-I", "-D"))]],
    ))

# swapserve._proto is generated by build_py and build_ext: list it even when find_packages cannot see it
# yet, and give it its directory now (egg_info, which runs first, checks that every package's exists).
# Alembic's migration scripts are directories of modules without __init__.py.
(OUT / "swapserve" / "_proto").mkdir(exist_ok=True)
(OUT / "swapserve" / "_proto" / "__init__.py").touch()
packages = sorted({*find_packages("src"), "swapserve._proto", "swapserve.registry.migrations",
                   "swapserve.registry.migrations.versions"})

setup(packages=packages, package_dir={"": "src"}, ext_modules=ext_modules,
      cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
