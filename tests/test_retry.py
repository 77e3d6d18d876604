"""The retry helper (sparkmpi._retry): deadline, message, chained cause, backoff."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from sparkmpi._proc import free_port
from sparkmpi._retry import retry
from sparkmpi.errors import RetryTimeout, SparkMPIError


class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _connect(port):
    def attempt(left):
        with socket.create_connection(("127.0.0.1", port), timeout=left):
            return "connected"
    return attempt


def test_deadline_message_and_cause_on_a_real_refused_port():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RetryTimeout) as info:
        retry(_connect(port), what="connect to", address=f"127.0.0.1:{port}", timeout=0.6)
    waited = time.monotonic() - t0
    assert 0.6 <= waited < 1.5
    assert str(info.value).startswith(f"timed out trying to connect to 127.0.0.1:{port} after 0.")
    assert "refused" in str(info.value).lower()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert isinstance(info.value, SparkMPIError) and isinstance(info.value, TimeoutError)


def test_success_once_the_server_comes_up():
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = free_port()
        timer = threading.Timer(0.3, lambda: (server.bind(("127.0.0.1", port)), server.listen()))
        timer.start()
        try:
            assert retry(_connect(port), what="connect to", address=f"127.0.0.1:{port}", timeout=10) == "connected"
        finally:
            timer.join()


def test_backoff_doubles_with_jitter_and_never_passes_the_deadline():
    fake = FakeTime()
    calls = []

    def failing(left):
        calls.append(left)
        raise OSError("down")

    with pytest.raises(RetryTimeout, match=r"after 5\.0 s: down"):
        retry(failing, what="reach", address="x:1", timeout=5.0, first_delay=0.1, max_delay=1.0,
              clock=fake.clock, sleep=fake.sleep, rng=random.Random(0))
    delays = [0.1 * 2 ** i for i in range(len(fake.sleeps))]
    for got, cap in zip(fake.sleeps[:-1], delays):
        assert min(cap, 1.0) / 2 <= got <= min(cap, 1.0)
    assert len(set(round(s, 6) for s in fake.sleeps[-4:-1])) > 1, "no jitter"
    assert fake.now == pytest.approx(105.0)  # the last sleep stops at the deadline
    assert all(left > 0 for left in calls) and calls[0] == pytest.approx(5.0)


def test_success_after_failures_returns_the_value():
    fake = FakeTime()
    outcomes = iter([OSError("a"), OSError("b"), "done"])

    def flaky(left):
        value = next(outcomes)
        if isinstance(value, Exception):
            raise value
        return value

    assert retry(flaky, what="x", address="y", timeout=60, clock=fake.clock, sleep=fake.sleep) == "done"
    assert len(fake.sleeps) == 2


def test_other_errors_propagate_at_once():
    fake = FakeTime()

    def wrong(left):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        retry(wrong, what="x", address="y", timeout=60, clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == []
    with pytest.raises(OSError, match="permanent"):
        retry(lambda left: (_ for _ in ()).throw(OSError("permanent")), what="x", address="y", timeout=60,
              transient=lambda exc: False, clock=fake.clock, sleep=fake.sleep)
    assert fake.sleeps == []


def test_check_stops_retrying_and_error_class_is_the_callers():
    fake = FakeTime()

    class Gone(Exception):
        pass

    def check():
        if len(fake.sleeps) >= 2:
            raise Gone("the process exited")

    with pytest.raises(Gone):
        retry(lambda left: (_ for _ in ()).throw(OSError("no")), what="x", address="y", timeout=60,
              check=check, clock=fake.clock, sleep=fake.sleep)

    class Mine(Exception):
        pass

    with pytest.raises(Mine, match="timed out trying to read from z after") as info:
        retry(lambda left: (_ for _ in ()).throw(OSError("no")), what="read from", address="z", timeout=1,
              error=Mine, describe=lambda exc: f"because {exc}", clock=fake.clock, sleep=fake.sleep)
    assert str(info.value).endswith("because no") and isinstance(info.value.__cause__, OSError)


def test_what_fn_holds_is_freed_without_the_garbage_collector():
    """A failure kept by retry() must not tie its traceback to retry's frame (a reference cycle):
    fn's closure, a Kafka client with broker connections say, would live until gc runs."""
    import gc
    import weakref

    class Client:
        pass

    def attempt_with(outcomes, **kw):
        client = Client()

        def fn(left):   # keeps no failure in a local of its own (that would be a cycle of its own)
            assert client is not None
            if isinstance(outcomes[0], Exception):
                raise outcomes.pop(0)
            return outcomes.pop(0)

        fake = FakeTime()
        try:
            retry(fn, what="x", address="y", timeout=kw.pop("timeout", 60), clock=fake.clock,
                  sleep=fake.sleep, **kw)
        except Exception:  # noqa: BLE001  (each way out is checked below, the error dropped)
            pass
        return weakref.ref(client)

    gc.collect()
    gc.disable()
    try:
        ways_out = {
            "success after failures": attempt_with([OSError("a"), OSError("b"), "done"]),
            "deadline": attempt_with([OSError(str(i)) for i in range(10)], timeout=1),
            "not transient": attempt_with([OSError("a"), OSError("b")], transient=lambda exc: str(exc) == "a"),
            "check raised": attempt_with([OSError(str(i)) for i in range(10)],
                                         check=lambda: (_ for _ in ()).throw(KeyError("gone"))),
        }
        assert [way for way, ref in ways_out.items() if ref() is not None] == []
    finally:
        gc.enable()


@pytest.mark.parametrize("kw, name", [({"timeout": 0}, "timeout"), ({"timeout": 1, "first_delay": 0}, "first_delay")])
def test_bad_arguments_are_named(kw, name):
    with pytest.raises(ValueError, match=name):
        retry(lambda left: None, what="x", address="y", **kw)
