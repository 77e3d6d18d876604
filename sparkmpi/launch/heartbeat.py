"""Which ranks' hosts went silent: the driver's heartbeat bookkeeping, pure (times in, decisions out).

While the driver waits on a world (start, a call, close), or on an external
program's job (:mod:`.program_job`) until its ranks exit, it pings every
connected relay each :attr:`ContactWatch.interval` seconds; a relay answers
at once from its own loop, which runs beside its rank however busy the rank
is.  Any frame from a relay counts as contact.  A relay silent for longer
than ``timeout`` seconds is on a host that is gone (link down, frozen,
powered off): TCP alone would not say so for minutes, as its kernel, or the
network, just stops answering.

Between waits nobody reads the relays' connections, so each wait starts the
clock afresh (:meth:`ContactWatch.watch` with the wait's start time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidArgument

#: Pings per timeout: a lost host is declared after about ``timeout`` s, not ``timeout + interval``.
PINGS_PER_TIMEOUT = 5
MAX_INTERVAL_S = 1.0


def ping_interval(timeout: float) -> float:
    return min(MAX_INTERVAL_S, timeout / PINGS_PER_TIMEOUT)


@dataclass
class ContactWatch:
    """Last contact and last ping of each watched rank, against a ``timeout`` in seconds."""

    timeout: float
    interval: float = 0.0
    last_contact: dict = field(default_factory=dict)
    last_ping: dict = field(default_factory=dict)
    #: rank -> when the first ping since its last contact went out.
    unanswered_since: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.timeout > 0:
            raise InvalidArgument(f"timeout: expected seconds > 0, got {self.timeout!r}")
        if not self.interval:
            self.interval = ping_interval(self.timeout)
        if not 0 < self.interval <= self.timeout:
            raise InvalidArgument(f"interval: expected 0 < seconds <= timeout ({self.timeout}), got {self.interval!r}")

    def watch(self, rank: int, now: float) -> None:
        """Start watching ``rank`` (idempotent: a rank already watched keeps its clock)."""
        self.last_contact.setdefault(rank, now)

    def forget(self, rank: int) -> None:
        """Stop watching ``rank`` (its relay closed on purpose)."""
        self.last_contact.pop(rank, None)
        self.last_ping.pop(rank, None)
        self.unanswered_since.pop(rank, None)

    def contact(self, rank: int, now: float) -> None:
        """A frame came from ``rank``'s relay."""
        if rank in self.last_contact:
            self.last_contact[rank] = max(self.last_contact[rank], now)
            self.unanswered_since.pop(rank, None)

    def pings_due(self, now: float) -> list[int]:
        """Watched ranks to ping now (each at most once per interval); records them as pinged."""
        due = [r for r in sorted(self.last_contact) if now - self.last_ping.get(r, -float("inf")) >= self.interval]
        for rank in due:
            self.last_ping[rank] = now
            self.unanswered_since.setdefault(rank, now)
        return due

    def lost(self, now: float) -> list[tuple[int, float]]:
        """``(rank, seconds without contact)`` for every watched rank silent past the timeout
        whose ping has gone unanswered for the timeout less one interval.

        The second condition keeps a driver that was itself not scheduled (and
        so sent no pings) from blaming its own pause on the relays.
        """
        patience = self.timeout - self.interval
        return [(r, now - t) for r, t in sorted(self.last_contact.items())
                if now - t > self.timeout and now - self.unanswered_since.get(r, now) >= patience]

    def beat(self, now: float, watched, busy=()) -> tuple[list[int], list[tuple[int, float]]]:
        """One round of the heartbeat at ``now``: ``(ranks to ping now, lost ranks)``.

        Exactly the ranks in ``watched`` are watched from now on (a rank no
        longer in it is forgotten: its relay closed or reported its end).
        Ranks in ``busy`` have something half written to them, which a ping
        would cut into: they are not pinged, though their clock runs (the
        bytes they take are their contact).
        """
        watched = set(watched)
        for rank in [r for r in self.last_contact if r not in watched]:
            self.forget(rank)
        for rank in sorted(watched):
            self.watch(rank, now)
        return [r for r in self.pings_due(now) if r not in busy], self.lost(now)

    def next_deadline(self) -> float | None:
        """When the first watched rank would be lost if nothing comes (None: nobody is watched)."""
        return min(self.last_contact.values()) + self.timeout if self.last_contact else None


def lost_message(rank: int, host: str, silent_s: float, timeout: float) -> str:
    """The cause of a job failed because ``rank``'s host went silent."""
    return (f"no contact for {silent_s:.0f} s with the relay of rank {rank} on host {host} "
            f"(host_timeout is {timeout:g} s): the host's link is down, or it is frozen or powered off")
