"""Monitoring benchmarks: hot-path cost of data quality + drift sketches, memory, false alarms.

    python benchmarks/bench_monitoring.py [--repeat 5] [--seeds 200] [--json out.json]

On ``digits``-shaped requests (one row of 64 FP32 pixels, probabilities [1, 10]):

- ``on_request`` (data-quality checks) and ``on_response`` (sketch append) in microseconds:
  the median over ``--repeat`` runs of the per-run mean over 20 000 calls.
- The ratio against an *estimated* server p50 for digits: the measured median of a TorchScript
  digits forward (1 x 64, ``torch.inference_mode``) plus a **nominal 300 us** for gRPC decode,
  encode and transport. Both are measured interleaved in the same process, so machine load
  scales them alike. Target (issue #7): <= 5 %. The server's real p50 comes from the lead's
  end-to-end benchmark.
- Memory per version: ``MonitoringObserver.memory_bytes`` with defaults (windows 5m and 1h,
  10 slots, 10 quantile bins, profile from a reference file) and the stated bound.
- False-alarm and detection rate over ``--seeds`` seeds: reference = 1000 training rows of
  sklearn's digits; live = 300 rows drawn from the holdout split (unshifted) or the same rows
  shifted one pixel to the right (a moved camera), within one 10 s window at 30 rows/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from swapserve.monitoring.drift_observer import MonitoringObserver
from swapserve.types import InferRequest, ModelSpec, TensorSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ModelSpec("digits", "pytorch_libtorch", 64, (TensorSpec("pixels", "FP32", (64,)),),
                 (TensorSpec("probabilities", "FP32", (10,)),))
NOMINAL_GRPC_US = 300.0
CALLS = 20_000


def shift_right(x: np.ndarray) -> np.ndarray:
    img = x.reshape(-1, 8, 8)
    out = np.zeros_like(img)
    out[:, :, 1:] = img[:, :, :-1]
    return out.reshape(-1, 64)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_repo(root: Path, x_ref: np.ndarray, probs: np.ndarray | None, yaml_text: str = "") -> Path:
    vdir = root / "digits" / "1"
    vdir.mkdir(parents=True, exist_ok=True)
    arrays = {"pixels": x_ref, **({"probabilities": probs} if probs is not None else {})}
    np.savez(vdir / "reference.npz", **arrays)  # type: ignore[arg-type]
    (root / "digits" / "monitoring.yaml").write_text(yaml_text)
    return root


def bench_hot_path(root: Path, x_live: np.ndarray, probs_fn: Any, forward: Any, repeat: int) -> dict[str, Any]:
    obs = MonitoringObserver(root, None, context_dir=root / "ctx")
    req = InferRequest("digits", id="bench")
    rows = [x_live[i: i + 1].copy() for i in range(256)]
    outs = [{"probabilities": probs_fn(r)} for r in rows]
    for i in range(2000):  # warm: profile loaded, slots allocated
        obs.on_request(req, SPEC, 1, [rows[i % 256]])
        obs.on_response(req, SPEC, 1, [rows[i % 256]], outs[i % 256], 0.0)
    req_us, resp_us, fwd_us = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(CALLS):
            obs.on_request(req, SPEC, 1, [rows[i & 255]])
        t1 = time.perf_counter()
        for i in range(CALLS):
            obs.on_response(req, SPEC, 1, [rows[i & 255]], outs[i & 255], 0.0)
        t2 = time.perf_counter()
        req_us.append((t1 - t0) / CALLS * 1e6)
        resp_us.append((t2 - t1) / CALLS * 1e6)
        samples = []
        for i in range(2000):
            s = time.perf_counter_ns()
            forward(rows[i & 255])
            samples.append(time.perf_counter_ns() - s)
        fwd_us.append(statistics.median(samples) / 1e3)
    total = statistics.median(req_us) + statistics.median(resp_us)
    p50 = statistics.median(fwd_us) + NOMINAL_GRPC_US
    return {"on_request_us": statistics.median(req_us), "on_response_us": statistics.median(resp_us),
            "total_us": total, "forward_p50_us": statistics.median(fwd_us),
            "estimated_server_p50_us": p50, "ratio": total / p50, "target_ratio": 0.05,
            "memory_bytes": obs.memory_bytes("digits", 1)}


def bench_batch(root: Path, x_live: np.ndarray, probs_fn: Any, batch: int) -> float:
    obs = MonitoringObserver(root, None, context_dir=root / "ctx")
    req = InferRequest("digits", id="bench")
    x = x_live[:batch].copy()
    out = {"probabilities": probs_fn(x)}
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        obs.on_request(req, SPEC, 1, [x])
        obs.on_response(req, SPEC, 1, [x], out, 0.0)
    return (time.perf_counter() - t0) / n * 1e6


def memory_bound(width: int = 65, bins: int = 10, windows: int = 2, slots: int = 10) -> int:
    """The stated bound for F monitored features (inputs + outputs), B bins, W windows, S slots.

    rings W x S x F x (B + 4) x 8 (counts: <= B + 2 edges -> B + 3 bins + missing) + W x S x F x 16
    (min/max) + pending buffer 256 x F x 8 + profile F x (2B + 8) x 8 + quality counters F x 48.
    """
    cols = bins + 4
    per_ring = slots * width * cols * 8 + 2 * slots * width * 8 + 2 * slots * 8
    pending = 256 * (width * 8 + 9)
    profile = width * (bins + 2) * 8 + width * cols * 8 + 4 * width * 8
    quality = 4 * width * 8 + 2 * width * 8
    return windows * per_ring + pending + profile + quality


def false_alarms(root: Path, holdout: np.ndarray, seeds: int) -> dict[str, Any]:
    fa = det = 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(holdout), size=300)
        for shifted in (False, True):
            clock = Clock()
            obs = MonitoringObserver(root, None, clock, context_dir=root / "ctx")
            x = holdout[idx]
            x = shift_right(x) if shifted else x
            for i in range(300):
                row = x[i: i + 1]
                obs.on_request(InferRequest("digits"), SPEC, 1, [row])
                obs.on_response(InferRequest("digits"), SPEC, 1, [row], {}, 0.0)
                clock.t += 1 / 30
            alert = obs.report("digits").windows[0].state == "alert"
            if shifted:
                det += alert
            else:
                fa += alert
    return {"seeds": seeds, "false_alarms": fa, "false_alarm_rate": fa / seeds, "detected": det,
            "detection_rate": det / seeds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from swapserve import examples as mk

    data = mk.digits_data()
    model_path = ROOT / "model_repository" / "digits" / "2" / "model.pt"
    if model_path.exists():
        net = torch.jit.load(str(model_path), map_location="cpu")
        source = str(model_path.relative_to(ROOT))
    else:
        net = mk.trace(mk.train_digits(mk.DIGITS_VERSIONS[2], data), (torch.from_numpy(data["x"][:2]),))
        source = "trained in-process (DIGITS_VERSIONS[2])"
    net.eval()

    def forward(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = net(torch.from_numpy(x)).numpy()
        return out

    rng = np.random.default_rng(0)
    ref_idx = rng.choice(len(data["x_train"]), size=1000, replace=False)
    x_ref = data["x_train"][ref_idx]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_repo(Path(tmp) / "a", x_ref, forward(x_ref))
        hot = bench_hot_path(root, data["x"], forward, forward, args.repeat)
        batch = {str(b): bench_batch(root, data["x"], forward, b) for b in (1, 16, 64)}
        root_rej = make_repo(Path(tmp) / "r", x_ref, forward(x_ref),
                             "data_quality: {policy: reject, ranges: {pixels: [0, 1]}}\n")
        hot_reject = bench_hot_path(root_rej, data["x"], forward, forward, args.repeat)
        root_fa = make_repo(Path(tmp) / "b", x_ref, None, "windows: [10s]\n")
        fa = false_alarms(root_fa, data["x"], args.seeds)
    result = {"hot_path": hot, "hot_path_reject_policy": hot_reject, "per_request_us_by_batch": batch, "memory_bound_bytes": memory_bound(),
              "false_alarms": fa, "model": source, "nominal_grpc_us": NOMINAL_GRPC_US,
              "python": sys.version.split()[0], "numpy": np.__version__}
    print("## Monitoring hot path (digits, 1 x 64 FP32)\n")
    print("| measure | value |\n|---|---|")
    print(f"| on_request (policy count: nothing to do) | {hot['on_request_us']:.1f} µs |")
    print(f"| on_response (buffer; amortised binning + counting) | {hot['on_response_us']:.1f} µs |")
    print(f"| total per request | {hot['total_us']:.1f} µs |")
    print(f"| TorchScript digits forward, median | {hot['forward_p50_us']:.1f} µs |")
    print(f"| estimated server p50 = forward + nominal {NOMINAL_GRPC_US:.0f} µs gRPC | "
          f"{hot['estimated_server_p50_us']:.1f} µs |")
    print(f"| ratio (target <= 5%) | {hot['ratio'] * 100:.2f}% |")
    print(f"| policy reject: on_request (synchronous checks) | {hot_reject['on_request_us']:.1f} µs |")
    print(f"| policy reject: total per request | {hot_reject['total_us']:.1f} µs "
          f"({hot_reject['ratio'] * 100:.2f}% of {hot_reject['estimated_server_p50_us']:.0f} µs) |")
    for b, us in batch.items():
        print(f"| per request, batch {b} | {us:.1f} µs |")
    print(f"| memory per version (measured) | {hot['memory_bytes'] / 1024:.1f} KiB |")
    print(f"| memory per version (bound, 65 features) | {memory_bound() / 1024:.1f} KiB |")
    print(f"\n## False alarms (one 10 s window, 300 rows, {fa['seeds']} seeds)\n")
    print("| stream | alerts | rate |\n|---|---|---|")
    print(f"| holdout digits (unshifted) | {fa['false_alarms']} | {fa['false_alarm_rate'] * 100:.1f}% |")
    print(f"| holdout shifted 1 px right | {fa['detected']} | {fa['detection_rate'] * 100:.1f}% |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
