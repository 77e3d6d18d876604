"""The driver's Kafka I/O adapters: a watermark poller, a committer, and the one retry policy.

Both clients are long-lived (one per stream, not per batch).  Every driver-side
broker call goes through :func:`broker_call`, which retries a bounded number of
times with jittered backoff by way of :func:`sparkmpi._retry.retry`.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from .._retry import retry
from ._errors import BrokerUnavailable, StreamTimeout
from .kafka_client import ErrorTrap, client_config


def broker_call(what: str, call: Callable[[], object], *, bootstrap: str, retries: int, backoff: float,
                max_backoff: float, on_retry: Callable[[int, str, float], None] | None = None,
                committed: Callable[[], str] = lambda: "nothing"):
    """``call()``, retried ``retries`` times on a broker failure; then :class:`BrokerUnavailable`.

    ``on_retry(attempt, cause, delay)`` is told of each retry (a progress line).
    The error names what was tried, the broker, the attempts and the offsets
    committed so far, so an operator knows where a restart resumes.
    """
    from confluent_kafka import KafkaException

    attempts = [0]
    t0 = time.monotonic()

    def attempt(_left):
        attempts[0] += 1
        return call()

    def give_up_or_note(exc) -> bool:
        # retry() asks this at each failure, before sleeping: the count, not the clock, bounds the attempts
        cause = _first_line(exc)
        if attempts[0] > retries:
            raise BrokerUnavailable(
                f"{what}: the Kafka broker at {bootstrap} did not answer after {attempts[0]} attempt(s) "
                f"over {time.monotonic() - t0:.1f} s ({retries} retries with backoff); "
                f"offsets are committed up to {committed()}: {cause}") from exc
        if on_retry is not None:
            on_retry(attempts[0], cause, min(backoff * 2 ** (attempts[0] - 1), max_backoff))
        return True

    # The deadline only backs up the count: every attempt has its own client timeout.
    budget = (retries + 1) * (max_backoff + 60.0)
    return retry(attempt, what=what, address=bootstrap, timeout=budget,
                 retry_on=(BrokerUnavailable, StreamTimeout, KafkaException), transient=give_up_or_note,
                 first_delay=backoff, max_delay=max(max_backoff, backoff), error=BrokerUnavailable)


def _first_line(exc) -> str:
    return str(exc).splitlines()[0] if exc is not None and str(exc) else type(exc).__name__


class WatermarkPoller:
    """One long-lived consumer asking for high watermarks (cheap enough to poll often)."""

    def __init__(self, bootstrap: str, topic: str, partitions: list[int], timeout: float):
        from confluent_kafka import Consumer

        self.bootstrap, self.topic, self.partitions, self.timeout = bootstrap, topic, partitions, timeout
        self.trap = ErrorTrap()
        self.consumer = Consumer(client_config(bootstrap, self.trap, **{
            "group.id": "sparkmpi-driver-watermarks", "enable.auto.commit": False}))

    def poll(self) -> dict:
        from confluent_kafka import TopicPartition

        out = {}
        for p in self.partitions:
            try:
                out[(self.topic, p)] = tuple(self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=self.timeout, cached=False))
            except Exception as exc:
                raise BrokerUnavailable(f"no watermarks for {self.topic}[{p}] from {self.bootstrap} within "
                                        f"{self.timeout:.1f} s: {self.trap.last or exc}") from None
        return out

    def close(self, wait: bool = True) -> None:
        close_client(self.consumer, wait)


class Committer:
    """One long-lived group member-less consumer that commits offsets with a deadline.

    Cheaper than :func:`~.offsets.commit_offsets` per batch (no new client, no
    metadata round trip); the commit is asynchronous and awaited with a
    deadline, so a lost broker surfaces as :class:`BrokerUnavailable` in time.
    """

    def __init__(self, bootstrap: str, group: str, timeout: float):
        self.bootstrap, self.group, self.timeout = bootstrap, group, timeout
        self.consumer = None
        self.trap = ErrorTrap()
        self._results: list = []

    def _open(self):
        from confluent_kafka import Consumer

        if self.consumer is None:
            self.consumer = Consumer(client_config(self.bootstrap, self.trap, **{
                "group.id": self.group, "enable.auto.commit": False,
                "on_commit": lambda err, parts: self._results.append((err, parts))}))
        return self.consumer

    def commit(self, ranges) -> None:
        from confluent_kafka import TopicPartition

        offsets = [TopicPartition(r.topic, r.partition, r.end) for r in ranges]
        if not offsets:
            return
        consumer = self._open()
        self._results.clear()
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
            started = time.monotonic()
            deadline = started + self.timeout
            while not self._results:
                if time.monotonic() > deadline:
                    raise StreamTimeout(f"committing offsets of group {self.group!r} at {self.bootstrap}: no answer "
                                        f"within {self.timeout:.1f} s; last client error: {self.trap.last or 'none'}")
                # poll() returns at a message or its timeout, not when it has
                # served the commit callback: short polls while an answer is
                # likely soon, so a 3 ms commit does not cost a 20 ms poll
                # (BENCHMARKS.md, "Streaming on a world").
                consumer.poll(0.001 if time.monotonic() - started < 0.2 else 0.02)
        except Exception:
            self.close(wait=False)   # a fresh client next time
            raise
        err, parts = self._results[0]
        bad = [f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in parts or [] if tp.error is not None]
        if err is not None or bad:
            self.close(wait=False)
            raise BrokerUnavailable(f"committing offsets of group {self.group!r} at {self.bootstrap} failed: "
                                    f"{err or bad}")

    def close(self, wait: bool = True) -> None:
        """Close the client; ``wait=False`` (broker gone) closes it in a daemon
        thread, as librdkafka may block for long on a pending request."""
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            close_client(consumer, wait)


def close_client(client, wait: bool) -> None:
    def close():
        try:
            client.close()
        except Exception:  # noqa: BLE001  (closing a client whose broker is gone)
            pass

    if wait:
        close()
    else:
        threading.Thread(target=close, name="sparkmpi-kafka-close", daemon=True).start()

