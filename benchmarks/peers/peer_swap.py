"""Change the live version of a peer through its own reload API (used as ``swapserve bench --swap-command``).

    peer_swap.py --kind mlserver|kserve --http PORT --dir MODEL_DIR MODEL VERSION

MLServer: point model-settings.json at VERSION, then POST /v2/repository/models/MODEL/load
(MLServer re-reads the settings and reloads the model). KServe: write CURRENT, then the same
endpoint (our ModelRepository.load builds a new model object and replaces the old one).
Exits non-zero when the server refuses.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["mlserver", "kserve"], required=True)
    ap.add_argument("--http", type=int, required=True)
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("model")
    ap.add_argument("version")
    a = ap.parse_args()
    if a.kind == "mlserver":
        settings = a.dir / "model-settings.json"
        doc = json.loads(settings.read_text())
        doc["parameters"]["uri"] = str(a.dir / a.version / "model.pt")
        settings.write_text(json.dumps(doc))
    else:
        (a.dir / "CURRENT").write_text(a.version)
    req = urllib.request.Request(f"http://127.0.0.1:{a.http}/v2/repository/models/{a.model}/load", data=b"{}",
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        print(f"load refused: HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"load failed: {exc}", file=sys.stderr)
        return 1
    print(body[:200])
    return 0


if __name__ == "__main__":
    sys.exit(main())
