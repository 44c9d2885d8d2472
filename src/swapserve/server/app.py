"""Assembling and running the server: gRPC (inference, health, reflection), metrics HTTP, shutdown."""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from http.server import ThreadingHTTPServer
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer
from prometheus_client import start_http_server
from prometheus_client.exposition import MetricsHandler

from swapserve._proto import control_pb2, control_pb2_grpc, feedback_pb2, feedback_pb2_grpc
from swapserve._proto import grpc_service_pb2 as pb
from swapserve._proto import grpc_service_pb2_grpc as pb_grpc
from swapserve.backends import backend_class, device_free_bytes, resolve_device
from swapserve.config import ControlMode, Frontend, Settings, parse_bytes
from swapserve.controlplane import ControlPlane
from swapserve.controlplane.fleet import STALE_AFTER_S, FleetSync, default_replica_id
from swapserve.dataplane import DataPlane, RequestIds, replica_tag
from swapserve.errors import ConfigError, SwapserveError
from swapserve.feedback.forward import Forwarder, Peer, PeerDirectory
from swapserve.feedback.observer import FeedbackObserver
from swapserve.feedback.predictions import PredictionLog
from swapserve.feedback.slices import SliceStats
from swapserve.lifecycle.manager import ModelManager
from swapserve.monitoring.drift_observer import MonitoringObserver
from swapserve.native import Batcher, Router
from swapserve.registry import Registry
from swapserve.registry.outbox import Outbox, outbox_path
from swapserve.repository import ModelRepository
from swapserve.rollout.controller import RolloutController
from swapserve.rollout.webhook import WebhookSender
from swapserve.server.control import ControlServicer
from swapserve.server.auth import Authenticator, AuthPolicy, InferenceGate
from swapserve.server.feedback import FeedbackAuth, FeedbackServicer, feedback_pairs
from swapserve.server.feedback_forward import GrpcPeers
from swapserve.server.access import RepositoryAccess
from swapserve.server.inference import InferenceServicer
from swapserve.server.streams import StreamLimits
from swapserve.server.transport import native as native_frontend
from swapserve.telemetry.metrics import Metrics
from swapserve.tls import ServerTls, server_tls
from swapserve.types import ModelSpec

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
CONTROL_SERVICE = control_pb2.DESCRIPTOR.services_by_name["Control"].full_name
FEEDBACK_SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
#: How often drift windows are scored and alerts/triggers evaluated (seconds).
MONITOR_TICK_S = 1.0


def _peers(registry: Registry, model: str) -> list[Peer]:
    """Every replica the registry lists (for feedback forwarding), stale ones marked. Registry thread."""
    return [Peer(r.replica_id, r.address, r.stale) for r in registry.replica_states(model, stale_after_s=STALE_AFTER_S)]


def _load_backend(spec: Any, path: Any, device: str) -> Any:
    return backend_class(spec.platform).load(spec, path, device)


def _batcher(max_rows: int, preferred: list[int], delay_us: int, max_queue: int, max_queue_bytes: int,
             name: str) -> Batcher:
    return Batcher(max_rows, preferred, delay_us, max_queue, max_queue_bytes, name=name)


