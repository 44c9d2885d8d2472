"""Request figures: one VersionStats tally per version, rendered as Triton counters and histograms at scrape."""
from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from swapserve.telemetry.metrics import Metrics
from swapserve.telemetry.statistics import LATENCY_BUCKETS, Buckets


def scrape(m: Metrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_buckets_follow_prometheus_le_semantics() -> None:
    b = Buckets((1, 2, 4))
    for v in (0.5, 1, 1.5, 2, 4, 4.5, 100):
        b.observe(v)
    assert b.counts == [2, 2, 1, 2]  # <=1, (1,2], (2,4], +Inf
    assert b.total == 113.5


def test_counters_and_histograms_come_from_the_tally() -> None:
    m = Metrics()
    st = m.stats("digits", "2")
    assert m.stats("digits", "2") is st  # one tally per version for the server's lifetime
    st.execution(rows=3, requests=2, input_ns=1_000, infer_ns=40_000, output_ns=2_000)
    st.request_done(True, 300_000, queue_ns=5_000)
    st.request_done(True, 2_000_000, queue_ns=0)
    st.request_done(False, 1_000, reason="REJECTED")
    st.request_done(False, 7_000, reason="BACKEND")
    st.request_done(False, 9_000, reason="BACKEND")
    got = scrape(m)
    labels = (("model", "digits"), ("version", "2"))
    assert got["nv_inference_request_success"][labels] == 2
    assert got["nv_inference_request_failure"][tuple(sorted(labels + (("reason", "BACKEND"),)))] == 2
    assert got["nv_inference_request_failure"][tuple(sorted(labels + (("reason", "REJECTED"),)))] == 1
    assert got["nv_inference_count"][labels] == 3 and got["nv_inference_exec_count"][labels] == 1
    assert got["nv_inference_request_duration_us"][labels] == (300_000 + 2_000_000 + 17_000) / 1e3
    assert got["nv_inference_queue_duration_us"][labels] == 5.0
    assert got["nv_inference_compute_infer_duration_us"][labels] == 40.0
    assert "nv_inference_request_success_total" not in got  # exact Triton names, no _total
    lat = got["swapserve_request_latency_seconds_bucket"]
    assert lat[tuple(sorted(labels + (("le", "0.00025"),)))] == 0
    assert lat[tuple(sorted(labels + (("le", "0.0005"),)))] == 1
    assert lat[tuple(sorted(labels + (("le", "0.0025"),)))] == 2
    assert lat[tuple(sorted(labels + (("le", "+Inf"),)))] == 2
    assert len(lat) == len(LATENCY_BUCKETS) + 1
    assert abs(got["swapserve_request_latency_seconds_sum"][labels] - 0.0023) < 1e-12
    assert got["swapserve_batch_size_count"][labels] == 1 and got["swapserve_batch_size_sum"][labels] == 3
    assert got["swapserve_compute_latency_seconds_count"][labels] == 1
