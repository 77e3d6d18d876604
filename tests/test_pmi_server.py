"""The PMI server over real sockets on 127.0.0.1, with relays played by the test."""

import logging
import socket
import threading
import time

import pytest

from sparkmpi.pmi import control, server as server_mod
from sparkmpi.pmi.server import PMIServer
from sparkmpi.pmi.wire import LineBuffer, parse_line


@pytest.fixture
def pmi():
    srv = PMIServer("127.0.0.1", 0)
    yield srv
    srv.close()
    assert not srv.alive


class FakeRelay:
    """Speaks the relay side of the protocol, line by line."""

    def __init__(self, srv, job=None, rank=0, token=None, host="node-a", hello=True):
        self.sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        self.lines = LineBuffer()
        self.queue = []
        if hello:
            self.send(control.Hello(job=job.kvsname, token=token or job.token, rank=rank, partition=rank,
                                    host=host, pid=1000 + rank).encode())

    def send(self, data: bytes):
        self.sock.sendall(data if data.endswith(b"\n") else data + b"\n")

    def recv(self):
        while not self.queue:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("server closed the connection")
            self.queue += self.lines.feed(data)
        return parse_line(self.queue.pop(0))

    def ask(self, line: str):
        self.send(line.encode())
        return self.recv()

    def closed_by_server(self, timeout=5.0):
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self):
        self.sock.close()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_client_without_token_is_refused_and_logged(pmi, caplog):
    pmi.open_job(2)
    with caplog.at_level(logging.WARNING, logger="sparkmpi.pmi"):
        relay = FakeRelay(pmi, hello=False)
        reply = relay.ask("cmd=init pmi_version=1 pmi_subversion=1")
        assert reply.name == control.REFUSED
        assert "expected cmd=sparkmpi-hello" in control.decode_text(reply)
        assert relay.closed_by_server()
    assert any("refused PMI client 127.0.0.1:" in r.message for r in caplog.records)
    assert len(pmi.refused) == 1


def test_wrong_token_and_unknown_job_are_refused(pmi):
    job = pmi.open_job(1)
    relay = FakeRelay(pmi, job, token="0" * 32)
    reply = relay.recv()
    assert reply.name == control.REFUSED and "wrong token" in control.decode_text(reply)
    assert relay.closed_by_server()
    other = pmi.open_job(1)
    other.close()
    relay = FakeRelay(pmi, other)
    assert "no open job" in control.decode_text(relay.recv())
    # The refused clients never touched the job.
    assert not job.space.ranks[0].registered


def test_garbage_first_line_is_refused(pmi):
    relay = FakeRelay(pmi, hello=False)
    relay.send(b"\x16\x03\x01\x02\x00GET / HTTP/1.1\r")
    reply = relay.recv()
    assert reply.name == control.REFUSED and "malformed first line" in control.decode_text(reply)


def test_silent_client_is_dropped(pmi, monkeypatch):
    monkeypatch.setattr(server_mod, "HELLO_TIMEOUT", 0.2)
    relay = FakeRelay(pmi, hello=False)
    reply = relay.recv()
    assert reply.name == control.REFUSED and "no hello within" in control.decode_text(reply)


def test_two_ranks_through_init_barrier_finalize(pmi):
    job = pmi.open_job(2)
    r0, r1 = FakeRelay(pmi, job, 0), FakeRelay(pmi, job, 1)
    assert r0.recv().name == control.WELCOME and r1.recv().name == control.WELCOME
    for relay in (r0, r1):
        assert relay.ask("cmd=init pmi_version=1 pmi_subversion=1").get("rc") == "0"
        assert relay.ask(f"cmd=get kvsname={job.kvsname} key=PMI_process_mapping").get("value") == "(vector,(0,1,2))"
    r0.send(b"cmd=barrier_in")
    r1.send(b"cmd=barrier_in")
    assert r0.recv().name == "barrier_out" and r1.recv().name == "barrier_out"
    for relay in (r0, r1):
        assert relay.ask("cmd=finalize").name == "finalize_ack"
        relay.send(control.bare_line(control.DONE))
    assert job.finished.wait(5)
    assert job.failure is None
    job.close()
    assert r0.closed_by_server() and r1.closed_by_server()


