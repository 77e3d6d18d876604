"""The one retry-with-backoff helper: jittered exponential delays under a deadline.

Every network wait in sparkmpi that retries goes through :func:`retry`, so a
wait that runs out always says the same thing: "timed out trying to WHAT
ADDRESS after N s: CAUSE", with the last failure chained as ``__cause__``.
"""

from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from .errors import InvalidArgument, RetryTimeout

__all__ = ["retry"]

T = TypeVar("T")


def _text(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def retry(fn: Callable[[float], T], *, what: str, address: str, timeout: float,
          retry_on: tuple = (OSError,), first_delay: float = 0.05, max_delay: float = 1.0,
          transient: Callable[[BaseException], bool] | None = None,
          check: Callable[[], None] | None = None,
          describe: Callable[[BaseException], str] = _text,
          error: Callable[[str], BaseException] = RetryTimeout,
          clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
          rng: random.Random | None = None) -> T:
    """Call ``fn(seconds_left)`` until it returns, retrying failures until ``timeout``.

    Parameters
    ----------
    fn : callable
        Called with the seconds left before the deadline (> 0); its return
        value is returned.
    what, address : str
        For the error: "timed out trying to ``what`` ``address`` after N s".
    timeout : float
        Seconds from the first attempt to the deadline; no attempt starts after it.
    retry_on : tuple of exception classes
        Failures that are retried; anything else propagates at once.
    first_delay, max_delay : float
        The delay before the second attempt, doubling up to ``max_delay``; each
        sleep is drawn uniformly from the upper half of the current delay
        (jitter, so many callers do not retry in step) and never passes the
        deadline.
    transient : callable, optional
        ``transient(exc)`` False: the failure is raised at once, unwrapped.
    check : callable, optional
        Called before every retry; raises to stop retrying (a child process
        that exited, say), and that exception propagates unchanged.
    describe : callable
        The cause's text in the error (default: the first line of ``str(exc)``).
    error : callable
        Builds the exception raised at the deadline from its message
        (default :class:`~sparkmpi.errors.RetryTimeout`); the last failure is
        chained to it.

    Raises
    ------
    RetryTimeout (or what ``error`` builds)
        "timed out trying to WHAT ADDRESS after N s: CAUSE", from the last failure.
    """
    if not timeout > 0:
        raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
    if not 0 < first_delay <= max_delay:
        raise InvalidArgument(f"first_delay, max_delay: expected 0 < first_delay <= max_delay, "
                         f"got {first_delay!r}, {max_delay!r}")
    rng = rng or random.Random()
    start = clock()
    deadline = start + timeout
    delay = first_delay
    last = None
    try:
        while True:
            try:
                return fn(max(deadline - clock(), 1e-3))
            except retry_on as exc:
                if transient is not None and not transient(exc):
                    raise
                last = exc
            left = deadline - clock()
            if left > 0:
                sleep(min(rng.uniform(delay / 2, delay), left))
                delay = min(delay * 2, max_delay)
            if clock() >= deadline:
                raise error(f"timed out trying to {what} {address} after {clock() - start:.1f} s: "
                            f"{describe(last)}") from last
            if check is not None:
                check()
    finally:
        # The failure's traceback holds this frame, and this frame would hold the failure: a
        # reference cycle that keeps fn's closure (a Kafka client and its broker connections)
        # alive until the garbage collector happens to run, minutes later in a big process.
        last = None
