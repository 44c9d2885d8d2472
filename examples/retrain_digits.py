#!/usr/bin/env python
"""Example retraining job for ``digits``, started by swapserve's retraining trigger.

    # digits/monitoring.yaml
    trigger:
      command: [python, examples/retrain_digits.py, --context, "{context}"]

    # or by hand
    python examples/retrain_digits.py --repository model_repository [--version 3]

Reads the JSON context the trigger wrote (model, version, reason, next_version, repository,
drift_report; the path also arrives as $SWAPSERVE_RETRAIN_CONTEXT), retrains the digits MLP
(the recipe of version 2 from swapserve.examples) on the training split *plus* a
shifted copy of it (images moved one pixel right: the "camera moved" drift the demo
injects), and writes ``<repository>/digits/<next>/`` with ``model.pt`` and a
``reference.npz`` (1000 rows of its training inputs as ``pixels`` [n, 64] with the model's
``probabilities`` [n, 10]: the drift monitor's reference profile for the new version).

The directory is built under a hidden name and renamed into place, so the repository watcher
never sees a half-written version. The new version is only *registered*: a rollout plan
takes it through shadow, canary and the accuracy gates like any other version.
Prints one JSON line with the new version and its holdout accuracy (plain and shifted).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def shift_right(x: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Move 8x8 images ``pixels`` to the right (zeros enter on the left)."""
    img = x.reshape(-1, 8, 8)
    out = np.zeros_like(img)
    out[:, :, pixels:] = img[:, :, :-pixels]
    return out.reshape(-1, 64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=Path, default=os.environ.get("SWAPSERVE_RETRAIN_CONTEXT"),
                    help="JSON context from the trigger (default: $SWAPSERVE_RETRAIN_CONTEXT)")
    ap.add_argument("--repository", type=Path, help="model repository (default: from the context)")
    ap.add_argument("--version", type=int, help="version to write (default: next_version from the context, "
                                                "else one more than the largest existing)")
    ap.add_argument("--shift", type=int, default=1, help="pixels to shift the augmented copy right (default 1)")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)

    ctx: dict[str, Any] = json.loads(Path(args.context).read_text()) if args.context else {}
    repo = Path(args.repository or ctx.get("repository") or "model_repository")
    model_dir = repo / ctx.get("model", "digits")
    existing = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    version = args.version or int(ctx.get("next_version") or max(existing, default=0) + 1)
    if version in existing:
        print(f"error: {model_dir / str(version)} already exists; pass --version", file=sys.stderr)
        return 2

    import torch

    from swapserve import examples as mk

    data = mk.digits_data()
    aug = dict(data)
    aug["x_train"] = np.ascontiguousarray(np.concatenate([data["x_train"], shift_right(data["x_train"], args.shift)]))
    aug["y_train"] = np.ascontiguousarray(np.concatenate([data["y_train"], data["y_train"]]))
    base = mk.DIGITS_VERSIONS[2]
    net = mk.train_digits(mk.DigitsRecipe(hidden=base.hidden, epochs=base.epochs, lr=base.lr, seed=args.seed), aug)
    with mk.deterministic(0):
        traced = mk.trace(net, (torch.from_numpy(data["x"][:2]),))

    tmp = model_dir / f".retrain-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    mk.save(traced, tmp / "model.pt")
    rng = np.random.default_rng(args.seed)
    ref = aug["x_train"][rng.choice(len(aug["x_train"]), size=min(1000, len(aug["x_train"])), replace=False)]
    with torch.inference_mode():
        probs = traced(torch.from_numpy(np.ascontiguousarray(ref))).numpy()
    np.savez(tmp / "reference.npz", pixels=ref, probabilities=probs)
    (tmp / "training.json").write_text(json.dumps({
        "recipe": {"hidden": base.hidden, "epochs": base.epochs, "lr": base.lr, "seed": args.seed},
        "augmentation": f"training split + copy shifted {args.shift} px right",
        "trigger": {k: ctx.get(k) for k in ("model", "version", "reason", "episode", "fired_at")},
    }, indent=2))
    os.rename(tmp, model_dir / str(version))  # atomic: the watcher sees a complete directory or none

    result = {"model": model_dir.name, "version": version, "path": str(model_dir / str(version)),
              "holdout_accuracy": mk.accuracy(traced, data["x"], data["y"]),
              "shifted_holdout_accuracy": mk.accuracy(traced, shift_right(data["x"], args.shift), data["y"])}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
