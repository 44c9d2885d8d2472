"""Prometheus metrics.

Triton's names and labels are used wherever the meaning is the same, so existing
Triton dashboards work unchanged. prometheus-client's text exposition appends
``_total`` to every counter family, which would break those dashboards, so Triton's
cumulative series are exported by ``_TritonCounters`` (a custom collector) under their
exact names with TYPE ``untyped``; PromQL's rate() and increase() treat them the same.
Our own latency histograms carry the ``swapserve_`` prefix.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

#: Latency buckets in seconds: 100 µs .. 10 s.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (a batch of N counts N)",
    "nv_inference_exec_count": "Number of model executions performed (a batch counts once)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_input_duration_us": "Cumulative compute input duration in microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds",
    "nv_inference_compute_output_duration_us": "Cumulative inference compute output duration in microseconds",
}


class _TritonCounters(Collector):
    """Cumulative counters exported under Triton's exact metric names (no ``_total``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, ...], float]] = defaultdict(lambda: defaultdict(float))

    def add(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._values[name][labels] += value

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = {name: dict(series) for name, series in self._values.items()}
        for name, doc in _COUNTERS.items():
            label_names = ["model", "version", "reason"] if name == "nv_inference_request_failure" else ["model", "version"]
            family = Metric(name, doc, "unknown")
            for labels, value in snapshot.get(name, {}).items():
                family.add_sample(name, dict(zip(label_names, labels)), value)
            yield family


class Metrics:
    """All of the server's metrics, registered on an injected ``CollectorRegistry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._counters = _TritonCounters()
        self.registry.register(self._counters)
        self.request_latency = Histogram(
            "swapserve_request_latency_seconds", "End-to-end server latency of successful requests",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_latency = Histogram(
            "swapserve_queue_latency_seconds", "Time requests waited in the batcher queue",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute_latency = Histogram(
            "swapserve_compute_latency_seconds", "Model execution time per batch",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "swapserve_batch_size", "Rows per executed batch", ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.version_ready = Gauge(
            "swapserve_version_ready", "1 when the version is resident and warmed", ["model", "version"],
            registry=self.registry)
        self.shadow_requests = Counter(
            "swapserve_shadow_requests", "Shadow copies by result: agree/diverge (vs the served answer), shed, error",
            ["model", "version", "result"], registry=self.registry)
        self.traffic_share = Gauge(
            "swapserve_traffic_share", "Share of unpinned traffic routed to the version (0..1)", ["model", "version"],
            registry=self.registry)
        self.rollout_stage = Gauge(
            "swapserve_rollout_stage", "Index of the active rollout's stage (-1: no rollout)", ["model"],
            registry=self.registry)
        self.rollbacks = Counter(
            "swapserve_rollbacks", "Automatic rollbacks by the rollout controller", ["model"], registry=self.registry)
        self.serving_version = Gauge(
            "swapserve_serving_version", "Version that unpinned requests are routed to", ["model"],
            registry=self.registry)

    def request_success(self, model: str, version: str, duration_s: float, queue_s: float) -> None:
        labels = (model, version)
        self._counters.add("nv_inference_request_success", labels, 1)
        self._counters.add("nv_inference_request_duration_us", labels, duration_s * 1e6)
        self._counters.add("nv_inference_queue_duration_us", labels, queue_s * 1e6)
        self.request_latency.labels(model, version).observe(duration_s)
        self.queue_latency.labels(model, version).observe(queue_s)

    def request_failure(self, model: str, version: str, reason: str, duration_s: float = 0.0) -> None:
        """``reason``: REJECTED (invalid request), BACKEND (model raised), CANCELED, OTHER."""
        self._counters.add("nv_inference_request_failure", (model, version, reason), 1)
        if duration_s:
            self._counters.add("nv_inference_request_duration_us", (model, version), duration_s * 1e6)

    def execution(self, model: str, version: str, rows: int, input_s: float, infer_s: float, output_s: float) -> None:
        labels = (model, version)
        self._counters.add("nv_inference_count", labels, rows)
        self._counters.add("nv_inference_exec_count", labels, 1)
        self._counters.add("nv_inference_compute_input_duration_us", labels, input_s * 1e6)
        self._counters.add("nv_inference_compute_infer_duration_us", labels, infer_s * 1e6)
        self._counters.add("nv_inference_compute_output_duration_us", labels, output_s * 1e6)
        self.compute_latency.labels(model, version).observe(infer_s)
        self.batch_size.labels(model, version).observe(rows)
