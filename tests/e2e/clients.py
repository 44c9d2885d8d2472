"""Client processes for the adversarial rollout tests: ``python -m tests.e2e.clients MODE ...``.

Each runs in its own process and talks to the server over gRPC only, like any client would;
it uses swapserve's protos (raw generic calls), so it never shares a process with tritonclient
and the test modules never import it.

- ``build REPO``: write the ``oracle`` model: v1 and v2 the same weights in different files
  (an A/A pair), v3 worse on slice ``c``, v4 the same as v1 again.
- ``honest URL``: the simulator's traffic (routed by a random routing key) and true labels,
  reported under ``--tokens`` in turn; prints its counts as JSON.
- ``adversary URL``: pins ``--pin`` and sends it malformed requests, reports false labels for
  them, labels its own routed requests against ``--against`` (or for ``--favour``), guesses
  ids; prints what the server answered, by status, as JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import secrets
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from swapserve._proto import feedback_pb2 as fpb
from swapserve._proto import grpc_service_pb2 as pb
from swapserve.bench.simulator import INFER, REPORT, SLICES, Simulator, build_oracle

MODEL = "oracle"
ERRORS = (0.05, 0.05, 0.05, 0.05, 0.05)
WORSE_ON_C = (0.05, 0.05, 0.9, 0.05, 0.05)


def build(repo: Path) -> None:
    import torch

    from swapserve.bench.simulator import ORACLE_CONFIG

    model = repo / MODEL
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(ORACLE_CONFIG.format(name=MODEL).replace(
        "version_policy", 'parameters { key: "swapserve.slices" value { string_value: "a,b,c,d,e" } }\nversion_policy'))
    for v, errors in ((1, ERRORS), (2, ERRORS), (3, WORSE_ON_C), (4, ERRORS)):
        build_oracle(model / str(v) / "model.pt", errors)
    # The A/A pair: the same weights, a different file (TorchScript's extra files differ).
    m = torch.jit.load(str(model / "2" / "model.pt"))
    torch.jit.save(m, str(model / "2" / "model.pt"), _extra_files={"build": "v2, same weights as v1"})


def honest(args: argparse.Namespace) -> None:
    sim = Simulator(args.url, MODEL, rate=args.rate, seed=args.seed, token=args.tokens or None).start()
    time.sleep(args.duration)
    stats = sim.stop()
    json.dump({"sent": stats.sent, "ok": stats.ok, "errors": dict(stats.errors), "by_version": dict(stats.by_version),
               "labels_sent": stats.labels_sent, "joined": stats.joined}, sys.stdout)


def _request(rng: random.Random, version: str, malformed: bool) -> tuple[pb.ModelInferRequest, int]:
    label, s = rng.randrange(10), rng.randrange(len(SLICES))
    req = pb.ModelInferRequest(model_name=MODEL, model_version=version)
    width = 2 if malformed else 3
    req.inputs.add(name="features", datatype="FP32", shape=[1, width])
    req.raw_input_contents.append(np.array([[label, s, rng.random()][:width]], np.float32).tobytes())
    req.parameters["slice"].string_param = SLICES[s]
    if not version:
        req.parameters["routing_key"].int64_param = rng.getrandbits(62)
    return req, label


def adversary(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    out: Counter[str] = Counter()
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    with grpc.insecure_channel(args.url) as ch:
        infer = ch.unary_unary(INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                               response_deserializer=pb.ModelInferResponse.FromString)
        report = ch.unary_unary(REPORT, request_serializer=fpb.ReportRequest.SerializeToString,
                                response_deserializer=fpb.ReportResponse.FromString)

        def send(outcomes: list[fpb.Outcome]) -> None:
            if not outcomes:
                return
            try:
                resp = report(fpb.ReportRequest(model=MODEL, outcomes=outcomes), timeout=30, metadata=metadata)
            except grpc.RpcError as exc:
                out["report:" + exc.code().name] += len(outcomes)
                return
            for r in resp.results:
                out["label:" + r.status] += 1

        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline:
            batch: list[fpb.Outcome] = []
            for _ in range(10):
                if args.pin:  # pinned to the challenger: a false label for every answer, plus malformed requests
                    req, label = _request(rng, args.pin, malformed=False)
                    resp = infer(req, timeout=30)
                    out["pinned:" + resp.model_version] += 1
                    wrong = (label + 1) % 10
                    batch.append(fpb.Outcome(id=resp.id, label=label if args.favour == args.pin else wrong))
                    try:
                        infer(_request(rng, args.pin, malformed=True)[0], timeout=30)
                    except grpc.RpcError as exc:
                        out["malformed:" + exc.code().name] += 1
                if args.against or args.favour:  # routed like anyone's: lie about whoever answered
                    req, label = _request(rng, "", malformed=False)
                    resp = infer(req, timeout=30)
                    out["routed:" + resp.model_version] += 1
                    target = args.against or args.favour
                    hit = resp.model_version == target
                    tell_truth = (not hit) if args.against else hit
                    batch.append(fpb.Outcome(id=resp.id, label=label if tell_truth else (label + 1) % 10))
                    try:
                        infer(_request(rng, "", malformed=True)[0], timeout=30)
                    except grpc.RpcError as exc:
                        out["malformed:" + exc.code().name] += 1
            if args.guess:  # ids of other clients' requests, guessed
                batch += [fpb.Outcome(id=secrets.token_hex(16), label=rng.randrange(10)) for _ in range(args.guess)]
            send(batch)
            time.sleep(args.pause)
    json.dump(dict(out), sys.stdout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.e2e.clients")
    sub = p.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("build")
    b.add_argument("repo", type=Path)
    h = sub.add_parser("honest")
    h.add_argument("url")
    h.add_argument("--tokens", nargs="*", default=[])
    h.add_argument("--rate", type=float, default=150.0)
    h.add_argument("--duration", type=float, default=10.0)
    h.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("adversary")
    a.add_argument("url")
    a.add_argument("--token", default="")
    a.add_argument("--pin", default="")
    a.add_argument("--against", default="")
    a.add_argument("--favour", default="")
    a.add_argument("--guess", type=int, default=0)
    a.add_argument("--duration", type=float, default=10.0)
    a.add_argument("--pause", type=float, default=0.02)
    a.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.mode == "build":
        build(args.repo)
    elif args.mode == "honest":
        honest(args)
    else:
        adversary(args)


if __name__ == "__main__":
    main()
