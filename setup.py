"""Build description: the native core (pybind11) and the generated gRPC code.

setuptools is the real build here (see shared/STYLE.md): csrc/ has no third-party
C++ dependencies, so Pybind11Extension compiles it directly. The protos are
compiled by the pinned grpcio-tools before build_py and build_ext run, so wheels,
sdists and editable installs all see the generated modules (never committed).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
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
    (OUT / "swapserve" / "_proto" / "__init__.py").touch()


class BuildPy(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


class BuildExt(build_ext):
    def run(self) -> None:
        generate_protos()
        super().run()


extra = ["-O3", "-Wall", "-Wextra"]
if os.environ.get("SWAPSERVE_SANITIZE"):
    extra = ["-O1", "-g", f"-fsanitize={os.environ['SWAPSERVE_SANITIZE']}"]

ext_modules = [
    Pybind11Extension(
        "swapserve._native",
        sorted(glob.glob("csrc/*.cc")),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=extra,
        extra_link_args=["-pthread"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPy, "build_ext": BuildExt})
