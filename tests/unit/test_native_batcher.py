"""Native batcher: batch formation rules, deadlines, bounds, and concurrency.

Timing assertions are one-sided with generous slack: CI has 2 noisy cores.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from swapserve.errors import InvalidInput, ResourceExhausted, VersionNotReady
from swapserve.native import Batch, Batcher, split_rows

SECOND_US = 1_000_000


def row_bytes(ticket: int, rows: int) -> bytes:
    return bytes([ticket % 251]) * (4 * rows)


def drain(b: Batcher, timeout_us: int = 0) -> list[Batch]:
    out = []
    while (batch := b.next_batch(timeout_us)) is not None:
        out.append(batch)
    return out


def test_each_request_alone_without_batching() -> None:
    b = Batcher(0, [], 10 * SECOND_US, 0)
    for t in range(3):
        b.submit(t, 5, [b"x" * 5])
    batches = drain(b)
    assert [x.tickets for x in batches] == [[0], [1], [2]]
    assert [x.rows for x in batches] == [[5], [5], [5]]


def test_full_batch_dispatches_at_once_and_never_exceeds_max() -> None:
    b = Batcher(8, [], 10 * SECOND_US, 0)  # long delay: only "full" can dispatch
    for t, rows in enumerate([3, 3, 3, 1, 4, 2]):
        b.submit(t, rows, [row_bytes(t, rows)])
    first = b.next_batch(SECOND_US)
    assert first is not None and first.tickets == [0, 1] and sum(first.rows) == 6  # 3+3, next 3 would overshoot
    second = b.next_batch(SECOND_US)
    assert second is not None and second.tickets == [2, 3, 4] and sum(second.rows) == 8
    assert b.next_batch(10_000) is None  # 2 rows left, not full, delay far away
    b.close()
    last = b.next_batch(SECOND_US)
    assert last is not None and last.tickets == [5]  # closing drains
    assert b.next_batch(SECOND_US) is None


def test_preferred_sizes_are_honoured() -> None:
    b = Batcher(16, [4, 8], 10 * SECOND_US, 0)
    for t in range(10):
        b.submit(t, 1, [row_bytes(t, 1)])
    got = b.next_batch(SECOND_US)
    assert got is not None and len(got.tickets) == 8  # largest preferred reachable
    # 2 queued: 4 not reached, no dispatch until the delay.
    assert b.next_batch(10_000) is None
    b.submit(10, 2, [row_bytes(10, 2)])  # 1+1+2 = 4 preferred, but 8 still reachable -> wait
    assert b.next_batch(10_000) is None
    b.submit(11, 3, [row_bytes(11, 3)])  # 4 reached and the next request would overshoot it
    got = b.next_batch(SECOND_US)
    assert got is not None and got.tickets == [8, 9, 10] and sum(got.rows) == 4


def test_max_delay_dispatches_partial_batch() -> None:
    b = Batcher(64, [], 20_000, 0)  # 20 ms
    t0 = time.monotonic()
    b.submit(1, 1, [b"a" * 4])
    got = b.next_batch(5 * SECOND_US)
    waited = time.monotonic() - t0
    assert got is not None and got.tickets == [1]
    assert 0.015 <= waited < 2.0
    assert got.queue_ns[0] >= 15_000_000


def test_zero_delay_dispatches_whatever_is_queued() -> None:
    b = Batcher(64, [], 0, 0)
    for t in range(5):
        b.submit(t, 1, [b"a" * 4])
    got = b.next_batch(SECOND_US)
    assert got is not None and got.tickets == [0, 1, 2, 3, 4]


def test_inputs_are_gathered_in_ticket_order_and_owned() -> None:
    b = Batcher(8, [], 0, 0)
    a0 = np.arange(6, dtype=np.float32).reshape(2, 3)
    a1 = np.arange(3, dtype=np.float32).reshape(1, 3) + 100
    b.submit(10, 2, [a0, np.array([7, 8], dtype=np.int64)])
    b.submit(11, 1, [a1, np.array([9], dtype=np.int64)])
    del a0  # the queue holds its own copy
    got = b.next_batch(SECOND_US)
    assert got is not None and got.tickets == [10, 11] and got.rows == [2, 1]
    x = got.inputs[0].view(np.float32).reshape(3, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [100, 101, 102]]
    assert got.inputs[1].view(np.int64).tolist() == [7, 8, 9]
    parts = split_rows(x, got.rows)
    assert [p.shape for p in parts] == [(2, 3), (1, 3)] and np.shares_memory(parts[1], x)
    assert got.inputs[0].flags.owndata is False and got.inputs[0].base is not None  # capsule-owned


def test_expired_requests_are_reported_not_run() -> None:
    b = Batcher(8, [], 30_000, 0)
    now = time.monotonic_ns()
    b.submit(1, 1, [b"a"], deadline_ns=now + 1_000_000)  # 1 ms
    b.submit(2, 1, [b"b"], deadline_ns=now + 60 * 10**9)
    b.submit(3, 1, [b"c"])
    time.sleep(0.01)
    seen_run: list[int] = []
    seen_expired: list[int] = []
    while len(seen_run) + len(seen_expired) < 3:
        got = b.next_batch(SECOND_US)
        assert got is not None
        seen_run += got.tickets
        seen_expired += got.expired
    assert seen_expired == [1] and seen_run == [2, 3]


def test_queue_bound_raises_resource_exhausted() -> None:
    b = Batcher(4, [], 10 * SECOND_US, 2, name="model 'm' version 3")
    b.submit(1, 1, [b"a"])
    b.submit(2, 1, [b"a"])
    with pytest.raises(ResourceExhausted, match="model 'm' version 3"):
        b.submit(3, 1, [b"a"])
    assert b.pending() == 2 and b.stats()["rejected_full"] == 1


def test_queue_byte_bound_refuses_what_would_pass_it_naming_the_bound() -> None:
    """Before: only requests were counted, so 4096 queued requests could hold 4096 messages' bytes."""
    b = Batcher(8, [], 0, 0, 10, name="model 'm' version 3")
    b.submit(1, 1, [b"aaaa", b"bb"])  # 6 bytes
    b.submit(2, 1, [b"a", b"bbb"])  # 10: exactly the bound
    with pytest.raises(ResourceExhausted) as err:
        b.submit(3, 1, [b"a", b""])
    message = err.value.message
    assert "model 'm' version 3" in message and "holds 10 bytes" in message and "bound of 10 bytes" in message
    assert "--max-queue-bytes" in message and "swapserve.max_queue_bytes" in message
    assert b.pending() == 2 and b.stats()["rejected_bytes"] == 1 and b.stats()["rejected_full"] == 0
    got = b.next_batch(SECOND_US)  # a dispatched batch frees its bytes
    assert got is not None and got.tickets == [1, 2]
    b.submit(4, 1, [b"aaaaa", b"bbbbb"])
    with pytest.raises(ResourceExhausted):
        b.submit(5, 1, [b"a", b""])


