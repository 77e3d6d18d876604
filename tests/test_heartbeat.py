"""The driver's heartbeat bookkeeping: contact times in, pings and lost ranks out (no sockets)."""

import pytest

from sparkmpi.errors import InvalidArgument
from sparkmpi.launch.heartbeat import ContactWatch, lost_message, ping_interval


def test_interval_is_a_fifth_of_the_timeout_at_most_one_second():
    assert ping_interval(10.0) == 1.0
    assert ping_interval(2.0) == pytest.approx(0.4)
    assert ContactWatch(2.0).interval == pytest.approx(0.4)


def _pinging(w: ContactWatch, start: float, end: float, step: float = 0.5) -> None:
    t = start
    while t <= end:
        w.pings_due(t)
        t += step


def test_a_silent_rank_is_lost_after_the_timeout_and_not_before():
    w = ContactWatch(timeout=10.0)
    w.watch(0, now=100.0)
    w.watch(1, now=100.0)
    _pinging(w, 100.0, 104.5)
    w.contact(0, now=105.0)
    _pinging(w, 105.0, 115.5)
    assert w.lost(110.0) == []
    assert w.lost(110.5) == [(1, 10.5)]
    assert w.lost(115.5) == [(0, 10.5), (1, 15.5)]


def test_a_pause_of_the_driver_itself_is_not_taken_for_silence():
    w = ContactWatch(timeout=5.0)          # interval 1 s
    w.watch(0, now=0.0)
    _pinging(w, 0.0, 1.0)
    w.contact(0, now=1.0)
    # The driver is not scheduled from t=1 to t=30: no pings went out.
    w.pings_due(30.0)
    assert w.lost(30.0) == [] and w.lost(33.9) == []
    assert w.lost(34.0) == [(0, 33.0)]     # its ping of t=30 unanswered for 4 s
    w.contact(0, now=32.0)                 # an answer read late still counts
    assert w.lost(34.0) == []


def test_contact_keeps_a_rank_alive_indefinitely():
    w = ContactWatch(timeout=3.0)
    w.watch(0, now=0.0)
    for t in range(1, 100):
        w.contact(0, now=float(t))
        assert w.lost(float(t) + 0.5) == []


def test_pings_go_once_per_interval_to_each_watched_rank():
    w = ContactWatch(timeout=5.0)          # interval 1 s
    w.watch(0, 0.0)
    w.watch(2, 0.0)
    assert w.pings_due(0.0) == [0, 2]
    assert w.pings_due(0.5) == []
    w.watch(1, 0.6)
    assert w.pings_due(0.6) == [1]
    assert w.pings_due(1.0) == [0, 2]
    assert w.pings_due(1.7) == [1]


def test_forgotten_and_unwatched_ranks_are_never_lost_or_pinged():
    w = ContactWatch(timeout=1.0)
    w.watch(0, 0.0)
    w.contact(7, 0.5)                      # never watched: ignored
    w.forget(0)
    assert w.lost(100.0) == [] and w.pings_due(100.0) == [] and w.next_deadline() is None


def test_watch_twice_keeps_the_first_clock_and_contact_never_goes_back():
    w = ContactWatch(timeout=4.0)
    w.watch(0, 0.0)
    w.watch(0, 3.0)
    assert w.next_deadline() == 4.0
    w.contact(0, 5.0)
    w.contact(0, 2.0)                      # an older frame read late
    assert w.next_deadline() == 9.0


@pytest.mark.parametrize("timeout, interval", [(0, 0), (-1, 0), (5.0, 6.0), (5.0, -1.0)])
def test_bad_timeouts_are_refused(timeout, interval):
    with pytest.raises(InvalidArgument):
        ContactWatch(timeout=timeout, interval=interval)


def test_the_message_names_rank_host_and_silence():
    text = lost_message(3, "smpi-x-host2", 10.4, 10.0)
    assert "no contact for 10 s" in text and "rank 3" in text and "smpi-x-host2" in text


def test_a_beat_watches_exactly_the_given_ranks_pings_the_due_and_finds_the_lost():
    w = ContactWatch(timeout=2.0)          # interval 0.4 s
    assert w.beat(0.0, {0, 1}) == ([0, 1], [])
    assert w.beat(0.2, {0, 1}) == ([], [])
    w.contact(0, 1.9)
    assert w.beat(2.1, {0, 1}) == ([0, 1], [(1, 2.1)])
    # Rank 1 reported its end: no longer watched, never lost; rank 2 connected late starts its clock now.
    assert w.beat(2.2, {0, 2}) == ([2], [])
    assert 1 not in w.last_contact and w.next_deadline() == pytest.approx(3.9)


def test_a_busy_rank_is_not_pinged_but_its_silence_counts():
    w = ContactWatch(timeout=2.0)
    assert w.beat(0.0, {0, 1}, busy={0}) == ([1], [])
    t, lost = 0.0, []
    while not lost:
        t += 0.25
        w.contact(1, t)
        pings, lost = w.beat(t, {0, 1}, busy={0})
        assert 0 not in pings
    assert lost == [(0, 2.25)] and t == 2.25
