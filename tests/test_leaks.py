"""The leak check itself: each kind of leftover is found, named, and cleaned up."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import threading
import time

import pytest

import leaks
from leaks import LEAK_TAG


def _wait(before, **kw):
    # The session's own allowances (Spark's Py4J connections may open while these tests run).
    allow = dataclasses.replace(leaks.ALLOWANCES, warm_pool=2)
    return leaks.wait_for_no_leaks(before, allow, tag=LEAK_TAG, **kw)


def test_nothing_new_is_no_leak(tmp_path):
    before = leaks.snapshot(LEAK_TAG, shm_dir=str(tmp_path))
    assert _wait(before, timeout=1, shm_dir=str(tmp_path))[0] == []


def test_a_leaked_child_is_named_with_its_parent_and_killed():
    before = leaks.snapshot(LEAK_TAG)
    child = subprocess.Popen(["sleep", "300"])
    try:
        t0 = time.monotonic()
        found, after = _wait(before, timeout=0.5)
        assert time.monotonic() - t0 < 3
        assert len(found) == 1, found
        assert f"process {child.pid} [sleep] 'sleep 300', parent {os.getpid()}" in found[0]
        leaks.clean_up(before, after)
        assert child.wait(5) == -9
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _wait(before, timeout=1)[0] == []


def test_a_child_that_exits_in_time_is_no_leak():
    before = leaks.snapshot(LEAK_TAG)
    child = subprocess.Popen(["sleep", "0.3"])
    threading.Timer(0.35, child.wait).start()     # reaped a moment after the test "ends"
    assert _wait(before, timeout=5)[0] == []


def test_a_daemon_reparented_to_init_is_found_by_its_tag():
    before = leaks.snapshot(LEAK_TAG)
    # setsid + a double fork: the sleep is no descendant of this process any more.
    out = subprocess.run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True,
                         text=True, check=True).stdout
    pid = int(out.strip())
    try:
        found, after = _wait(before, timeout=0.5)
        assert any(f"process {pid} [sleep]" in line for line in found), found
        leaks.clean_up(before, after)
        deadline = time.monotonic() + 5
        while leaks._read_proc(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leaks._read_proc(pid) is None
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_a_leaked_thread_is_named():
    stop = threading.Event()
    before = leaks.snapshot(LEAK_TAG)
    thread = threading.Thread(target=stop.wait, name="forgotten-poller", daemon=True)
    thread.start()
    try:
        found, _ = _wait(before, timeout=0.3)
        assert len(found) == 1 and "thread 'forgotten-poller' (daemon=True" in found[0], found
    finally:
        stop.set()
        thread.join()
    assert _wait(before, timeout=1)[0] == []


def test_leaked_inet_and_unix_sockets_are_named(tmp_path):
    before = leaks.snapshot(LEAK_TAG)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "ctl.sock"))
    try:
        found, _ = _wait(before, timeout=0.3)
        assert any(f"tcp 127.0.0.1:{port} -> 0.0.0.0:0" in line for line in found), found
        assert any(f"unix {tmp_path / 'ctl.sock'}" in line for line in found), found
        assert all(line.startswith("socket fd ") for line in found) and len(found) == 2
    finally:
        server.close()
        unix.close()
    assert _wait(before, timeout=1)[0] == []


def test_session_sockets_are_allowed_by_port():
    server = socket.create_server(("127.0.0.1", 0))
    before = leaks.snapshot(LEAK_TAG)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        allow = leaks.Allowances(tcp_peer_ports={server.getsockname()[1]})
        found = leaks.leaks(before, leaks.snapshot(LEAK_TAG), allow)
        assert len(found) == 1 and f"tcp 127.0.0.1:{server.getsockname()[1]} ->" in found[0], found  # accepted
        allow.tcp_local_ports.add(server.getsockname()[1])
        assert leaks.leaks(before, leaks.snapshot(LEAK_TAG), allow) == []
    finally:
        for sock in (client, accepted, server):
            sock.close()


def test_a_leftover_mpich_segment_is_found_unless_someone_maps_it(tmp_path):
    before = leaks.snapshot(LEAK_TAG, shm_dir=str(tmp_path))
    (tmp_path / "mpich_test").write_bytes(b"\0" * 4096)
    (tmp_path / "unrelated").write_bytes(b"x")
    found, after = _wait(before, timeout=0.2, shm_dir=str(tmp_path))
    assert found == [f"shared-memory file {tmp_path / 'mpich_test'} (4096 bytes), mapped by no process"]
    import mmap

    with open(tmp_path / "mpich_test", "r+b") as fh, mmap.mmap(fh.fileno(), 4096):
        assert _wait(before, timeout=0.2, shm_dir=str(tmp_path))[0] == []   # a live job's segment
    leaks.clean_up(before, after, shm_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated"]


def test_a_leftover_network_namespace_is_found(tmp_path):
    before = leaks.snapshot(LEAK_TAG, netns_dir=str(tmp_path))
    (tmp_path / "host1").touch()   # what `ip netns add host1` leaves in /run/netns
    found, _ = _wait(before, timeout=0.2, netns_dir=str(tmp_path))
    assert found == ["network namespace 'host1'"]


def _fake(pid, ppid, comm, cmdline="", start=1):
    return leaks.Proc(pid, ppid, start, comm, cmdline)


def _snap(procs):
    table = {p.pid: p for p in procs}
    return leaks.Snapshot(table, table, {}, {}, set(), set())


def test_spark_workers_fork_servers_and_spares_are_allowed_up_to_warm_pool():
    jvm = _fake(100, os.getpid(), "java")
    daemon = _fake(101, 100, "python3", "python3 -m pyspark.daemon")
    worker = _fake(102, 101, "python3", "python3 -m pyspark.daemon")
    zygote = _fake(103, 102, "sparkmpi-zygote", "python3 -m sparkmpi.launch.zygote")
    spares = [_fake(104 + i, 102, "sparkmpi-rank", "python3 -m sparkmpi.launch.zygote") for i in range(3)]
    before = _snap([jvm])
    allow = leaks.Allowances(spark_jvms={100}, warm_pool=2)
    assert leaks.leaks(before, _snap([jvm, daemon, worker, zygote, *spares[:2]]), allow) == []
    found = leaks.leaks(before, _snap([jvm, daemon, worker, zygote, *spares]), allow)
    assert len(found) == 3 and all("worker 102 has 3 ranks, warm_pool allows 2 spares" in f for f in found), found
    stray = _fake(110, 102, "sleep", "sleep 300")
    found = leaks.leaks(before, _snap([jvm, daemon, worker, stray]), allow)
    assert found == ["process 110 [sleep] 'sleep 300', parent 102 (python3 -m pyspark.daemon)"]
    # A process that only reuses a pid is new.
    reused = _snap([jvm, _fake(110, 1, "sleep", "sleep 300", start=5)])
    assert leaks.leaks(reused, _snap([jvm, daemon, worker, stray]), allow) == found


@pytest.mark.parametrize("kind", ["process", "thread"])
def test_the_autouse_fixture_fails_a_leaking_test(pytester, monkeypatch, kind):
    """The conftest's fixture, run on a test that leaks, fails it at teardown and names the leak."""
    here = os.path.dirname(__file__)
    pytester.makeconftest(f"import sys; sys.path.insert(0, {here!r}); from leaks import _no_leaks  # noqa")
    monkeypatch.setenv("PYTEST_SPARKMPI_LEAK_DEADLINE", "0.5")
    pytester.makepyfile(f"""
        import subprocess, threading, time
        def test_leaky():
            if {kind!r} == "process":
                subprocess.Popen(["sleep", "30"])
            else:
                threading.Thread(target=time.sleep, args=(30,), name="leaky-thread", daemon=True).start()
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "timeout=120")
    result.assert_outcomes(passed=1, errors=1)
    expected = "*process * [[]sleep[]] 'sleep 30', parent *" if kind == "process" else "*thread 'leaky-thread'*"
    result.stdout.fnmatch_lines(["*the test left behind*", expected])


def test_a_socket_held_only_by_a_reference_cycle_is_named_so(pytester, monkeypatch):
    """The failure says when garbage collection would have freed the leaked socket: its owner
    is in a reference cycle (the librdkafka clients kept by tracebacks, in the past)."""
    here = os.path.dirname(__file__)
    pytester.makeconftest(f"import sys; sys.path.insert(0, {here!r}); from leaks import _no_leaks  # noqa")
    monkeypatch.setenv("PYTEST_SPARKMPI_LEAK_DEADLINE", "0.5")
    pytester.makepyfile("""
        import gc, socket
        def test_leaky():
            gc.disable()   # as in a long run, where the oldest generation is collected rarely
            class Holder:
                pass
            holder = Holder()
            holder.me, holder.sock = holder, socket.socket()
            holder.sock.bind(("127.0.0.1", 0))
            holder.sock.listen()
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "timeout=120", "-W", "ignore")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the test left behind*", "*socket fd * tcp 127.0.0.1:*",
                                 "*gc.collect() freed 1 of those sockets*"])


