"""The driver's Kafka I/O adapters: a watermark poller, a committer, and the one retry policy.

Both clients are long-lived (one per stream, not per batch).  Every driver-side
broker call goes through :func:`broker_call`, which retries a bounded number of
times with jittered backoff by way of :func:`sparkmpi._retry.retry`.
"""

from __future__ import annotations

import time
from typing import Callable

from .._retry import retry
from ._errors import BrokerUnavailable, StreamTimeout
from .kafka_client import ErrorTrap, client_config, kafka_error_text


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
    """Commits a consumer group's offsets with a deadline (one long-lived client per stream).

    Cheaper than :func:`~.offsets.commit_offsets` per batch (no new client, no
    metadata round trip).  It commits through the admin API
    (``AlterConsumerGroupOffsets``), not a consumer's commit: a consumer with a
    commit in flight when its broker goes can never be closed (librdkafka
    retries the coordinator forever, librdkafka issue #3740), while an admin
    request times out and its client goes at once.  A lost broker surfaces as
    :class:`StreamTimeout` (or :class:`BrokerUnavailable`) within ``timeout``.
    """

    def __init__(self, bootstrap: str, group: str, timeout: float):
        self.bootstrap, self.group, self.timeout = bootstrap, group, timeout
        self.admin = None
        self.trap = ErrorTrap()

    def _open(self):
        from confluent_kafka.admin import AdminClient

        if self.admin is None:
            self.admin = AdminClient(client_config(self.bootstrap, self.trap))
        return self.admin

    def commit(self, ranges) -> None:
        from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, TopicPartition

        offsets = [TopicPartition(r.topic, r.partition, r.end) for r in ranges]
        if not offsets:
            return
        request = [ConsumerGroupTopicPartitions(self.group, offsets)]
        try:
            future = self._open().alter_consumer_group_offsets(request, request_timeout=self.timeout)[self.group]
            try:
                result = future.result(timeout=self.timeout + 1.0)
            except Exception as exc:  # a KafkaException, or the future's TimeoutError (a backstop)
                error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
                if error is not None and error.code() != KafkaError._TIMED_OUT:
                    raise BrokerUnavailable(f"committing offsets of group {self.group!r} at {self.bootstrap} "
                                            f"failed: {kafka_error_text(exc)}") from None
                raise StreamTimeout(f"committing offsets of group {self.group!r} at {self.bootstrap}: no answer "
                                    f"within {self.timeout:.1f} s; last client error: {self.trap.last or 'none'}") \
                    from None
        except Exception:
            self.close()   # a fresh client next time
            raise
        bad = [f"{tp.topic}[{tp.partition}]: {tp.error}" for tp in result.topic_partitions or []
               if tp.error is not None]
        if bad:
            raise BrokerUnavailable(f"committing offsets of group {self.group!r} at {self.bootstrap} failed: {bad}")

    def close(self, wait: bool = True) -> None:
        """Release the client (at once, broker or not: an admin client has nothing to wait for;
        ``wait`` is accepted for the same call as the other clients' ``close``)."""
        self.admin = None


def close_client(client, wait: bool) -> None:
    """Close a Producer or a Consumer; ``wait=False`` (broker gone): what a producer has not
    delivered yet is dropped rather than waited for (``close()`` would flush it with no deadline).

    A consumer must have no commit in flight (librdkafka then retries a lost coordinator
    forever on close): :class:`Committer` commits through the admin API for that reason.
    """
    try:
        if not wait and hasattr(client, "purge"):
            client.purge()
        client.close()
    except Exception:  # noqa: BLE001  (closing a client whose broker is gone)
        pass
