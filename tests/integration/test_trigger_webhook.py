"""The retraining trigger POSTs its JSON context to a webhook (a local http.server on port 0)."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from swapserve.monitoring.monitor_config import TriggerConfig
from swapserve.monitoring.trigger import RetrainingTrigger


@pytest.fixture()
def hook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "type": self.headers["Content-Type"], "json": json.loads(body)})
            self.send_response(204 if self.path == "/ok" else 500)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


def test_webhook_receives_context_once_per_episode(tmp_path: Path, hook: tuple[str, list[dict[str, Any]]]) -> None:
    url, received = hook
    (tmp_path / "digits" / "2").mkdir(parents=True)
    trig = RetrainingTrigger("digits", TriggerConfig(webhook=f"{url}/ok", min_interval_s=0.0, webhook_timeout_s=5.0),
                             tmp_path, tmp_path / "ctx", clock=lambda: 0.0)
    records = [trig.evaluate(float(t), 2, drift_alert=True, drift_report={"state": "alert"}) for t in range(50)]
    fired = [r for r in records if r]
    assert len(fired) == 1 and fired[0].action == "webhook"
    done = trig.join(30)
    assert [(r.status, r.http_status) for r in done] == [("succeeded", 204)]
    assert len(received) == 1 and received[0]["type"] == "application/json"
    ctx = received[0]["json"]
    assert (ctx["model"], ctx["version"], ctx["reason"], ctx["next_version"]) == ("digits", 2, "drift", 3)
    assert ctx["drift_report"] == {"state": "alert"}


def test_webhook_failure_is_recorded(tmp_path: Path, hook: tuple[str, list[dict[str, Any]]]) -> None:
    url, _ = hook
    trig = RetrainingTrigger("digits", TriggerConfig(webhook=f"{url}/broken"), tmp_path, tmp_path / "ctx",
                             clock=lambda: 0.0)
    assert trig.evaluate(0.0, 1, drift_alert=True) is not None
    done = trig.join(30)
    assert [(r.status, r.http_status) for r in done] == [("failed", 500)]