def test_malformed_pmi_line_fails_the_job_and_aborts_the_others(pmi):
    job = pmi.open_job(2)
    r0, r1 = FakeRelay(pmi, job, 0), FakeRelay(pmi, job, 1)
    r0.recv(), r1.recv()
    r1.send(b"this is not PMI")
    assert job.failed.wait(5)
    assert job.failure.rank == 1
    assert "rank 1 (partition 1 on node-a) sent a malformed PMI command" in job.failure.cause
    abort = r0.recv()
    assert abort.name == control.ABORT and "malformed" in control.decode_text(abort)


def test_lost_relay_fails_the_job(pmi):
    job = pmi.open_job(2)
    r0, r1 = FakeRelay(pmi, job, 0), FakeRelay(pmi, job, 1)
    r0.recv(), r1.recv()
    r1.close()
    assert job.failed.wait(5)
    assert "lost the relay of rank 1" in job.failure.cause
    assert r0.recv().name == control.ABORT


def test_failed_report_and_driver_abort(pmi):
    job = pmi.open_job(2)
    r0, r1 = FakeRelay(pmi, job, 0), FakeRelay(pmi, job, 1)
    r0.recv(), r1.recv()
    r0.send(control.text_line(control.FAILED, "rank 0 raised ValueError: bad\nTraceback..."))
    assert job.failed.wait(5)
    assert job.failure.cause.startswith("rank 0 raised ValueError")
    abort = r1.recv()
    assert abort.name == control.ABORT and abort.get("stacks") == "0"
    # Reports after the failure are kept as diagnostics.
    r1.send(control.text_line(control.FAILED, "stack of rank 1"))
    assert wait_for(lambda: job.reports.get(1) == "stack of rank 1")
    # A late relay of a failed job (a Spark stage retry, say) is refused.
    late = FakeRelay(pmi, job, 0)
    reply = late.recv()
    assert reply.name == control.REFUSED and "already failed" in control.decode_text(reply)


def test_driver_abort_reaches_every_relay(pmi):
    job = pmi.open_job(3)
    relays = [FakeRelay(pmi, job, r) for r in range(3)]
    for relay in relays:
        relay.recv()
    job.abort("the job timed out after 1 s", dump_stacks=True)
    for relay in relays:
        reply = relay.recv()
        assert reply.name == control.ABORT and reply.get("stacks") == "1"
        assert "timed out" in control.decode_text(reply)


def test_many_ranks_with_segmented_keys(pmi):
    """128 ranks each put a 9-segment address, meet at a barrier, read a neighbour's."""
    size = 128
    job = pmi.open_job(size)
    relays = [FakeRelay(pmi, job, r, host=f"node-{r}") for r in range(size)]
    for relay in relays:
        assert relay.recv().name == control.WELCOME
    value = "u" * 1024
    errors = []

    def rank_main(rank, relay):
        try:
            for seg in range(9):
                assert relay.ask(f"cmd=put kvsname={job.kvsname} key=addr-{rank}-seg-{seg}/9 value={value}"
                                 ).get("rc") == "0"
            assert relay.ask("cmd=barrier_in").name == "barrier_out"
            peer = (rank + 1) % size
            for seg in range(9):
                assert relay.ask(f"cmd=get kvsname={job.kvsname} key=addr-{peer}-seg-{seg}/9").get("value") == value
            mapping = relay.ask(f"cmd=get kvsname={job.kvsname} key=PMI_process_mapping").get("value")
            assert mapping.count("(") == size + 1  # one block per node
        except Exception as exc:  # reported below
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=rank_main, args=(r, relay)) for r, relay in enumerate(relays)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    assert not errors, errors[:3]
    assert len(job.space.kvs) == size * 9
    assert elapsed < 30, f"{size} ranks took {elapsed:.1f} s"
    # What the diagnostics see of the open job: a copy of its keys and values.
    assert job in pmi.open_jobs()
    seen = job.key_values()
    assert len(seen) == size * 9 and seen["addr-5-seg-8/9"] == value
    seen.clear()
    assert len(job.key_values()) == size * 9
    job.close()
    assert job not in pmi.open_jobs()
    for relay in relays:
        relay.close()
