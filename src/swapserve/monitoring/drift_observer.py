"""The monitoring observer: data quality and drift for every model version, plus retraining.

Wiring (the server does this)::

    monitor = MonitoringObserver(repository_root, metrics.registry, context_dir=settings.home / "retrain")
    dataplane = DataPlane(manager, metrics, observers=[..., monitor])
    manager.on_version_resident = monitor.prepare   # the lifecycle's load worker, before traffic
    manager.on_version_unloaded = monitor.forget    # the lifecycle's unload worker
    events = monitor.tick()               # every second or so, off the event loop (a thread)
    monitor.record_accuracy(model, version, accuracy, labelled)   # from the feedback join
    monitor.report("digits")              # `swapserve drift digits`, `swapserve status digits`

Threads and loops:

- ``on_request`` / ``on_response`` / ``on_error`` run on the event loop for every request. They
  take the version's own lock for a few microseconds (checks and sketch appends), never do
  I/O, and never build anything big: the lifecycle ``prepare``-s every version on its load
  worker before the version takes traffic. (Used without a lifecycle, as in unit tests, the
  first request of a version nobody prepared loads its monitoring.yaml and reference file.)
- ``tick`` and ``report`` may run on any one other thread (or the loop, in an executor). They
  copy the sketches under the version lock (microseconds) and score outside it, and they build
  captured profiles (quantiles over ``profile.capture`` rows) outside it too. ``tick`` is not
  re-entrant: call it from one place.
- Prometheus scrapes (``collect``) read the last tick's scores and the live counters.

Per version, memory is bounded by the config when the version is first seen: the capture
buffers (``capture x features x 4`` bytes, freed once the profile is built), the reference
profile (``features x (bins + 3)`` x 8 bytes), the data-quality counters (``4 x features``
int64), the sketches (``windows x slots x features x (bins + 6)`` x 8 bytes) and their
pending buffers (``256 x features`` x 4 or 8 bytes) - for ``digits`` with defaults about
200 KB; ``memory_bytes()`` reports the actual figure.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swapserve import units
from swapserve.errors import ConfigError, InvalidInput, ModelNotFound, SwapserveError
from swapserve.monitoring.drift import STATES, DriftReport, Sketch, WindowReport, score_window
from swapserve.monitoring.monitor_config import MonitoringConfig, load_monitoring_config
from swapserve.monitoring.profile import FeatureLayout, FeatureProfile, Profile, build_profile, load_reference
from swapserve.monitoring.quality import KINDS, QualityChecker
from swapserve.monitoring.trigger import RetrainingTrigger, TriggerRecord
from swapserve.repository.paths import inside
from swapserve.types import InferRequest, ModelSpec

log = logging.getLogger(__name__)

#: Rows buffered per version before they are binned and counted as one block.
PENDING_ROWS = 256

#: Per-feature data-quality series exported per version (the features with most issues).
TOP_QUALITY_FEATURES = 10


@dataclass(frozen=True)
class MonitorEvent:
    """Something the server should log to the registry's event/audit log.

    kind: ``drift_alert`` (an alert episode starts), ``drift_resolved`` (it ends),
    ``profile_ready`` (a captured profile was built), ``retrain_triggered``, ``retrain_finished``.
    """

    kind: str
    model: str
    version: int
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "version": self.version, "message": self.message,
                "detail": self.detail}


def _constant_rates(layout: FeatureLayout, x: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    off = 0
    for s in layout.tensors:
        part = x[:, off: off + s.width]
        off += s.width
        out[s.name] = float(np.mean(part.max(axis=1) == part.min(axis=1))) if s.width >= 2 and len(x) else 0.0
    return out


class _Capture:
    """The first N live rows of one feature set, while the version has no reference for it."""

    def __init__(self, rows: int, width: int) -> None:
        self.buf = np.empty((rows, width), dtype=np.float32)
        self.n = 0

    @property
    def full(self) -> bool:
        return self.n >= len(self.buf)

    def add(self, x: np.ndarray) -> None:
        take = min(len(x), len(self.buf) - self.n)
        if take > 0:
            self.buf[self.n: self.n + take] = x[:take]
            self.n += take


class _Version:
    """Everything monitored for one (model, version). Hot-path fields are guarded by ``lock``."""

    def __init__(self, spec: ModelSpec, version: int, config: MonitoringConfig, version_dir: Path) -> None:
        self.lock = threading.Lock()
        self.model, self.version, self.config = spec.name, version, config
        self.batching = spec.batching
        #: A request may leave out an optional input; such a request has no full feature row to profile.
        self.optional = any(t.optional for t in spec.inputs)
        self.in_layout = FeatureLayout.for_inputs(spec, config.profile.max_features)
        self.out_layout = FeatureLayout.for_outputs(spec)
        self.out_names = frozenset(s.name for s in self.out_layout.tensors)
        self.quality = QualityChecker(spec.name, version, self.in_layout, config.quality)
        #: reject: every request is checked in on_request; count: blocks are counted at flush.
        self.sync_quality = config.quality.policy == "reject"
        wide = any(t.datatype in ("FP64", "INT32", "UINT32", "INT64", "UINT64") for t in self.in_layout.tensors)
        self.pend_x = np.empty((PENDING_ROWS, self.in_layout.width), dtype=np.float64 if wide else np.float32)
        self.pend_y = np.empty((PENDING_ROWS, self.out_layout.width), dtype=np.float64)
        self.pend_t = np.empty(PENDING_ROWS, dtype=np.float64)
        self.pend_has_y = np.zeros(PENDING_ROWS, dtype=bool)
        self.pending = 0
        self.profile = Profile()
        self.in_sketch: Sketch | None = None
        self.out_sketch: Sketch | None = None
        self.cap_in: _Capture | None = None
        self.cap_out: _Capture | None = None
        self.error = ""
        self.alerting = False
        self.episode = 0
        self.last_report: DriftReport | None = None
        self.requests = 0
        sources = []
        ref = None
        try:
            reference = inside(version_dir, config.profile.reference_file,
                               what=f"model '{spec.name}' version {version} monitoring.yaml profile.reference_file")
            ref = load_reference(reference, spec, version)
        except (ConfigError, InvalidInput) as exc:
            self.error = exc.message
            log.error("%s; capturing the profile from live traffic instead", exc.message)
        if ref is not None and ref.rows < config.profile.min_reference_rows:
            sources.append(f"{ref.path.name} ignored ({ref.rows} rows < min_reference_rows "
                           f"{config.profile.min_reference_rows})")
            ref = None
        if ref is not None and ref.inputs is not None:
            x = self.in_layout.extract(ref.inputs, ref.rows)
            self._install_inputs(build_profile(x, self.in_layout, config.profile.bins), _constant_rates(self.in_layout, x))
            sources.append(f"inputs from {ref.path.name} ({ref.rows} rows)")
        else:
            self.cap_in = _Capture(config.profile.capture, self.in_layout.width)
        if ref is not None and ref.outputs is not None and all(s.name in ref.outputs for s in self.out_layout.tensors):
            y = self.out_layout.extract_by_name(ref.outputs, ref.rows)
            self._install_outputs(build_profile(y, self.out_layout, config.profile.bins))
            sources.append(f"outputs from {ref.path.name}")
        else:
            self.cap_out = _Capture(config.profile.capture, self.out_layout.width)
        self.sources = sources

    def _install_inputs(self, prof: FeatureProfile, const: dict[str, float]) -> None:
        self.profile.inputs = prof
        self.profile.constant_row_rate = const
        self.quality.set_profile(self.profile)
        self.in_sketch = Sketch(prof, self.config.windows_s, self.config.slots)

    def _install_outputs(self, prof: FeatureProfile) -> None:
        self.profile.outputs = prof
        self.out_sketch = Sketch(prof, self.config.windows_s, self.config.slots)

    def source(self) -> str:
        parts = list(self.sources)
        if self.cap_in is not None:
            parts.append(f"inputs capturing {self.cap_in.n}/{len(self.cap_in.buf)} requests' rows")
        elif not any(p.startswith("inputs from") for p in parts):
            parts.append(f"inputs captured (first {self.config.profile.capture} rows)")
        if self.cap_out is not None:
            parts.append(f"outputs capturing {self.cap_out.n}/{len(self.cap_out.buf)}")
        elif not any(p.startswith("outputs from") for p in parts):
            parts.append(f"outputs captured (first {self.config.profile.capture} rows)")
        return "; ".join(parts)

    # -- hot path: buffer; flush bins and counts a whole block -------------------------------

    def append(self, now: float, x: np.ndarray, y: np.ndarray | None) -> None:
        """Buffer one response's rows (caller holds ``lock``); flushes when the buffer is full."""
        rows = x.shape[0]
        if self.pending + rows > PENDING_ROWS:
            self.flush()
            if rows > PENDING_ROWS:  # a batch bigger than the buffer: process it directly
                self._process(np.full(rows, now), x, y)
                return
        n = self.pending
        self.pend_x[n: n + rows] = x
        self.pend_t[n: n + rows] = now
        if y is not None:
            self.pend_y[n: n + rows] = y
        self.pend_has_y[n: n + rows] = y is not None
        self.pending = n + rows

    def flush(self) -> None:
        """Process the buffered rows (caller holds ``lock``)."""
        n = self.pending
        if n:
            self.pending = 0
            has_y = self.pend_has_y[:n]
            y = self.pend_y[:n] if has_y.all() else (self.pend_y[:n][has_y] if has_y.any() else None)
            self._process(self.pend_t[:n], self.pend_x[:n], y, self.pend_t[:n][has_y])

    def _process(self, t: np.ndarray, x: np.ndarray, y: np.ndarray | None, ty: np.ndarray | None = None) -> None:
        if not self.sync_quality:
            self.quality.check_block(x)
        if self.in_sketch is not None:
            self.in_sketch.add(t, x)
        elif self.cap_in is not None:
            self.cap_in.add(x)
        if y is not None:
            if self.out_sketch is not None:
                self.out_sketch.add(t if ty is None else ty, y)
            elif self.cap_out is not None:
                self.cap_out.add(y)

    def memory_bytes(self) -> int:
        total = self.quality.nbytes() + self.profile.nbytes()
        total += self.pend_x.nbytes + self.pend_y.nbytes + self.pend_t.nbytes + self.pend_has_y.nbytes
        total += sum(s.nbytes() for s in (self.in_sketch, self.out_sketch) if s is not None)
        total += sum(c.buf.nbytes for c in (self.cap_in, self.cap_out) if c is not None)
        return total

    # -- control path: build captured profiles -------------------------------------------------

    def finish_capture(self) -> list[str]:
        """Build profiles whose capture is full (quantiles outside the lock); names what was built."""
        built = []
        with self.lock:
            self.flush()
            cin = self.cap_in.buf.copy() if self.cap_in is not None and self.cap_in.full else None
            cout = self.cap_out.buf.copy() if self.cap_out is not None and self.cap_out.full else None
        if cin is not None:
            prof = build_profile(cin, self.in_layout, self.config.profile.bins)
            const = _constant_rates(self.in_layout, cin)
            with self.lock:
                self._install_inputs(prof, const)
                self.cap_in = None
            built.append("inputs")
        if cout is not None:
            prof = build_profile(cout, self.out_layout, self.config.profile.bins)
            with self.lock:
                self._install_outputs(prof)
                self.cap_out = None
            built.append("outputs")
        return built

    def score(self, now: float) -> DriftReport:
        windows: list[WindowReport] = []
        with self.lock:
            self.flush()
            snap_in = self.in_sketch.aggregate(now) if self.in_sketch is not None else None
            snap_out = self.out_sketch.aggregate(now) if self.out_sketch is not None else None
            quality = self.quality.snapshot()
        ref_in, ref_out = self.profile.inputs, self.profile.outputs
        if snap_in is not None or snap_out is not None:
            for i, w in enumerate(self.config.windows_s):
                a = snap_in[i] if snap_in is not None else None
                b = snap_out[i] if snap_out is not None else None
                rows = a[1] if a is not None else (b[1] if b is not None else 0)
                windows.append(score_window(
                    units.format_duration(w), w, rows, ref_in if a else None, a[0] if a else None,
                    ref_out if b else None, b[0] if b else None, self.config.drift,
                    a[2] if a else None, a[3] if a else None))
        return DriftReport(self.model, self.version, self.source(), tuple(windows), quality.to_dict(), self.error)