def test_a_request_larger_than_the_byte_bound_is_never_queued() -> None:
    b = Batcher(0, [], 0, 0, 8, name="model 'm' version 1")
    with pytest.raises(ResourceExhausted, match="holds 0 bytes of requests; this 9-byte request"):
        b.submit(1, 1, [b"x" * 9])
    assert b.pending() == 0
    b.submit(2, 1, [b"x" * 8])
    assert b.pending() == 1


def test_expired_requests_free_their_bytes() -> None:
    b = Batcher(8, [], 10 * SECOND_US, 0, 4)
    b.submit(1, 1, [b"abcd"], deadline_ns=time.monotonic_ns() + 1_000_000)
    with pytest.raises(ResourceExhausted):
        b.submit(2, 1, [b"a"])
    time.sleep(0.01)
    got = b.next_batch(SECOND_US)
    assert got is not None and got.expired == [1]
    b.submit(3, 1, [b"wxyz"])  # room again
    with pytest.raises(InvalidInput, match="max_queue_bytes"):
        Batcher(8, [], 0, 0, -1)


def test_oversize_and_malformed_requests_are_invalid() -> None:
    b = Batcher(4, [], 0, 0, name="model 'm' version 1")
    with pytest.raises(InvalidInput, match="max_batch_size 4"):
        b.submit(1, 5, [b"a"])
    with pytest.raises(InvalidInput):
        b.submit(1, 0, [b"a"])
    with pytest.raises(InvalidInput, match="C-contiguous"):
        b.submit(1, 1, [np.arange(10)[::2]])
    b.submit(1, 1, [b"a", b"b"])
    with pytest.raises(InvalidInput, match="2"):
        b.submit(2, 1, [b"a"])
    with pytest.raises(InvalidInput):
        Batcher(4, [8], 0, 0)


def test_close_wakes_consumers_and_refuses_submits() -> None:
    b = Batcher(4, [], 0, 0)
    results: list[object] = []
    consumers = [threading.Thread(target=lambda: results.append(b.next_batch(-1))) for _ in range(2)]
    for c in consumers:
        c.start()
    time.sleep(0.05)
    b.close()
    for c in consumers:
        c.join(timeout=10)
        assert not c.is_alive()
    assert results == [None, None]
    with pytest.raises(VersionNotReady):
        b.submit(1, 1, [b"a"])


@pytest.mark.parametrize("max_rows,preferred,delay_us", [(8, [], 200), (16, [4, 8], 500), (0, [], 0)])
def test_many_producers_two_consumers_every_ticket_exactly_once(max_rows: int, preferred: list[int], delay_us: int) -> None:
    b = Batcher(max_rows, preferred, delay_us, 0)
    producers, per_producer = 6, 300
    received: dict[int, bytes] = {}
    lock = threading.Lock()
    max_seen = [0]

    def produce(p: int) -> None:
        for i in range(per_producer):
            t = p * per_producer + i
            rows = 1 + t % 3 if max_rows else 1
            b.submit(t, rows, [row_bytes(t, rows), t.to_bytes(8, "little")])

    def consume() -> None:
        while (got := b.next_batch(-1)) is not None:
            if max_rows:
                assert sum(got.rows) <= max_rows
            assert not got.expired
            data, ids = got.inputs
            parts = split_rows(data.reshape(-1, 4), got.rows)
            with lock:
                max_seen[0] = max(max_seen[0], sum(got.rows))
                for k, t in enumerate(got.tickets):
                    assert int.from_bytes(ids[8 * k : 8 * k + 8].tobytes(), "little") == t
                    assert t not in received
                    received[t] = parts[k].tobytes()

    consumers = [threading.Thread(target=consume) for _ in range(2)]
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in consumers + threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    for t in consumers:
        t.join(timeout=30)
        assert not t.is_alive()
    total = producers * per_producer
    assert sorted(received) == list(range(total))
    for t, data in received.items():
        assert data == row_bytes(t, 1 + t % 3 if max_rows else 1)
    stats = b.stats()
    assert stats["submitted"] == total and sum(k * v for k, v in stats["rows_histogram"].items()) == sum(
        (1 + t % 3 if max_rows else 1) for t in range(total)
    )
