"""Start and stop the servers compared by benchmarks/run_all.py, all on 127.0.0.1, all serving ``digits``.

Each peer runs in its own process group and is stopped by signalling the group (MLServer's
worker processes ignore SIGTERM, so the group gets SIGKILL after a grace period). swapserve
itself is started with tests/e2e/serverproc.py, the way its tests start it.

    peer = start("kserve", work_dir)      # -> Peer(url, pids, swap_command, ...)
    ...
    peer.stop()
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENVS = HERE / ".venvs"
MODEL = "digits"
sys.path.insert(0, str(ROOT))

from tests.e2e.serverproc import ServerProcess, copy_models  # noqa: E402  (reused, not copied)


class PeerUnavailable(RuntimeError):
    """The peer is not installed or did not start; the message says why (it goes into RESULTS.md)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def model_ready(url: str, name: str = MODEL, timeout: float = 2.0) -> bool:
    from swapserve._proto import grpc_service_pb2 as pb

    with grpc.insecure_channel(url) as ch:
        rpc = ch.unary_unary("/inference.GRPCInferenceService/ModelReady",
                             request_serializer=pb.ModelReadyRequest.SerializeToString,
                             response_deserializer=pb.ModelReadyResponse.FromString)
        try:
            return bool(rpc(pb.ModelReadyRequest(name=name), timeout=timeout).ready)
        except grpc.RpcError:
            return False


@dataclass
class Peer:
    name: str
    url: str
    pid: int
    swap_command: str = ""            # for `swapserve bench --swap-command`; empty: use control_url
    control_url: str = ""
    versions: dict[str, str] = field(default_factory=dict)   # package -> version
    proc: Any = None
    server: ServerProcess | None = None
    log: Path | None = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            return
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # the workers that ignored SIGTERM
        except ProcessLookupError:
            pass
        self.proc.wait(10)


def _venv_python(kind: str) -> Path:
    py = VENVS / kind / "bin" / "python"
    if not (VENVS / kind / ".installed").exists():
        raise PeerUnavailable(f"{kind} is not installed: run benchmarks/peers/setup_peers.sh {kind}"
                              + _install_failure(kind))
    return py


def _install_failure(kind: str) -> str:
    log = VENVS / kind / "install.log"
    if log.exists():
        lines = [x for x in log.read_text().splitlines() if "ERROR" in x or "error:" in x]
        return f" (install failed: {' '.join(lines[-2:])[:300]})" if lines else ""
    return ""


def _packages(kind: str, names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for line in (VENVS / kind / ".installed").read_text().splitlines():
        name, _, ver = line.partition("==")
        if name.lower() in names:
            out[name.lower()] = ver
    return out


def _versions_dir(src: Path, dst: Path) -> Path:
    for v in ("1", "2"):
        (dst / v).mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / MODEL / v / "model.pt", dst / v / "model.pt")
    return dst


def _spawn(name: str, cmd: list[str], cwd: Path, url: str, timeout: float = 180) -> tuple[subprocess.Popen[bytes], Path]:
    log = cwd / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"{name} exited {proc.returncode} at start: "
                                  + " ".join(log.read_text(errors="replace").splitlines()[-3:])[:400])
        if model_ready(url):
            return proc, log
        time.sleep(0.5)
    os.killpg(os.getpgid(proc.pid), signal.SIGKILL)
    raise PeerUnavailable(f"{name} did not become ready in {timeout:.0f}s (log: {log})")


def _base_src() -> str:
    src = os.environ.get("SWAPSERVE_BASE_SRC", "")
    if not src or not (Path(src) / "swapserve" / "__init__.py").exists():
        raise PeerUnavailable("swapserve-base needs SWAPSERVE_BASE_SRC: the src/ of a baseline checkout whose "
                              "native modules are built in place")
    return src


def start(kind: str, work: Path, models: Path = ROOT / "model_repository") -> Peer:
    """Start one server serving digits version 1 (version 2 ready to swap in)."""
    work = work / kind
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    swap = f"{sys.executable} {HERE / 'peer_swap.py'}"
    if kind in ("swapserve", "swapserve-aio", "swapserve-base"):
        repo = copy_models(models, work / "repo", [MODEL])
        # swapserve-base: the same server from another checkout's src/ (SWAPSERVE_BASE_SRC, built in
        # place), so a request-path change is measured against its baseline in the same run.
        env = {"PYTHONPATH": _base_src()} if kind == "swapserve-base" else None
        srv = ServerProcess(repo, *(["--frontend", "python"] if kind == "swapserve-aio" else []), env=env).start()
        control = next((part.split("=", 1)[1] for line in srv.lines for part in line.split()
                        if part.startswith("control=")), "")
        import swapserve

        return Peer(kind, srv.url, srv.proc.pid, control_url=control, server=srv,  # type: ignore[union-attr]
                    versions={"swapserve": swapserve.__version__})
    if kind == "noop":
        port = free_port()
        url = f"127.0.0.1:{port}"
        proc, log = _spawn(kind, [sys.executable, str(HERE / "noop_server.py"), "--port", str(port)], work, url)
        return Peer(kind, url, proc.pid, proc=proc, log=log, versions={"grpcio": grpc.__version__})
    if kind == "mlserver":
        py = _venv_python(kind)
        mdir = _versions_dir(models, work / "models" / MODEL)
        shutil.copy2(HERE / "mlserver_runtime" / "runtime.py", mdir / "runtime.py")
        (mdir / "model-settings.json").write_text(json.dumps(
            {"name": MODEL, "implementation": "runtime.TorchScriptRuntime",
             "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
             "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
             "parameters": {"uri": str(mdir / "1" / "model.pt")}}))
        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        (work / "models" / "settings.json").write_text(json.dumps(
            {"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port,
             "load_models_at_startup": True}))
        url = f"127.0.0.1:{grpc_port}"
        proc, log = _spawn(kind, [str(py.parent / "mlserver"), "start", str(work / "models")], work, url)
        return Peer(kind, url, proc.pid, proc=proc, log=log,
                    swap_command=f"{swap} --kind mlserver --http {http_port} --dir {mdir} {{model}} {{version}}",
                    versions=_packages(kind, ("mlserver", "uvloop", "torch", "grpcio")))
    if kind == "kserve":
        py = _venv_python(kind)
        mdir = _versions_dir(models, work / MODEL)
        (mdir / "CURRENT").write_text("1")
        grpc_port, http_port = free_port(), free_port()
        url = f"127.0.0.1:{grpc_port}"
        proc, log = _spawn(kind, [str(py), str(HERE / "kserve_server.py"), "--model-dir", str(mdir), "--name", MODEL,
                                  "--grpc-port", str(grpc_port), "--http-port", str(http_port)], work, url)
        return Peer(kind, url, proc.pid, proc=proc, log=log,
                    swap_command=f"{swap} --kind kserve --http {http_port} --dir {mdir} {{model}} {{version}}",
                    versions=_packages(kind, ("kserve", "torch", "grpcio")))
    raise ValueError(f"unknown peer {kind!r}")


if __name__ == "__main__":  # smoke: start each named peer, print its url, stop it
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for kind in sys.argv[1:] or ["noop", "swapserve", "mlserver", "kserve"]:
            try:
                p = start(kind, Path(tmp))
            except PeerUnavailable as exc:
                print(kind, "UNAVAILABLE:", exc)
                continue
            print(kind, p.url, p.pid, p.versions, p.swap_command or p.control_url)
            p.stop()