class MonitoringObserver:
    """RequestObserver for data quality and drift of every model, plus the retraining trigger.

    ``repository_root`` is the model repository (``<root>/<model>/monitoring.yaml``,
    ``<root>/<model>/<version>/reference.npz``). Metrics are registered on
    ``metrics_registry`` when given. ``clock`` (monotonic seconds) places requests in window
    slots and drives the trigger's rate limits; ``wall_clock`` stamps trigger records.
    ``context_dir`` receives the retraining JSON contexts and command logs.
    """

    def __init__(self, repository_root: Path | str, metrics_registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, *, wall_clock: Callable[[], float] = time.time,
                 context_dir: Path | str | None = None) -> None:
        self.root = Path(repository_root)
        self.clock, self.wall_clock = clock, wall_clock
        self.context_dir = Path(context_dir) if context_dir is not None else Path("~/.swapserve/retrain").expanduser()
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], _Version | None] = {}
        self._configs: dict[str, MonitoringConfig | ConfigError] = {}
        self._errors: dict[str, str] = {}
        self._triggers: dict[str, RetrainingTrigger] = {}
        self._accuracy: dict[tuple[str, int], tuple[float, int]] = {}
        self._trigger_counts: dict[tuple[str, str, str], int] = {}
        self._reports: dict[tuple[str, int], DriftReport] = {}
        if metrics_registry is not None:
            metrics_registry.register(_MonitoringCollector(self))

    # -- configuration and state ---------------------------------------------------------------

    def config(self, model: str) -> MonitoringConfig:
        """The model's monitoring config (cached). Raises ConfigError for a broken monitoring.yaml."""
        with self._lock:
            cfg = self._configs.get(model)
            if cfg is None:
                try:
                    cfg = load_monitoring_config(self.root / model)
                except ConfigError as exc:
                    cfg = exc
                self._configs[model] = cfg
        if isinstance(cfg, ConfigError):
            raise cfg
        return cfg

    def prepare(self, spec: ModelSpec, version: int) -> None:
        """(Re)build the version's state now, off the request path: the model's monitoring.yaml
        (cached per model) and the version's reference file. Replaces any earlier state of that
        version at once (a new config of a resident version starts afresh), so a request sees
        either the old state or the new, never none.

        Raises ConfigError for a broken monitoring.yaml (monitoring is then off for the model and
        requests never retry the load); a broken reference file is reported in the drift report
        and the profile is captured from traffic instead.
        """
        key = (spec.name, version)
        try:
            new = self._build(spec, version)
        except ConfigError:
            with self._lock:
                self._versions[key] = None
            raise
        with self._lock:
            self._versions[key] = new
            self._reports.pop(key, None)

    def forget(self, model: str, version: int | None = None) -> None:
        """Drop a version's monitoring state (when it is unloaded), or every version of a model."""
        with self._lock:
            for key in [k for k in self._versions if k[0] == model and (version is None or k[1] == version)]:
                del self._versions[key]
                self._reports.pop(key, None)

    def reload(self, model: str) -> None:
        """Re-read monitoring.yaml and the reference files of ``model`` (profiles and sketches restart)."""
        with self._lock:
            self._configs.pop(model, None)
            self._triggers.pop(model, None)
        self.forget(model)

    def _disable(self, model: str, exc: ConfigError) -> None:
        """A broken monitoring.yaml: logged once per message, shown by ``report``."""
        if self._errors.get(model) != exc.message:
            log.error("monitoring disabled for model '%s': %s", model, exc.message)
            self._errors[model] = exc.message

    def _state(self, spec: ModelSpec, version: int) -> _Version | None:
        key = (spec.name, version)
        st = self._versions.get(key, False)
        if st is not False:
            return st  # type: ignore[return-value]
        try:
            new = self._build(spec, version)
        except ConfigError:
            new = None  # monitoring is off for the model; _build logged why
        with self._lock:
            return self._versions.setdefault(key, new)

    def _build(self, spec: ModelSpec, version: int) -> _Version | None:
        """A version's fresh state (None when monitoring is off for its model); ConfigError, logged once,
        when its monitoring.yaml is broken."""
        try:
            cfg = self.config(spec.name)
        except ConfigError as exc:
            self._disable(spec.name, exc)
            raise
        return _Version(spec, version, cfg, self.root / spec.name / str(version)) if cfg.enabled else None

    # -- hot path (RequestObserver) -----------------------------------------------------------

    def on_request(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray]) -> None:
        st = self._versions.get((spec.name, version)) or self._state(spec, version)
        if st is None or not st.sync_quality or not inputs or (st.optional and any(a is None for a in inputs)):
            return  # policy count: counted off the request path, from the buffered rows
        rows = inputs[0].shape[0] if st.batching else 1
        with st.lock:
            st.requests += 1
            st.quality.check(inputs, rows)

    def on_response(self, req: InferRequest, spec: ModelSpec, version: int, inputs: list[np.ndarray],
                    outputs: dict[str, np.ndarray], latency_s: float) -> None:
        st = self._versions.get((spec.name, version)) or self._state(spec, version)
        if st is None or not inputs or (st.optional and any(a is None for a in inputs)):
            return
        rows = inputs[0].shape[0] if st.batching else 1
        now = self.clock()
        x = st.in_layout.extract(inputs, rows)
        y = st.out_layout.extract_outputs(outputs, rows) if st.out_names and st.out_names <= outputs.keys() else None
        with st.lock:
            st.append(now, x, y)

    def on_error(self, req: InferRequest, spec: ModelSpec, version: int, error: SwapserveError,
                 latency_s: float) -> None:
        return None

    # -- control path ---------------------------------------------------------------------------

    def record_accuracy(self, model: str, version: int, accuracy: float, labelled: int) -> None:
        """Live accuracy of a version from the feedback join (for the trigger's accuracy floor)."""
        with self._lock:
            self._accuracy[(model, version)] = (float(accuracy), int(labelled))

    def _versions_of(self, model: str | None = None) -> list[_Version]:
        with self._lock:
            return [v for k, v in sorted(self._versions.items()) if v is not None and (model is None or k[0] == model)]

    def report(self, model: str, version: int | None = None) -> DriftReport:
        """Score now (does not change alert states). ``version`` None: the version with the most
        rows in the shortest window (the champion, in practice), ties to the newest.

        Raises ModelNotFound when the model has no monitored version (yet).
        """
        now = self.clock()
        states = [v for v in self._versions_of(model) if version is None or v.version == version]
        if not states:
            err = self._errors.get(model)
            if err:
                return DriftReport(model, version or 0, "", error=err)
            what = f"model '{model}'" + (f" version {version}" if version is not None else "")
            raise ModelNotFound(f"{what} has no drift data yet: it has not served requests since the server "
                                f"started (or was unloaded)")
        reports = []
        for st in states:
            st.finish_capture()
            reports.append(st.score(now))
        return max(reports, key=lambda r: (r.windows[0].samples if r.windows else -1, r.version))

    def reports(self, model: str) -> list[DriftReport]:
        """The last tick's report of every monitored version of ``model`` (none before the first tick)."""
        with self._lock:
            return [r for (m, _), r in sorted(self._reports.items()) if m == model]

    def _trigger(self, model: str, cfg: MonitoringConfig) -> RetrainingTrigger:
        with self._lock:
            trig = self._triggers.get(model)
            if trig is None:
                trig = RetrainingTrigger(model, cfg.trigger, self.root, self.context_dir, self.clock, self.wall_clock)
                self._triggers[model] = trig
            return trig

    def tick(self, now: float | None = None) -> list[MonitorEvent]:
        """Build finished captures, score every window, update alert states and metrics, run triggers.

        Returns the events to log, in order: profile_ready, drift_alert / drift_resolved (a
        version's alert episode = any of its windows continuously in alert), retrain_triggered,
        retrain_finished. Call periodically (e.g. every second) from one thread.
        """
        now = self.clock() if now is None else now
        events: list[MonitorEvent] = []
        by_model: dict[str, list[tuple[_Version, DriftReport]]] = {}
        for st in self._versions_of():
            for what in st.finish_capture():
                events.append(MonitorEvent("profile_ready", st.model, st.version,
                                           f"model '{st.model}' version {st.version}: {what} reference profile "
                                           f"captured from the first {st.config.profile.capture} rows"))
            rep = st.score(now)
            with self._lock:
                self._reports[(st.model, st.version)] = rep
            st.last_report = rep
            if rep.alert != st.alerting:
                st.alerting = rep.alert
                if rep.alert:
                    st.episode += 1
                    worst = rep.most_drifted(3)
                    top = ", ".join(f"{f} psi={s.psi:.3f} ({w})" for w, f, s in worst)
                    events.append(MonitorEvent("drift_alert", st.model, st.version,
                                               f"model '{st.model}' version {st.version}: drift alert "
                                               f"(episode {st.episode}); most drifted: {top}", rep.to_dict(5)))
                else:
                    events.append(MonitorEvent("drift_resolved", st.model, st.version,
                                               f"model '{st.model}' version {st.version}: drift alert "
                                               f"episode {st.episode} resolved", {"episode": st.episode}))
            by_model.setdefault(st.model, []).append((st, rep))
        for model, items in by_model.items():
            cfg = items[0][0].config
            trig = self._trigger(model, cfg)
            alerting = [(st, rep) for st, rep in items if st.alerting]
            with self._lock:
                acc = {v: a for (m, v), a in self._accuracy.items() if m == model}
            # Name the alerting version (highest score), else the busiest one.
            if alerting:
                st, rep = max(alerting, key=lambda p: max(w.score for w in p[1].windows))
            else:
                st, rep = max(items, key=lambda p: (p[1].windows[0].samples if p[1].windows else 0, p[0].version))
            accuracy, labelled = acc.get(st.version, (None, 0))
            floor = cfg.trigger.accuracy_floor
            if floor is not None:  # a version under the floor wins over the busiest
                low = [(v, a) for v, a in acc.items() if a[1] >= cfg.trigger.min_labelled and a[0] < floor]
                if low and not alerting:
                    version, (accuracy, labelled) = min(low, key=lambda p: p[1][0])
                    st = next((s for s, _ in items if s.version == version), st)
                    rep = next((r for s, r in items if s.version == version), rep)
            rec = trig.evaluate(now, st.version, drift_alert=bool(alerting), drift_report=rep.to_dict(),
                                accuracy=accuracy, labelled=labelled)
            if rec is not None:
                events.append(self._trigger_event("retrain_triggered", rec))
        for model, trig in list(self._triggers.items()):
            for rec in trig.poll():
                events.append(self._trigger_event("retrain_finished", rec))
        return events

    def _trigger_event(self, kind: str, rec: TriggerRecord) -> MonitorEvent:
        with self._lock:
            key = (rec.model, rec.reason, rec.status)
            self._trigger_counts[key] = self._trigger_counts.get(key, 0) + 1
        verb = "triggered" if kind == "retrain_triggered" else "finished"
        return MonitorEvent(kind, rec.model, rec.version,
                            f"model '{rec.model}': retraining {verb} ({rec.reason}, {rec.action}, {rec.status})"
                            + (f": {rec.detail}" if rec.detail else ""), rec.to_dict())

    def join_triggers(self, timeout: float = 30.0) -> list[MonitorEvent]:
        """Wait for running retraining actions (shutdown, tests); returns their retrain_finished events."""
        return [self._trigger_event("retrain_finished", rec)
                for trig in list(self._triggers.values()) for rec in trig.join(timeout)]

    def memory_bytes(self, model: str, version: int) -> int:
        """Bytes held for one version (sketches, profile, counters, capture buffers); 0 when unknown."""
        with self._lock:
            st = self._versions.get((model, version))
        return st.memory_bytes() if st is not None else 0

    # -- metrics ----------------------------------------------------------------------------------

    def _collect(self) -> Iterator[Metric]:
        score = GaugeMetricFamily("swapserve_drift_score",
                                  "Drift score per window: PSI of the top-k input features, __inputs__ / "
                                  "__prediction__ (max PSI among significant features) and __overall__",
                                  labels=["model", "version", "window", "feature"])
        alert = GaugeMetricFamily("swapserve_drift_alert", "1 while the window's drift state is alert",
                                  labels=["model", "version", "window"])
        state = GaugeMetricFamily("swapserve_drift_state",
                                  "Drift state per window: 0 insufficient data, 1 ok, 2 warn, 3 alert",
                                  labels=["model", "version", "window"])
        samples = GaugeMetricFamily("swapserve_drift_window_samples", "Rows in the window's live sketch",
                                    labels=["model", "version", "window"])
        ready = GaugeMetricFamily("swapserve_drift_profile_ready",
                                  "1 when the version's input reference profile exists (0: still capturing)",
                                  labels=["model", "version"])
        memory = GaugeMetricFamily("swapserve_monitoring_memory_bytes",
                                   "Memory held by the version's drift and data-quality state",
                                   labels=["model", "version"])
        issues = CounterMetricFamily("swapserve_data_quality_issues",
                                     "Data-quality issues: nan/inf/out_of_range count values, constant counts rows",
                                     labels=["model", "version", "input", "kind"])
        values = CounterMetricFamily("swapserve_data_quality_values", "Input values checked for data quality",
                                     labels=["model", "version", "input"])
        rows = CounterMetricFamily("swapserve_data_quality_rows", "Input rows checked for data quality",
                                   labels=["model", "version", "input"])
        rejected = CounterMetricFamily("swapserve_data_quality_rejected",
                                       "Requests rejected by the data-quality policy",
                                       labels=["model", "version", "input"])
        feat = CounterMetricFamily("swapserve_data_quality_feature_issues",
                                   f"Data-quality issues of the {TOP_QUALITY_FEATURES} features with the most issues",
                                   labels=["model", "version", "feature", "kind"])
        triggers = CounterMetricFamily("swapserve_retraining_triggers", "Retraining trigger firings and outcomes",
                                       labels=["model", "reason", "status"])
        for st in self._versions_of():
            m, v = st.model, str(st.version)
            with st.lock:
                st.flush()
                snap = st.quality.snapshot()
                has_profile = st.profile.inputs is not None
                mem = st.memory_bytes()
            ready.add_metric([m, v], 1.0 if has_profile else 0.0)
            memory.add_metric([m, v], float(mem))
            for name, c in snap.inputs.items():
                for kind in KINDS:
                    issues.add_metric([m, v, name, kind], float(getattr(c, kind)))
                values.add_metric([m, v, name], float(c.values))
                rows.add_metric([m, v, name], float(c.rows))
                rejected.add_metric([m, v, name], float(c.rejected))
            for fname, kind, n in snap.top_features(TOP_QUALITY_FEATURES):
                feat.add_metric([m, v, fname, kind], float(n))
            rep = st.last_report
            if rep is None:
                continue
            k = st.config.drift.top_k
            for w in rep.windows:
                alert.add_metric([m, v, w.window], 1.0 if w.state == "alert" else 0.0)
                state.add_metric([m, v, w.window], float(STATES.index(w.state)))
                samples.add_metric([m, v, w.window], float(w.samples))
                if w.state == "insufficient":
                    continue
                score.add_metric([m, v, w.window, "__overall__"], w.score)
                score.add_metric([m, v, w.window, "__inputs__"], w.input_score)
                score.add_metric([m, v, w.window, "__prediction__"], w.prediction_score)
                for f in w.features[:k]:
                    score.add_metric([m, v, w.window, f.name], f.psi)
        with self._lock:
            counts = dict(self._trigger_counts)
        for (m, reason, status), n in sorted(counts.items()):
            triggers.add_metric([m, reason, status], float(n))
        yield from (score, alert, state, samples, ready, memory, issues, values, rows, rejected, feat, triggers)


class _MonitoringCollector(Collector):
    def __init__(self, observer: MonitoringObserver) -> None:
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        return self._observer._collect()