def test_sockets_and_threads_of_a_kept_singleton_are_allowed_and_others_not():
    class Server:
        def __init__(self):
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.loop, daemon=True)
            self.thread.start()

        def loop(self):
            self.stop.wait()

    before = leaks.snapshot(LEAK_TAG)
    server = Server()
    stray = socket.socket()
    try:
        kept = leaks.Allowances(singletons=[lambda: server])
        found = leaks.leaks(before, leaks.snapshot(LEAK_TAG), kept)
        assert len(found) == 1 and found[0].startswith(f"socket fd {stray.fileno()}: "), found
        assert len(leaks.leaks(before, leaks.snapshot(LEAK_TAG), leaks.Allowances())) == 3
    finally:
        stray.close()
        server.stop.set()
        server.thread.join()
        server.listener.close()


def test_a_known_leak_passes_with_a_warning_and_others_still_fail(pytester, monkeypatch):
    here = os.path.dirname(__file__)
    pytester.makeconftest(f"import sys; sys.path.insert(0, {here!r}); from leaks import _no_leaks  # noqa")
    pytester.makeini("[pytest]\nmarkers =\n    known_leak: x\n")
    monkeypatch.setenv("PYTEST_SPARKMPI_LEAK_DEADLINE", "0.5")
    pytester.makepyfile("""
        import threading, time, pytest
        def _start(name):
            threading.Thread(target=time.sleep, args=(30,), name=name, daemon=True).start()
        @pytest.mark.known_leak("thread 'closer'", "bug 1")
        def test_known():
            _start("closer")
        @pytest.mark.known_leak("thread 'closer'", "bug 1")
        def test_other():
            _start("closer")
            _start("poller")
        """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "timeout=120")
    result.assert_outcomes(passed=2, errors=1, warnings=2)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_other*", "*thread 'poller'*",
                                 "*known leak (bug 1): thread 'closer'*"])


def test_new_children_of_a_fixture_owned_process_are_allowed():
    browser = _fake(200, os.getpid(), "chromium", "chromium --headless")
    renderer = _fake(201, 200, "chromium", "chromium --type=renderer")
    stray = _fake(202, os.getpid(), "sleep", "sleep 9")
    found = leaks.leaks(_snap([browser]), _snap([browser, renderer, stray]), leaks.Allowances(process_roots={200}))
    assert found == [f"process 202 [sleep] 'sleep 9', parent {os.getpid()}"]
