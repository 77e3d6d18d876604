"""The process helpers (sparkmpi._proc) on real child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from sparkmpi._proc import PARENT_GONE_EXIT, die_with_parent, free_port, pid_running, stop_process


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], **kw)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# A child that starts a grandchild sleeping for a minute, prints its pid and waits.
_MIDDLE = """
    import subprocess, sys
    from sparkmpi._proc import with_parent_death
    argv = [sys.executable, "-c", "print('up', flush=True); import time; time.sleep(60)"]
    child = subprocess.Popen(with_parent_death(argv) if sys.argv[1] == "hook" else argv, stdout=subprocess.PIPE)
    child.stdout.readline()   # running Python: setpriv has set the signal before its exec
    print(child.pid, flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("hook", ["hook", "none"])
def test_grandchild_dies_with_its_parent_only_when_asked(hook):
    middle = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_MIDDLE), hook],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    grandchild = int(middle.stdout.readline())
    try:
        assert pid_running(grandchild)
        middle.kill()
        middle.wait()
        gone = _wait_gone(grandchild, 5)
        assert gone == (hook == "hook"), f"grandchild gone={gone} with hook={hook}"
    finally:
        if pid_running(grandchild):
            os.kill(grandchild, signal.SIGKILL)
            _wait_gone(grandchild, 5)
        middle.stdout.close()
        middle.stdin.close()


def test_die_with_parent_exits_when_the_parent_is_already_another():
    # The pid given is not the real parent: as if the parent died before prctl.
    proc = _python(f"""
        from sparkmpi._proc import die_with_parent
        die_with_parent({os.getpid() + 1_000_000})
        raise SystemExit(0)
    """)
    assert proc.wait(30) == PARENT_GONE_EXIT


def test_die_with_parent_names_a_bad_signal():
    with pytest.raises(OSError, match="PR_SET_PDEATHSIG, 999"):
        die_with_parent(None, 999)


def test_free_port_is_bindable():
    port = free_port("127.0.0.1")
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    with pytest.raises(ValueError, match="host: expected"):
        free_port("")


def test_stop_process_terminates_and_reaps():
    proc = _python("import time; time.sleep(60)")
    t0 = time.monotonic()
    assert stop_process(proc, grace=5) == -signal.SIGTERM
    assert time.monotonic() - t0 < 4
    assert proc.returncode == -signal.SIGTERM
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)  # reaped: no zombie left


def test_stop_process_kills_after_grace():
    proc = _python("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    assert stop_process(proc, grace=0.5) == -signal.SIGKILL
    assert 0.4 < time.monotonic() - t0 < 5
    proc.stdout.close()


def test_stop_process_returns_the_status_of_an_exited_child():
    proc = _python("raise SystemExit(3)")
    while proc.poll() is None:
        time.sleep(0.01)
    assert stop_process(proc) == 3
    bare = _python("raise SystemExit(4)")
    assert stop_process(bare.pid, grace=5) in (4, -signal.SIGTERM)  # raced the exit, or was stopped
    with pytest.raises(ChildProcessError):
        os.waitpid(bare.pid, os.WNOHANG)


def test_stop_process_by_pid_of_our_child_reaps_it():
    proc = _python("import time; time.sleep(60)")
    assert stop_process(proc.pid, grace=5) == -signal.SIGTERM
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)


def test_stop_process_by_pid_of_a_stranger_waits_until_gone():
    # A grandchild re-parented away from us: no status to read, but it must be gone.
    middle = _python("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        print(child.pid, flush=True)
    """, stdout=subprocess.PIPE, text=True)
    stranger = int(middle.stdout.readline())
    middle.wait()
    middle.stdout.close()
    assert pid_running(stranger)
    assert stop_process(stranger, grace=5) is None
    assert not pid_running(stranger)


def test_stop_process_group_takes_the_children_too():
    leader = _python("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
    """, stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(leader.stdout.readline())
    leader.stdout.close()
    assert stop_process(leader, grace=5, group=True) == -signal.SIGTERM
    assert _wait_gone(child, 5), "the leader's child outlived a group stop"


def test_stop_process_checks_its_arguments():
    with pytest.raises(TypeError, match="proc: expected"):
        stop_process("123")
    with pytest.raises(ValueError, match="grace: expected"):
        stop_process(os.getpid(), grace=-1)
