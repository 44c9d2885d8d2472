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
shell) in a session and process group of its own; ``{context}``, ``{model}``, ``{version}``,
``{next_version}`` and ``{repository}`` in its arguments are replaced. Its environment is built,
never inherited (see ``job_environment``): the server's ``DEFAULT_PASS_ENV`` variables and those
``pass_env`` names, the literal ``env``, then ``SWAPSERVE_RETRAIN_CONTEXT`` (the path of the JSON
context file), ``SWAPSERVE_MODEL``, ``SWAPSERVE_MODEL_VERSION``, ``SWAPSERVE_NEXT_VERSION`` and
``SWAPSERVE_MODEL_REPOSITORY``. stdout and stderr go to ``<context>.log``; its working directory
is the server's. ``timeout`` after its start the whole process group gets SIGTERM and, whatever
is left of it ``kill_grace`` later, SIGKILL; the outcome is ``failed`` with ``timed_out``. A webhook is a JSON
POST (``Content-Type: application/json``) from a daemon thread with the configured timeout.
The JSON context: ``model``, ``version``, ``reason``, ``episode``, ``fired_at``,
``repository``, ``model_dir``, ``next_version``, ``detail`` (why) and ``drift_report`` (the
``DriftReport.to_dict()`` of the alerting version, or null).

``evaluate`` returns the ``TriggerRecord`` of a firing (status ``started``/``skipped``/
``failed``) for the caller to write to the audit log; ``poll`` returns records of actions that
finished since (``succeeded``/``failed`` with the exit code or HTTP status).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from swapserve.monitoring.monitor_config import DEFAULT_PASS_ENV, TriggerConfig

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
    timed_out: bool = False

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
    started: float = 0.0  # the trigger's clock at the start
    term_at: float | None = None  # when the group got SIGTERM (timeout)
    killed: bool = False  # the group got SIGKILL

    def command_done(self) -> bool:
        """The command exited and, after a timeout, nothing of its group is left to kill."""
        if self.proc is None:
            return True
        if self.proc.poll() is None:
            return False
        return self.term_at is None or self.killed or not _group_alive(self.proc.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its uid: still there
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def job_environment(config: TriggerConfig, context: dict[str, str],
                    server_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a retraining command, built from nothing.

    From ``server_env`` (default ``os.environ``) only names matching ``DEFAULT_PASS_ENV`` or
    ``config.pass_env`` (exact names or ``PREFIX*``); then ``config.env``; then ``context``
    (swapserve's own ``SWAPSERVE_*`` variables, which win). Secrets such as SWAPSERVE_TOKEN or a
    registry URL with a password are never passed unless ``pass_env`` names them.
    """
    source = dict(os.environ if server_env is None else server_env)
    patterns = (*DEFAULT_PASS_ENV, *config.pass_env)
    env = {k: v for k, v in source.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    env.update(config.env)
    env.update(context)
    return env


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
        busy = [r for r in self._running if not r.command_done()]
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
                env = job_environment(self.config, {
                    "SWAPSERVE_RETRAIN_CONTEXT": str(ctx_path), "SWAPSERVE_MODEL": self.model,
                    "SWAPSERVE_MODEL_VERSION": str(version), "SWAPSERVE_NEXT_VERSION": str(nxt),
                    "SWAPSERVE_MODEL_REPOSITORY": str(self.repository_root)})
                with open(ctx_path.with_suffix(".log"), "wb") as logf:
                    # A session of its own: its process group (pgid = pid) is what the timeout kills.
                    running.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
                running.started = self.clock()
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

    def _enforce_timeout(self, r: _Running) -> None:
        """SIGTERM the command's group at its timeout, SIGKILL whatever is left after the grace."""
        if r.proc is None or r.killed:
            return
        now = self.clock()
        if r.term_at is None:
            if now - r.started < self.config.timeout_s or r.proc.poll() is not None:
                return  # in time, or it exited on its own (only a webhook still runs): nothing to kill
            r.term_at = now
            log.warning("retraining command of %s (pid %d) ran past its timeout of %gs: SIGTERM to its process "
                        "group", self.model, r.proc.pid, self.config.timeout_s)
            _signal_group(r.proc.pid, signal.SIGTERM)
        if now - r.term_at >= self.config.kill_grace_s and (r.proc.poll() is None or _group_alive(r.proc.pid)):
            log.warning("retraining command of %s (pid %d): SIGKILL to its process group", self.model, r.proc.pid)
            _signal_group(r.proc.pid, signal.SIGKILL)
            r.killed = True
            try:  # the leader dies at once on SIGKILL; reap it so its exit code is known
                r.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass

    def poll(self) -> list[TriggerRecord]:
        """Records of actions that finished since the last poll (never blocks, but for reaping a
        command it has just SIGKILLed). Enforces the commands' timeouts."""
        done: list[TriggerRecord] = []
        still: list[_Running] = []
        for r in self._running:
            self._enforce_timeout(r)
            proc_done = r.command_done()
            hook_done = r.thread is None or not r.thread.is_alive()
            if not (proc_done and hook_done):
                still.append(r)
                continue
            code = r.proc.returncode if r.proc is not None else None
            http = r.result.get("http_status")
            ok = (code in (None, 0)) and (r.thread is None or (http is not None and 200 <= http < 300))
            why = r.result.get("error", "")
            timed_out = r.term_at is not None
            if timed_out:
                ok = False
                why = (f"timed out after {self.config.timeout_s:g}s: process group {r.record.pid} got SIGTERM"
                       + (f", then SIGKILL after {self.config.kill_grace_s:g}s" if r.killed else "")
                       + f"; see {Path(r.record.context_path).with_suffix('.log')}")
            elif code not in (None, 0):
                why = f"command exited with {code}; see {Path(r.record.context_path).with_suffix('.log')}"
            done.append(replace(r.record, status="succeeded" if ok else "failed", exit_code=code, http_status=http,
                                timed_out=timed_out, detail=r.record.detail + (f"; {why}" if why else "")))
        self._running = still
        return done

    def join(self, timeout: float = 30.0) -> list[TriggerRecord]:
        """Wait (up to ``timeout``) for running actions, enforcing their timeouts; returns their final
        records. For tests and shutdown."""
        deadline = time.monotonic() + timeout
        done = self.poll()
        while self._running and time.monotonic() < deadline:
            time.sleep(0.02)
            done += self.poll()
        return done