@dataclass
class Server:
    """A running swapserve. ``grpc_port``/``metrics_port`` are the bound ports (useful with port 0)."""

    settings: Settings
    grpc_server: Any  # grpc.aio.Server or native_frontend.NativeServer (same interface)
    control_server: grpc.aio.Server
    control: ControlPlane
    rollouts: RolloutController
    registry: Registry
    manager: ModelManager
    servicer: InferenceServicer
    health: health.aio.HealthServicer
    metrics: Metrics
    grpc_port: int
    metrics_port: int | None
    control_port: int
    fleet: FleetSync | None = None
    monitor: MonitoringObserver | None = None
    slices: SliceStats | None = None
    feedback_peers: GrpcPeers | None = None
    tls: ServerTls | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _http: Any = None

    def reload_tls(self) -> bool:
        """SIGHUP: reread the TLS files; new handshakes on every port use them, open connections
        stay. False (logged, the old set kept) when the new files cannot be used or there is no TLS."""
        if self.tls is None:
            log.warning("SIGHUP: this server runs without TLS (--tls-cert/--tls-key): nothing to reload")
            return False
        try:
            self.tls.reload()
        except ConfigError as e:
            log.error("SIGHUP: TLS files not reloaded, the previous certificate stays in use: %s", e)
            return False
        return True

    async def _set_health(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.manager.server_ready() \
            else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(INFERENCE_SERVICE, status)

    async def _monitor(self) -> None:
        """Score drift windows about once a second (off the event loop), log alerts and triggers."""
        assert self.monitor is not None and self.slices is not None
        while True:
            await asyncio.sleep(MONITOR_TICK_S)
            try:
                for m in list(self.manager.models.values()):
                    for v in m.resident_versions():
                        overall = self.slices.snapshot(m.name, v)["overall"]
                        if overall.labelled and overall.accuracy is not None:
                            self.monitor.record_accuracy(m.name, v, overall.accuracy, overall.labelled)
                events = await asyncio.to_thread(self.monitor.tick)
                for e in events:
                    await self.registry.call(lambda e=e: self.registry.add_event(
                        "drift" if e.kind.startswith("drift") or e.kind == "profile_ready" else "retrain",
                        e.message, model=e.model, version=e.version or None, data=e.detail))
                    if e.kind == "retrain_triggered":
                        await self.registry.call(lambda e=e: self.registry.audit(
                            actor="monitor", action="retrain.trigger", model=e.model, version=e.version or None,
                            before=None, after=e.detail, reason=e.message))
            except Exception:  # noqa: BLE001 - monitoring must never take the server down
                log.exception("monitoring tick failed")

    def _refresh_health(self) -> None:
        """Schedule a health-status update (routing changed); keeps a reference so the task is not lost."""
        task = asyncio.get_running_loop().create_task(self._set_health())
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.manager.poll_once()
            except Exception:  # noqa: BLE001 - keep polling; the log says what failed
                log.exception("repository poll failed")
            await self._set_health()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: stop accepting, finish in-flight requests (up to ``grace`` s), unload, close."""
        self.servicer.live = False
        await self.health.enter_graceful_shutdown()
        for t in self._tasks:
            t.cancel()
        await self.rollouts.stop()
        if self.fleet is not None:
            await self.fleet.stop()
        self.rollouts.webhooks.close()
        await self.control_server.stop(1.0)
        await self.grpc_server.stop(grace if grace is not None else self.settings.shutdown_grace_s)
        if self.feedback_peers is not None:
            await self.feedback_peers.close()
        await self.manager.close()
        self.registry.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.tls is not None:
            self.tls.close()

    async def wait(self) -> None:
        await self.grpc_server.wait_for_termination()


def _beyond_loopback(host: str) -> bool:
    return host.strip("[]") not in {"127.0.0.1", "localhost", "::1"} and not host.startswith("127.")


def check_transport(settings: Settings, tls: ServerTls | None) -> None:
    """Closed by default: a port bound beyond loopback needs TLS, or ``--insecure`` said out loud."""
    if tls is not None:
        return
    exposed = []
    if _beyond_loopback(settings.host):
        exposed.append(f"inference {settings.host}:{settings.grpc_port}")
        if settings.metrics_port >= 0:
            exposed.append(f"metrics {settings.host}:{settings.metrics_port}")
    if _beyond_loopback(settings.control_address.rpartition(":")[0]):
        exposed.append(f"control {settings.control_address}")
    if not exposed:
        return
    if not settings.insecure:
        raise ConfigError(f"refusing to serve plaintext beyond loopback ({', '.join(exposed)}): pass --tls-cert FILE "
                          "--tls-key FILE (and --tls-ca FILE for client certificates; SWAPSERVE_TLS_CERT, "
                          "SWAPSERVE_TLS_KEY, SWAPSERVE_TLS_CA), or --insecure (SWAPSERVE_INSECURE=1) when the "
                          "network itself encrypts and authenticates (a service mesh), or bind 127.0.0.1")
    log.warning("INSECURE: serving PLAINTEXT beyond loopback (%s) because of --insecure: anyone who can reach "
                "these ports can read and alter requests, predictions and control tokens. Use --tls-cert/--tls-key "
                "unless a service mesh provides mTLS.", ", ".join(exposed))


class _HttpsServer(ThreadingHTTPServer):
    """Metrics over HTTPS: each accepted connection is wrapped with the TLS context current then
    (so a reload changes new connections only); the handshake runs in the connection's thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, tls: ServerTls) -> None:
        self.tls = tls
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        return self.tls.wrap(sock), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics: connection from %s failed (TLS handshake?)", client_address, exc_info=True)


def start_https_server(port: int, host: str, registry: Any, tls: ServerTls) -> _HttpsServer:
    """prometheus_client's exposition on HTTPS (mTLS with a CA), served by a daemon thread."""
    family_host = host.strip("[]")
    server_class = _HttpsServer
    if ":" in family_host:
        server_class = type("_HttpsServer6", (_HttpsServer,), {"address_family": socket.AF_INET6})
    httpd = server_class((family_host, port), MetricsHandler.factory(registry), tls)
    threading.Thread(target=httpd.serve_forever, name="metrics-https", daemon=True).start()
    return httpd


def _prepare_monitoring(monitor: MonitoringObserver, spec: ModelSpec, version: int) -> None:
    """A broken monitoring.yaml turns monitoring off for the model (the observer logs it); it never fails a load."""
    try:
        monitor.prepare(spec, version)
    except ConfigError:
        pass


async def create_server(settings: Settings, metrics: Metrics | None = None) -> Server:
    """Build, load models per the control mode, and start serving. Returns once the ports are bound
    and the start-up loads have finished (models that failed are UNAVAILABLE with their reason)."""
    # Transport first: a refusal should not wait for torch to import.
    tls = server_tls(settings.tls_cert, settings.tls_key, settings.tls_ca)
    check_transport(settings, tls)
    import torch

    torch.set_num_threads(max(1, settings.torch_threads))
    metrics = metrics or Metrics()
    device = resolve_device(settings.device)
    if settings.model_repository is None:
        raise ConfigError("no model repository: pass --model-repository DIR (or SWAPSERVE_MODEL_REPOSITORY); "
                          "`swapserve serve` on the command line defaults to $SWAPSERVE_HOME/model_repository")
    repository_dir = settings.model_repository
    repository = ModelRepository(repository_dir)
    control_host, _, control_port_text = settings.control_address.rpartition(":")
    control_token = settings.control_token_value()
    policy = AuthPolicy.load(settings.auth_file) if settings.auth_file is not None else AuthPolicy()
    if control_host not in LOOPBACK_HOSTS and not control_token and not policy.principals:
        raise ConfigError(f"the control service would listen on {settings.control_address}, which is not a loopback "
                          "address, without authentication; set --auth-file or --control-token-file (or "
                          "SWAPSERVE_CONTROL_TOKEN) or use 127.0.0.1")
    # The flag, else the auth file, else open only when the inference port binds loopback.
    inference_open = settings.inference_open
    if inference_open is None:
        inference_open = policy.inference_open
    if inference_open is None:
        inference_open = not _beyond_loopback(settings.host)
    if settings.device_memory_budget:
        budget = parse_bytes(settings.device_memory_budget)
    else:
        budget = int(device_free_bytes(device) * (0.5 if device == "cpu" else 0.8))
    registry = await asyncio.to_thread(Registry, settings.registry_url())
    auth = Authenticator(policy, control_token=control_token,
                         feedback_tokens=feedback_pairs(settings.feedback_token_file, settings.feedback_token),
                         inference_open=inference_open, registry=registry)
    try:  # the registry's tokens before the first call; the server starts without them when it is down
        await registry.call(auth.refresh)
    except SwapserveError as e:
        log.warning("could not read the registry's tokens at start (retrying every few seconds): %s", e)
    if not auth.inference_open and not auth.model_grants():
        log.warning("the inference port is closed (it binds %s) and no principal may call any model yet: every "
                    "inference call will be refused. Grant models with `swapserve token create NAME --models "
                    "'*'` or the auth file's principals, or open the port with --inference-open", settings.host)
    manager = ModelManager(repository, device=device, metrics=metrics, router=Router(), registry=registry,
                           backend_loader=_load_backend, batcher_factory=_batcher, memory_budget=budget,
                           max_queue_bytes=settings.max_queue_bytes)
    slices = SliceStats(metrics.registry)
    feedback = FeedbackObserver(slices, PredictionLog())
    monitor = MonitoringObserver(repository_dir, metrics.registry,
                                 context_dir=settings.home.expanduser() / "retrain")
    # Monitoring state is built and dropped on the lifecycle's load/unload workers, never per request.
    manager.on_version_resident = lambda spec, version: _prepare_monitoring(monitor, spec, version)
    manager.on_version_unloaded = monitor.forget
    outbox = Outbox(outbox_path(settings.home, settings.registry_url()))
    control = ControlPlane(manager, registry, slices, outbox=outbox, drift_summary=lambda model: {
        str(r.version): {"state": r.state, "score": round(max((w.score for w in r.windows), default=0.0), 6),
                         "most_drifted": [f"{f} ({w})" for w, f, _ in r.most_drifted(3)]}
        for r in monitor.reports(model)})
    webhooks = WebhookSender(outbox, settings.webhook_secret)
    outbox.subscribe(lambda: metrics.webhook_pending.set(len(outbox.pending("webhook"))))
    metrics.webhook_pending.set(len(outbox.pending("webhook")))
    replica_id = settings.replica_id or default_replica_id()
    rollouts = RolloutController(control, slices, metrics, webhooks=webhooks, replica_id=replica_id,
                                 lease_ttl_s=settings.rollout_lease_s)
    tag = replica_tag(replica_id)  # starts every id this replica assigns: a label finds its way back here
    dataplane = DataPlane(manager, metrics, observers=[feedback, monitor], request_ids=RequestIds(tag))
    control.on_tokens_changed = auth.refresh
    servicer = InferenceServicer(dataplane, manager, settings.model_control_mode, control,
                                 RepositoryAccess(enabled=settings.repository_api, auth=auth), InferenceGate.needed(auth),
                                 StreamLimits(settings.stream_max_inflight, settings.stream_max_queued_bytes))
    limit = settings.grpc_max_message_bytes
    frontend = settings.frontend
    if frontend is Frontend.AUTO:
        frontend = Frontend.NATIVE if native_frontend.available() else Frontend.PYTHON
        if frontend is Frontend.PYTHON:
            log.warning("the native gRPC front end is not in this install (it was built without grpc++): the "
                        "inference port runs on grpc.aio, about half as fast; install swapserve's wheel, or "
                        "install grpc++ (Debian/Ubuntu: libgrpc++-dev pkg-config) and reinstall from source")
    grpc_server: Any
    if frontend is Frontend.NATIVE:
        grpc_server = native_frontend.NativeServer(limit)
    else:
        grpc_server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    feedback_auth = FeedbackAuth.from_settings(settings.feedback_token_file, settings.feedback_token,
                                               settings.feedback_open, authenticator=auth)
    # In a fleet (PostgreSQL), labels for another replica's predictions are forwarded to it
    # (feedback.forward); on SQLite there is one replica and nothing to forward. The directory reads
    # the fleet lazily and learns this replica's address once the port is bound (below).
    advertised = settings.host if settings.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    feedback_peers = GrpcPeers(replica_id, None if tls is None else grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes() if tls.ca else None, private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes()))
    forwarder = None
    if sa.engine.make_url(registry.url).get_backend_name() == "postgresql":
        forwarder = Forwarder(feedback, PeerDirectory(
            lambda model: registry.call(_peers, registry, model), replica_id=replica_id,
            address="", tag=replica_tag), feedback_peers.send, tag=tag,
            counter=metrics.feedback_forwarded)
    feedback_pb2_grpc.add_FeedbackServicer_to_server(FeedbackServicer(feedback, feedback_auth, forwarder),
                                                     grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    # The asyncio reflection servicer, added directly: enable_server_reflection() would pick the
    # synchronous one for a server that is not a grpc.aio.Server (the native front end).
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(
        [INFERENCE_SERVICE, FEEDBACK_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME]), grpc_server)
    address = f"{settings.host}:{settings.grpc_port}"
    if tls is None:
        port = grpc_server.add_insecure_port(address)
    elif frontend is Frontend.NATIVE:
        port = grpc_server.add_tls_port(address, tls)
    else:
        port = grpc_server.add_secure_port(address, tls.grpc_credentials())
    if port == 0:
        raise OSError(f"could not bind the gRPC port {settings.host}:{settings.grpc_port}")

    control_server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(
        ControlServicer(control, auth, rollouts, drift=lambda model: monitor.report(model).to_dict()),
        control_server)
    reflection.enable_server_reflection([CONTROL_SERVICE, reflection.SERVICE_NAME], control_server)
    control_port = control_server.add_insecure_port(settings.control_address) if tls is None else \
        control_server.add_secure_port(settings.control_address, tls.grpc_credentials())
    if control_port == 0:
        raise OSError(f"could not bind the control service on {settings.control_address}")

    http = None
    metrics_port = None
    if settings.metrics_port >= 0:
        if tls is None:
            http, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
        else:
            http = start_https_server(settings.metrics_port, settings.host, metrics.registry, tls)
        metrics_port = http.server_port

    server = Server(settings, grpc_server, control_server, control, rollouts, registry, manager, servicer, health_servicer,
                    metrics, port, metrics_port, control_port, tls=tls, _http=http)
    # The fleet: follow the registry's deployments (NOTIFY + poll). Not ready before a first full pass.
    fleet = FleetSync(control, replica_id=replica_id, address=f"{advertised}:{port}", poll_s=settings.fleet_poll_s)
    if forwarder is not None:
        forwarder.directory.address = fleet.address
    control.fleet = server.fleet = fleet
    server.feedback_peers = feedback_peers
    manager.ready_gate = fleet.ready
    await server._set_health()
    await grpc_server.start()  # live (ServerLive) while models load; ready once they have
    await control_server.start()
    log.info("gRPC inference on %s:%d (%s front end), control on %s:%d, metrics on %s; %s", settings.host, port,
             frontend.value, control_host, control_port, metrics_port,
             "plaintext" if tls is None else f"TLS{' with client certificates (mTLS)' if tls.mutual else ''} "
             f"on every port ({tls.cert})")

    # Decisions journaled before a crash reach the registry before it is read back, so a rollback
    # stays rolled back (and its rollout is not resumed).
    if not await control.reconciler.drain():
        log.error("outbox: %d decision(s) could not be recorded at start (%s); retrying in the background",
                  len(control.reconciler.pending()), control.reconciler.last_error)
    server._tasks.append(asyncio.create_task(control.reconciler.run()))
    server._tasks.append(asyncio.create_task(auth.run(registry.call)))  # registry tokens, now and every 2 s
    server._tasks.append(asyncio.create_task(webhooks.run()))
    # The registry's record of what is live wins over the start-up load rules (promise 5).
    restored = await manager.restore()
    names = [n for n in repository.names() if n not in restored]
    if settings.model_control_mode is ControlMode.EXPLICIT:
        wanted = names if "*" in settings.load_model else [n for n in settings.load_model if n not in restored]
        for n in [n for n in wanted if n not in names]:
            log.error("--load-model %s: no such model in %s", n, repository_dir)
        await manager.load_all([n for n in wanted if n in names])
    else:
        await manager.load_all(names)
    manager.on_change = lambda name: server._refresh_health()
    fleet.on_ready_change = server._refresh_health
    # What changed in the registry while this replica restored is applied before it reports ready.
    await fleet.start()
    await rollouts.start_loop()
    server.monitor, server.slices = monitor, slices
    server._tasks.append(asyncio.create_task(server._monitor()))
    await server._set_health()
    if settings.model_control_mode is ControlMode.POLL:
        server._tasks.append(asyncio.create_task(server._poll()))
    return server


#: How long a thread may hold the GIL while another waits for it (CPython's default is 5 ms). The
#: event loop answers requests; control-path work (registry writes, drift scoring) runs in threads,
#: and with the default a request could wait 5 ms for the loop's thread to get the GIL back.
GIL_SWITCH_INTERVAL_S = 0.0005


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully. Returns the process exit code."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    server = await create_server(settings)
    # Everything loaded at start (torch, models, the registry's ORM) lives as long as the server:
    # keep it out of the collector's full passes, which would otherwise stall requests ~0.2 s.
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls)
    control_host = settings.control_address.rpartition(":")[0]
    print(f"swapserve ready: grpc={settings.host}:{server.grpc_port} metrics={server.metrics_port} "
          f"control={control_host}:{server.control_port}", flush=True)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests")
    await server.stop()
    return 0
