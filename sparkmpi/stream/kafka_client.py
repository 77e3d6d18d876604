"""Thin helpers around confluent-kafka clients: configuration, reachability, topics.

confluent-kafka (librdkafka) retries a dead broker forever and logs to stderr;
every helper here bounds its wait and routes librdkafka's log lines to the
``sparkmpi.stream.kafka_client`` logger, remembering the last error so a
timeout can say *why* nothing answered.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import traceback
from typing import Any

from .._retry import retry
from ._errors import BrokerUnavailable, StreamTimeout
from ..errors import InvalidArgument

LOG = logging.getLogger("sparkmpi.stream.kafka_client")
_BOOTSTRAP = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")


def check_bootstrap(bootstrap: Any) -> str:
    """Validate ``host:port[,host:port...]``; return it unchanged."""
    if not isinstance(bootstrap, str) or not bootstrap:
        raise InvalidArgument(f"bootstrap: expected 'host:port', got {bootstrap!r}")
    for part in bootstrap.split(","):
        if not _BOOTSTRAP.match(part) or not 0 < int(part.rsplit(":", 1)[1]) <= 65535:
            raise InvalidArgument(f"bootstrap: expected 'host:port' with port 1..65535, got {part!r}")
    return bootstrap


class ErrorTrap:
    """An ``error_cb`` that remembers librdkafka's last error."""

    def __init__(self) -> None:
        self.last: str = ""

    def __call__(self, err) -> None:
        self.last = str(err.str() if hasattr(err, "str") else err)
        LOG.debug("librdkafka error: %s", self.last)


def client_config(bootstrap: str, trap: ErrorTrap | None = None, **extra: Any) -> dict:
    """Common client settings: quiet logging, fast reconnect, bounded socket timeouts."""
    conf = {
        "bootstrap.servers": check_bootstrap(bootstrap),
        "logger": LOG,
        "socket.timeout.ms": 10000,
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 1000,
        "broker.address.family": "v4",
    }
    if trap is not None:
        conf["error_cb"] = trap
    conf.update(extra)
    return conf


def check_broker(bootstrap: str, timeout: float = 5.0) -> int:
    """Wait until a broker answers a metadata request; return the broker count.

    Raises
    ------
    BrokerUnavailable
        Naming the address, the seconds waited and librdkafka's last error.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    if not timeout > 0:
        raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
    trap = ErrorTrap()
    # A list the finally below empties: an AdminClient has no close(); it goes (threads, broker
    # connections) with its last reference, and the error's traceback, which the caller may
    # keep, holds this frame.
    admin = [AdminClient(client_config(bootstrap, trap))]

    def ask(left: float) -> int:
        meta = admin[0].list_topics(timeout=min(1.0, left))
        if not meta.brokers:
            raise BrokerUnavailable("no broker in the metadata")
        return len(meta.brokers)

    try:
        return retry(ask, what="reach the Kafka broker at", address=bootstrap, timeout=timeout,
                     retry_on=(KafkaException, BrokerUnavailable), first_delay=0.05, max_delay=0.5,
                     error=BrokerUnavailable,
                     describe=lambda exc: broker_cause(bootstrap, trap.last or kafka_error_text(exc)))
    except BrokerUnavailable as exc:
        _forget_frames(exc.__cause__)
        raise
    finally:
        admin.clear()


def _forget_frames(exc: BaseException | None) -> None:
    """Clear the locals of the finished frames in ``exc``'s traceback and those it chains to.

    confluent-kafka's ``AdminClient.list_topics`` is Python code: a failure's traceback holds
    its frame, and through ``self`` the client, for as long as anyone keeps the error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def kafka_error_text(exc: BaseException) -> str:
    """librdkafka's own text for a KafkaException (its KafkaError's ``str()``), else ``str(exc)``."""
    return exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)


