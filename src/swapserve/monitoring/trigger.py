"""Retraining trigger: run a command or call a webhook when a model needs retraining.

Reasons: ``drift`` (a drift alert episode of any version of the model), ``accuracy`` (live
accuracy from feedback under ``accuracy_floor`` over at least ``min_labelled`` predictions)
and ``schedule`` (every ``schedule``). Rate limits, so an alert can never cause a storm:

- one firing per episode: an episode is the span during which the condition is continuously
  on (per reason). An episode that starts inside ``min_interval`` of the last firing fires
  once the interval has passed, if it is still on; it never fires twice.
- ``min_interval`` between any two firings of the model, whatever the reason;
- never while the previous command of the model is still running (that attempt is recorded
  with status ``skipped``).

Actions never block the caller. A command is started with ``subprocess.Popen`` (argv, no
shell); ``{context}``, ``{model}``, ``{version}``, ``{next_version}`` and ``{repository}`` in
its arguments are replaced, and the environment carries ``SWAPSERVE_RETRAIN_CONTEXT`` (the path
of the JSON context file), ``SWAPSERVE_MODEL`` and ``SWAPSERVE_MODEL_REPOSITORY``; stdout and
stderr go to ``<context>.log``; its working directory is the server's. A webhook is a JSON
POST (``Content-Type: application/json``) from a daemon thread with the configured timeout.
The JSON context: ``model``, ``version``, ``reason``, ``episode``, ``fired_at``,
``repository``, ``model_dir``, ``next_version``, ``detail`` (why) and ``drift_report`` (the
``DriftReport.to_dict()`` of the alerting version, or null).

``evaluate`` returns the ``TriggerRecord`` of a firing (status ``started``/``skipped``/
``failed``) for the caller to write to the audit log; ``poll`` returns records of actions that
finished since (``succeeded``/``failed`` with the exit code or HTTP status).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from swapserve.monitoring.monitor_config import TriggerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TriggerRecord:
    """One retraining firing (or its outcome), JSON-able for the audit log."""

    model: str
    version: int
    reason: str  # drift | accuracy | schedule
    episode: int
    fired_at: float  # wall clock (time.time())
    action: str  # command | webhook | command+webhook
    status: str  # started | skipped | failed | succeeded
    context_path: str = ""
    detail: str = ""
    pid: int = 0
    exit_code: int | None = None
    http_status: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Episode:
    on: bool = False
    number: int = 0
    fired: bool = False


@dataclass
class _Running:
    record: TriggerRecord
    proc: subprocess.Popen[bytes] | None = None
    thread: threading.Thread | None = None
    result: dict[str, Any] = field(default_factory=dict)


def next_version(model_dir: Path) -> int:
    """One more than the largest numeric version directory (1 when there is none)."""
    nums = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    return max(nums, default=0) + 1


class RetrainingTrigger:
    """The trigger of one model. Call ``evaluate`` from one thread (the monitor's tick)."""

    def __init__(self, model: str, config: TriggerConfig, repository_root: Path | str, context_dir: Path | str,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.model = model
        self.config = config
        self.repository_root = Path(repository_root)
        self.context_dir = Path(context_dir)
        self.clock, self.wall_clock = clock, wall_clock
        self._episodes = {"drift": _Episode(), "accuracy": _Episode()}
        self._last_fired: float | None = None
        self._next_schedule: float | None = None
        self._running: list[_Running] = []
        self._seq = 0

    def evaluate(self, now: float, version: int, *, drift_alert: bool = False,
                 drift_report: dict[str, Any] | None = None, accuracy: float | None = None,
                 labelled: int = 0) -> TriggerRecord | None:
        """Update the episodes and fire at most once; returns the firing's record, or None.

        ``version`` is the version the context names (the alerting one, else the champion).
        """
        if not self.config.configured:
            return None
        floor = self.config.accuracy_floor
        conditions = {
            "drift": self.config.on_drift and drift_alert,
            "accuracy": floor is not None and accuracy is not None and labelled >= self.config.min_labelled
            and accuracy < floor,
        }
        for reason, on in conditions.items():
            ep = self._episodes[reason]
            if on and not ep.on:
                ep.on, ep.number, ep.fired = True, ep.number + 1, False
            elif not on:
                ep.on = False
        if self.config.schedule_s is not None and self._next_schedule is None:
            self._next_schedule = now + self.config.schedule_s
        if self._last_fired is not None and now - self._last_fired < self.config.min_interval_s:
            return None
        for reason in ("drift", "accuracy"):
            ep = self._episodes[reason]
            if ep.on and not ep.fired:
                ep.fired = True
                detail = (f"drift alert episode {ep.number}" if reason == "drift" else
                          f"live accuracy {accuracy:.4f} < floor {floor} over {labelled} labelled predictions")
                return self._fire(now, version, reason, ep.number, detail, drift_report, accuracy)
        if self._next_schedule is not None and now >= self._next_schedule:
            assert self.config.schedule_s is not None
            self._next_schedule = now + self.config.schedule_s
            return self._fire(now, version, "schedule", 0, f"every {self.config.schedule_s:g}s", drift_report, accuracy)
        return None

    # -- actions ------------------------------------------------------------------------------

    def _fire(self, now: float, version: int, reason: str, episode: int, detail: str,
              drift_report: dict[str, Any] | None, accuracy: float | None) -> TriggerRecord:
        self._last_fired = now
        action = "+".join(a for a, on in (("command", self.config.command), ("webhook", self.config.webhook)) if on)
        fired_at = self.wall_clock()
        busy = [r for r in self._running if r.proc is not None and r.proc.poll() is None]
        if busy and self.config.command:
            rec = TriggerRecord(self.model, version, reason, episode, fired_at, action, "skipped",
                                detail=f"{detail}; previous retraining (pid {busy[0].record.pid}) still running")
            log.warning("retraining trigger for %s skipped: %s", self.model, rec.detail)
            return rec
        model_dir = self.repository_root / self.model
        self._seq += 1
        self.context_dir.mkdir(parents=True, exist_ok=True)
        ctx_path = self.context_dir / f"{self.model}-{int(fired_at * 1000)}-{self._seq}-{reason}.json"
        nxt = next_version(model_dir)
        context = {"model": self.model, "version": version, "reason": reason, "episode": episode,
                   "fired_at": fired_at, "repository": str(self.repository_root), "model_dir": str(model_dir),
                   "next_version": nxt, "detail": detail, "accuracy": accuracy, "drift_report": drift_report}
        body = json.dumps(context, indent=2, sort_keys=True, default=str)
        ctx_path.write_text(body)
        rec = TriggerRecord(self.model, version, reason, episode, fired_at, action, "started",
                            context_path=str(ctx_path), detail=detail)
        running = _Running(rec)
        try:
            if self.config.command:
                subs = {"context": str(ctx_path), "model": self.model, "version": str(version),
                        "next_version": str(nxt), "repository": str(self.repository_root)}
                argv = list(self.config.command)
                for key, value in subs.items():  # plain replacement: other braces stay as they are
                    argv = [a.replace("{" + key + "}", value) for a in argv]
                env = {**os.environ, "SWAPSERVE_RETRAIN_CONTEXT": str(ctx_path), "SWAPSERVE_MODEL": self.model,
                       "SWAPSERVE_MODEL_REPOSITORY": str(self.repository_root)}
                with open(ctx_path.with_suffix(".log"), "wb") as logf:
                    running.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
                rec = replace(rec, pid=running.proc.pid)
            if self.config.webhook:
                running.thread = threading.Thread(target=self._post, args=(body.encode(), running.result),
                                                  name=f"retrain-webhook-{self.model}", daemon=True)
                running.thread.start()
        except (OSError, ValueError, KeyError, IndexError) as exc:
            rec = replace(rec, status="failed", detail=f"{detail}; could not start: {exc}")
            log.error("retraining trigger for %s failed to start: %s", self.model, exc)
            if running.proc is None and running.thread is None:
                return rec
        running.record = rec
        self._running.append(running)
        log.info("retraining trigger for %s fired (%s, %s): %s", self.model, reason, action, ctx_path)
        return rec

    def _post(self, body: bytes, result: dict[str, Any]) -> None:
        req = urllib.request.Request(self.config.webhook, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "swapserve"})
        try:
            with urllib.request.urlopen(req, timeout=self.config.webhook_timeout_s) as resp:  # noqa: S310 - configured URL
                result["http_status"] = int(resp.status)
        except urllib.error.HTTPError as exc:
            result["http_status"] = int(exc.code)
            result["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - any network failure is an outcome, not a crash
            result["error"] = str(exc)

    def poll(self) -> list[TriggerRecord]:
        """Records of actions that finished since the last poll (never blocks)."""
        done: list[TriggerRecord] = []
        still: list[_Running] = []
        for r in self._running:
            proc_done = r.proc is None or r.proc.poll() is not None
            hook_done = r.thread is None or not r.thread.is_alive()
            if not (proc_done and hook_done):
                still.append(r)
                continue
            code = r.proc.returncode if r.proc is not None else None
            http = r.result.get("http_status")
            ok = (code in (None, 0)) and (r.thread is None or (http is not None and 200 <= http < 300))
            why = r.result.get("error", "")
            if code not in (None, 0):
                why = f"command exited with {code}; see {Path(r.record.context_path).with_suffix('.log')}"
            done.append(replace(r.record, status="succeeded" if ok else "failed", exit_code=code, http_status=http,
                                detail=r.record.detail + (f"; {why}" if why else "")))
        self._running = still
        return done

    def join(self, timeout: float = 30.0) -> list[TriggerRecord]:
        """Wait (up to ``timeout``) for running actions; returns their final records. For tests and shutdown."""
        deadline = time.monotonic() + timeout
        for r in self._running:
            if r.proc is not None:
                try:
                    r.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if r.thread is not None:
                r.thread.join(max(0.0, deadline - time.monotonic()))
        return self.poll()
