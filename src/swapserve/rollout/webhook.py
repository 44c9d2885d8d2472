"""Rollout webhooks: signed, retried with backoff, and kept in the outbox across restarts.

A plan's ``webhook`` URL is POSTed a JSON body when a rollout is rolled back or promoted. Every
delivery is journaled in the outbox before it is attempted, so one that a crash interrupts is
delivered after the restart; a receiver may therefore see a delivery twice and should dedupe on
``X-Swapserve-Delivery``.

Signing (when the server has a webhook secret, ``SWAPSERVE_WEBHOOK_SECRET``)::

    X-Swapserve-Timestamp: <unix seconds of this attempt>
    X-Swapserve-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>
    X-Swapserve-Delivery:  <id, the same on every attempt>

A receiver recomputes the HMAC over the raw body, compares in constant time
(``hmac.compare_digest``) and rejects timestamps older than a few minutes (replays).

Retries: any non-2xx answer or connection error is retried after ``RETRY_MIN_S`` doubling to
``RETRY_MAX_S``, up to ``MAX_ATTEMPTS`` attempts per server run; a delivery is never retried
after ``MAX_AGE_S`` and is then dropped with an error in the log. Deliveries run on this
module's own thread, never the event loop or the model loaders' pool; a slow receiver never
delays a rollback.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from swapserve.registry.outbox import Outbox, OutboxEntry

log = logging.getLogger(__name__)

#: POST timeout per attempt (seconds).
TIMEOUT_S = 5.0
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
MAX_ATTEMPTS = 20
#: A delivery older than this (since it was journaled) is dropped.
MAX_AGE_S = 24 * 3600.0

SIGNATURE_HEADER = "X-Swapserve-Signature"
TIMESTAMP_HEADER = "X-Swapserve-Timestamp"
DELIVERY_HEADER = "X-Swapserve-Delivery"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` over ``"<timestamp>." + body``: the value of X-Swapserve-Signature."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, now: float | None = None,
           tolerance_s: float = 300.0) -> bool:
    """What a receiver does: True when the signature matches and the timestamp is recent."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


def payload(event: str, rollout: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of a delivery (``event``: ``rollback`` | ``promoted``)."""
    return {"event": event, "model": rollout["model"], "challenger": rollout["challenger"],
            "champion": rollout["champion"], "rollout": dict(rollout)}


def delivery(url: str, event: str, rollout: Mapping[str, Any]) -> dict[str, Any]:
    """An outbox payload for one delivery."""
    return {"url": url, "event": event, "body": json.dumps(payload(event, rollout), default=str, sort_keys=True)}


class WebhookSender:
    """Delivers the outbox's ``webhook`` entries. ``post(url, body, headers)`` raises on failure
    (default: urllib with TIMEOUT_S; unit tests pass a fake)."""

    def __init__(self, outbox: Outbox, secret: str | None = None, *, clock: Callable[[], float] = time.time,
                 post: Callable[[str, bytes, dict[str, str]], None] | None = None) -> None:
        self.outbox = outbox
        self.secret = secret
        self.clock = clock
        self._post = post or _urllib_post
        self._executor: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        #: For deliveries that ``require`` something (a recorded rollout state): returns deliver,
        #: wait or drop. Set by the rollout controller; without it they are delivered.
        self.gate: Callable[[OutboxEntry], Awaitable[str]] | None = None
        if secret is None:
            log.info("rollout webhooks are unsigned: set SWAPSERVE_WEBHOOK_SECRET to sign them")

    def enqueue(self, url: str, event: str, rollout: Mapping[str, Any], model: str | None = None,
                requires: Mapping[str, Any] | None = None) -> OutboxEntry:
        """Journal a delivery (durable when this returns) and wake the sender. ``requires``: held
        until ``gate`` says deliver (e.g. until the promotion it announces is recorded)."""
        payload = delivery(url, event, rollout)
        if requires:
            payload["requires"] = dict(requires)
        entry = self.outbox.append([("webhook", model or rollout.get("model"), payload)])[0]
        self.kick()
        return entry

    def kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def headers(self, entry: OutboxEntry, body: bytes) -> dict[str, str]:
        h = {"Content-Type": "application/json", DELIVERY_HEADER: entry.id,
             "X-Swapserve-Event": str(entry.payload.get("event", ""))}
        if self.secret:
            ts = str(int(self.clock()))
            h[TIMESTAMP_HEADER] = ts
            h[SIGNATURE_HEADER] = sign(self.secret, ts, body)
        return h

    def attempt(self, entry: OutboxEntry) -> bool:
        """One delivery attempt (blocking). True when delivered (or dropped for good)."""
        now = self.clock()
        if now - entry.created_at > MAX_AGE_S or entry.attempts >= MAX_ATTEMPTS:
            log.error("webhook %s (%s) dropped after %d attempts: %s", entry.payload.get("url"), entry.id,
                      entry.attempts, entry.last_error)
            return True
        body = str(entry.payload["body"]).encode()
        try:
            self._post(str(entry.payload["url"]), body, self.headers(entry, body))
        except Exception as exc:  # noqa: BLE001 - a broken receiver is retried, never fatal
            entry.attempts += 1
            entry.last_error = f"{type(exc).__name__}: {exc}"
            entry.next_at = now + min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (entry.attempts - 1))
            log.warning("webhook %s (%s) failed (attempt %d, next in %.0fs): %s", entry.payload.get("url"),
                        entry.id, entry.attempts, entry.next_at - now, entry.last_error)
            return False
        return True

    def due(self) -> list[OutboxEntry]:
        now = self.clock()
        return [e for e in self.outbox.pending("webhook") if e.next_at <= now]

    async def deliver_due(self) -> None:
        """Attempt every due delivery once (off the event loop); mark the delivered ones done."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="swapserve-webhook")
        loop = asyncio.get_running_loop()
        for e in self.due():
            if e.payload.get("requires") and self.gate is not None:
                verdict = await self.gate(e)
                if verdict == "drop":
                    self.outbox.done(e.id)
                    continue
                if verdict == "wait":
                    e.next_at = self.clock() + RETRY_MIN_S
                    continue
            if await loop.run_in_executor(self._executor, self.attempt, e):
                self.outbox.done(e.id)

    async def run(self) -> None:
        """Forever: deliver what is due, sleep until the next retry or a new delivery. Cancel to stop."""
        self._wake = asyncio.Event()
        while True:
            try:
                await self.deliver_due()
            except Exception:  # noqa: BLE001 - the sender must outlive any one failure
                log.exception("webhook delivery failed")
            pending = self.outbox.pending("webhook")
            wait = max(0.05, min(e.next_at for e in pending) - self.clock()) if pending else None
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def _urllib_post(url: str, body: bytes, headers: dict[str, str]) -> None:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:  # noqa: S310 - the plan's configured URL
        resp.read()


__all__ = ["DELIVERY_HEADER", "SIGNATURE_HEADER", "TIMESTAMP_HEADER", "WebhookSender", "delivery", "payload",
           "sign", "verify"]