def broker_unavailable(bootstrap: str, waited: float, cause: str) -> BrokerUnavailable:
    """The error for a broker that did not answer: address, seconds waited, and why
    (worded as :func:`sparkmpi._retry.retry` words its timeouts)."""
    return BrokerUnavailable(f"timed out trying to reach the Kafka broker at {bootstrap} after {waited:.1f} s: "
                             f"{broker_cause(bootstrap, cause)}")


def broker_cause(bootstrap: str, cause: str) -> str:
    """Why a broker does not answer, with the hint to check it.

    A plain TCP probe comes first since it names the usual cause
    (connection refused) more plainly than librdkafka does.
    """
    return f"{_tcp_probe(bootstrap) or cause} (is the broker running? `sparkmpi kafka status`)"


def _tcp_probe(bootstrap: str, timeout: float = 1.0) -> str:
    """Why a plain TCP connection to the first bootstrap address fails ('' if it connects)."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return ""
    except OSError as exc:
        return f"TCP connect to {host}:{port} failed: {exc.strerror or exc}"


def topic_partitions(bootstrap: str, topic: str, timeout: float = 10.0) -> list[int]:
    """Partition ids of ``topic`` (sorted); ``[]`` when the topic does not exist."""
    from confluent_kafka.admin import AdminClient

    trap = ErrorTrap()
    admin = AdminClient(client_config(bootstrap, trap))
    try:
        meta = admin.list_topics(topic=topic, timeout=timeout)
    except Exception as exc:
        _forget_frames(exc)
        raise BrokerUnavailable(f"no metadata for topic {topic!r} from {bootstrap} within {timeout:.1f} s: "
                                f"{trap.last or exc}") from None
    finally:
        del admin   # no close(): see check_broker
    info = meta.topics.get(topic)
    if info is None or info.error is not None:
        return []
    return sorted(info.partitions)


def ensure_topic(bootstrap: str, topic: str, partitions: int = 1, *, replication: int = 1,
                 timeout: float = 10.0, config: dict | None = None) -> bool:
    """Create ``topic`` with ``partitions`` partitions unless it exists; True if created.

    An existing topic with a different partition count is an error (frames are
    assigned to partitions by index, so the count matters).
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    if not isinstance(topic, str) or not re.fullmatch(r"[A-Za-z0-9._\-]{1,249}", topic):
        raise InvalidArgument(f"topic: expected 1-249 characters of [A-Za-z0-9._-], got {topic!r}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise InvalidArgument(f"partitions: expected an integer >= 1, got {partitions!r}")
    existing = topic_partitions(bootstrap, topic, timeout)
    if existing:
        if len(existing) != partitions:
            raise InvalidArgument(f"topic {topic!r} at {bootstrap} exists with {len(existing)} partitions, "
                             f"expected {partitions}; delete it or pass --partitions {len(existing)}")
        return False
    trap = ErrorTrap()
    admin = AdminClient(client_config(bootstrap, trap))
    future = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=replication,
                                           config=config or {})], operation_timeout=timeout,
                                 request_timeout=timeout)[topic]
    try:
        future.result(timeout=timeout + 1)
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise BrokerUnavailable(f"could not create topic {topic!r} at {bootstrap}: {exc}") from None
    except Exception as exc:  # concurrent.futures.TimeoutError
        raise StreamTimeout(f"creating topic {topic!r} at {bootstrap} did not finish within {timeout:.1f} s: "
                            f"{trap.last or type(exc).__name__}") from None
    finally:
        del admin   # no close(): see check_broker
    # metadata propagates asynchronously; wait until the partitions are visible
    deadline = time.monotonic() + timeout
    while len(topic_partitions(bootstrap, topic, timeout)) != partitions:
        if time.monotonic() > deadline:
            raise StreamTimeout(f"topic {topic!r} created at {bootstrap} but its {partitions} partitions "
                                f"were not visible within {timeout:.1f} s")
        time.sleep(0.05)
    return True


LOG.addHandler(logging.NullHandler())
