"""The relay adapter's reading of the rank's PMI socket (sparkmpi.launch.relay_adapter), with a real socket pair."""

from __future__ import annotations

import selectors
import socket
import threading

from sparkmpi.launch import relay
from sparkmpi.launch.relay_adapter import RelayAdapter


class _Recorder(relay.RelayState):
    def __init__(self):
        super().__init__("kvs_1", 0, "rank 0 (partition 0 on hostA)")
        self.lines: list = []

    def handle(self, event):
        self.lines.append(event.line)
        return super().handle(event)


class _Adapter(RelayAdapter):
    def __init__(self, pmi):
        super().__init__(("127.0.0.1", 1), 0, 1.0)
        self.state = _Recorder()
        self.pmi, self.pmi_open = pmi, True
        self.sel = selectors.DefaultSelector()
        self.sel.register(pmi, selectors.EVENT_READ, "rank-pmi")
        self.sent: list = []

    def execute(self, actions):
        self.sent.extend(actions)


def test_reading_the_rank_pmi_socket_never_waits_once_it_is_drained():
    ours, theirs = socket.socketpair()
    adapter = _Adapter(ours)
    try:
        theirs.sendall(b"cmd=init pmi_version=1\ncmd=get_maxes\ncmd=barr")
        adapter.forward_rank_pmi()          # before a frame: takes what is queued
        assert adapter.state.lines == [b"cmd=init pmi_version=1", b"cmd=get_maxes"]
        # The loop's own readable event for the same bytes comes after: it must not block.
        done = threading.Event()
        thread = threading.Thread(target=lambda: (adapter.forward_rank_pmi(), done.set()), daemon=True)
        thread.start()
        assert done.wait(2.0), "forward_rank_pmi blocked on a drained socket"
        theirs.sendall(b"ier_in\n")
        adapter.forward_rank_pmi()
        assert adapter.state.lines[-1] == b"cmd=barrier_in"
        theirs.close()
        adapter.forward_rank_pmi()          # end of file: the socket leaves the loop
        assert not adapter.pmi_open and adapter.pmi not in adapter.sel.get_map()
    finally:
        theirs.close()
        adapter.sel.close()
        ours.close()
