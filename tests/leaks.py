"""What a test leaves behind: child processes, threads, sockets, MPICH shared memory, namespaces.

:func:`snapshot` records what exists now; :func:`leaks` compares a later
snapshot with it and returns one line per thing that is new and should not
be.  ``tests/conftest.py`` takes a snapshot before every test and fails the
test when something new is still there after a short deadline.

What legitimately outlives a test (:class:`Allowances`):

* the session's Spark JVM and, under it, PySpark's daemon and Python workers,
  each worker's fork server (``sparkmpi-zygote``) and up to ``warm_pool`` rank
  spares (``sparkmpi-rank``) per worker;
* threads and sockets of the session's SparkSession (Py4J connections to the
  gateway, the accumulator server and its handlers), registered by the
  session fixtures;
* the driver's shared PMI server (``sparkmpi.run`` keeps one per process), and
  MPICH's sockets once a test has initialised MPI in this process (they live
  as long as the process).

A process is "ours" when it descends from this interpreter or carries
:data:`TAG_VARIABLE` in its environment (so a daemon re-parented to init is
still found).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

#: Set in this interpreter's environment; every process it starts inherits it.
#: (Not ``SPARKMPI_*``: the settings loader rejects unknown names there.)
TAG_VARIABLE = "PYTEST_SPARKMPI_LEAK_TAG"
SHM_DIR = "/dev/shm"
NETNS_DIR = "/run/netns"
SPARK_WORKER_MARKERS = (b"pyspark.daemon", b"pyspark.worker")
ZYGOTE_NAME = "sparkmpi-zygote"
RANK_NAME = "sparkmpi-rank"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int          # clock ticks since boot: (pid, start) names one process
    comm: str
    cmdline: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)

    def describe(self, table: dict) -> str:
        parent = table.get(self.ppid)
        parent_text = f"{self.ppid} ({parent.cmdline[:120] or parent.comm})" if parent else str(self.ppid)
        return f"process {self.pid} [{self.comm}] {self.cmdline[:200]!r}, parent {parent_text}"


@dataclass
class Allowances:
    """What session fixtures own; filled in by them as they start."""

    spark_jvms: set = field(default_factory=set)       # pids
    process_roots: set = field(default_factory=set)    # pids of fixture-owned processes (a browser): their
    #                                                    new descendants (renderers) are theirs
    tcp_peer_ports: set = field(default_factory=set)   # a socket connected to one of these is the session's
    tcp_local_ports: set = field(default_factory=set)  # a socket bound to one of these (accepted) is too
    unix_paths: set = field(default_factory=set)       # a Unix socket bound to (or accepted on) one of these
    thread_owners: list = field(default_factory=list)  # objects a session thread's target is bound to
    # Callables returning a process-wide object the project keeps on purpose (or None): its threads
    # and the sockets it holds directly as attributes are allowed.
    singletons: list = field(default_factory=list)
    kept_sockets: set = field(default_factory=set)     # inodes kept for the life of the process
    warm_pool: int | None = None


@dataclass
class Snapshot:
    procs: dict          # pid -> Proc (ours only)
    all_procs: dict      # pid -> Proc (every process: for parents' names)
    threads: dict        # ident -> Thread
    sockets: dict        # inode -> description
    shm: set
    netns: set


def _read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2:].split()
    if rest[0] in ("Z", "X"):
        return None   # exited; its parent reaps it
    return Proc(pid, int(rest[1]), int(rest[19]), comm, cmdline.replace(b"\0", b" ").decode(errors="replace").strip())


def _tagged(pid: int, tag: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return tag in fh.read().split(b"\0")
    except OSError:
        return False


def processes(root: int | None = None, tag: str | None = None) -> tuple[dict, dict]:
    """``(ours, every)``: live processes below ``root`` (default: this one) or tagged ``tag``."""
    root = os.getpid() if root is None else root
    every = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = _read_proc(int(entry))
            if proc is not None:
                every[proc.pid] = proc
    children: dict[int, list[int]] = {}
    for proc in every.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    ours, todo = set(), list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in ours:
            ours.add(pid)
            todo.extend(children.get(pid, []))
    if tag:
        marker = f"{TAG_VARIABLE}={tag}".encode()
        ours.update(pid for pid in every if pid != root and pid not in ours and _tagged(pid, marker))
    return {pid: every[pid] for pid in ours}, every


def _socket_table() -> dict[int, str]:
    """inode -> "tcp 127.0.0.1:5000 -> 127.0.0.1:6000" (or "unix PATH") for this machine's sockets."""
    table: dict[int, str] = {}
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{kind}") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, inode = parts[1], parts[2], int(parts[9])
            table[inode] = f"{kind} {_address(local)} -> {_address(remote)}"
    try:
        with open("/proc/net/netlink") as fh:
            for line in fh.read().splitlines()[1:]:
                parts = line.split()
                table[int(parts[-1])] = f"netlink protocol {parts[1]} (port {parts[2]})"
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/net/unix") as fh:
            for line in fh.read().splitlines()[1:]:
                parts = line.split()
                table[int(parts[6])] = "unix " + (parts[7] if len(parts) > 7 else "(unnamed)")
    except OSError:
        pass
    return table


def _address(text: str) -> str:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return f"{ip}:{int(port, 16)}"


def open_sockets() -> dict[int, str]:
    """inode -> description of every socket descriptor this process holds."""
    inodes = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes[int(target[8:-1])] = int(fd)
    table = _socket_table()
    return {inode: f"fd {fd}: {table.get(inode) or _unlisted(fd)}" for inode, fd in inodes.items()}


def _unlisted(fd: int) -> str:
    """A socket in no /proc/net table (created, not yet bound or connected): its family and type."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "socket (unlisted)"
    try:
        return f"socket ({dup.family.name}, {dup.type.name}, not bound or connected)"
    finally:
        dup.close()


def shm_files(shm_dir: str = SHM_DIR) -> set:
    try:
        return {name for name in os.listdir(shm_dir) if name.startswith("mpich_")}
    except OSError:
        return set()


def namespaces(netns_dir: str = NETNS_DIR) -> set:
    """Named network namespaces (what ``ip netns list`` lists)."""
    try:
        return set(os.listdir(netns_dir))
    except OSError:
        return set()


def snapshot(tag: str | None = None, shm_dir: str = SHM_DIR, netns_dir: str = NETNS_DIR) -> Snapshot:
    ours, every = processes(tag=tag)
    return Snapshot(ours, every, {t.ident: t for t in threading.enumerate()}, open_sockets(),
                    shm_files(shm_dir), namespaces(netns_dir))


def _mapped_by_anyone(path: str) -> bool:
    """True when a live process has ``path`` mapped or open (another job's segment, not a leak)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as fh:
                if path in fh.read():
                    return True
        except OSError:
            continue
    return False


def _port(text: str, side: int) -> int | None:
    try:
        return int(text.split()[1 + 2 * side].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def _spark_descendant(proc: Proc, table: dict, jvms: set) -> bool:
    seen = 0
    while proc is not None and seen < 64:
        if proc.ppid in jvms:
            return True
        proc, seen = table.get(proc.ppid), seen + 1
    return False


def _singletons(allow: Allowances) -> list:
    return [obj for get in allow.singletons if (obj := get()) is not None]


def _thread_running(thread: threading.Thread) -> bool:
    """Whether ``thread`` still runs.  A thread Python did not start (librdkafka's, calling a
    Python log callback) gets a dummy entry that stays after the thread ends and claims to be
    alive; its OS thread tells the truth."""
    if isinstance(thread, threading._DummyThread):
        return os.path.exists(f"/proc/self/task/{thread.native_id}")
    return thread.is_alive()


def _allowed_thread(thread: threading.Thread, allow: Allowances, singletons: list) -> bool:
    target = getattr(thread, "_target", None)
    owner = getattr(target, "__self__", None)
    args = getattr(thread, "_args", ())
    return any(o is owner or any(o is a for a in args) for o in allow.thread_owners + singletons if o is not None)


def _held_sockets(objects: list) -> set:
    """Inodes of the sockets ``objects`` hold directly as attributes."""
    inodes = set()
    for obj in objects:
        for value in vars(obj).values():
            if isinstance(value, socket.socket) and value.fileno() >= 0:
                try:
                    inodes.add(os.fstat(value.fileno()).st_ino)
                except OSError:
                    pass
    return inodes


def leaks(before: Snapshot, after: Snapshot, allow: Allowances | None = None, shm_dir: str = SHM_DIR) -> list[str]:
    """One line per thing in ``after`` that ``before`` did not have and that should not outlive a test."""
    allow = allow or Allowances()
    found: list[str] = []
    old = {p.key for p in before.procs.values()}
    table = after.all_procs
    ranks_per_worker: dict[int, list[Proc]] = {}
    for proc in sorted(after.procs.values(), key=lambda p: p.pid):
        if proc.key in old or (allow.process_roots and _spark_descendant(proc, table, allow.process_roots)):
            continue
        if allow.spark_jvms and _spark_descendant(proc, table, allow.spark_jvms):
            if proc.comm == RANK_NAME:
                ranks_per_worker.setdefault(proc.ppid, []).append(proc)
                continue
            if proc.comm == ZYGOTE_NAME or any(m in proc.cmdline.encode() for m in SPARK_WORKER_MARKERS):
                continue
        found.append(proc.describe(table))
    if ranks_per_worker:
        limit = allow.warm_pool if allow.warm_pool is not None else _warm_pool()
        for worker, ranks in ranks_per_worker.items():
            # Spares counted over all of the worker's rank children, old ones included.
            everyone = [p for p in after.procs.values() if p.ppid == worker and p.comm == RANK_NAME]
            if len(everyone) > limit:
                found.extend(f"{p.describe(table)} (worker {worker} has {len(everyone)} ranks, "
                             f"warm_pool allows {limit} spares)" for p in ranks)
    singletons = _singletons(allow)
    for ident, thread in after.threads.items():
        if ident not in before.threads and _thread_running(thread) and not _allowed_thread(thread, allow, singletons):
            found.append(f"thread {thread.name!r} (daemon={thread.daemon}, target="
                         f"{getattr(getattr(thread, '_target', None), '__qualname__', None)})")
    held = _held_sockets(singletons)
    for inode, text in after.sockets.items():
        if inode in before.sockets or inode in held or inode in allow.kept_sockets:
            continue
        if text.split(": ", 1)[-1].startswith("tcp"):
            described = text.split(": ", 1)[1]
            if _port(described, 1) in allow.tcp_peer_ports or _port(described, 0) in allow.tcp_local_ports:
                continue
        if text.split(": ", 1)[-1] in {f"unix {path}" for path in allow.unix_paths}:
            continue
        found.append(f"socket {text}")
    for name in sorted(after.shm - before.shm):
        path = os.path.join(shm_dir, name)
        if os.path.exists(path) and not _mapped_by_anyone(path):
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                continue    # removed while we looked (its job's cleanup came late): gone, no leak
            found.append(f"shared-memory file {path} ({size} bytes), mapped by no process")
    for name in sorted(after.netns - before.netns):
        found.append(f"network namespace {name!r}")
    return found


def _warm_pool() -> int:
    from sparkmpi.config import load_settings

    return int(load_settings().warm_pool)


def wait_for_no_leaks(before: Snapshot, allow: Allowances | None = None, *, tag: str | None = None,
                      timeout: float = 10.0, shm_dir: str = SHM_DIR, netns_dir: str = NETNS_DIR,
                      known=lambda line: False, settle=lambda: None) -> tuple[list[str], Snapshot]:
    """Poll until nothing leaks but what ``known(line)`` accepts, or ``timeout`` s pass;
    ``(leak lines, last snapshot)``.  ``settle()`` runs before each look (it closes what
    the project keeps open on purpose, which a thread still ending may have reopened)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        settle()
        after = snapshot(tag, shm_dir, netns_dir)
        found = leaks(before, after, allow, shm_dir)
        if all(known(line) for line in found) or time.monotonic() > deadline:
            return found, after
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def clean_up(before: Snapshot, after: Snapshot, allow: Allowances | None = None, shm_dir: str = SHM_DIR) -> None:
    """Kill the leaked processes and remove leaked shared-memory files, so one leak fails one test."""
    import signal

    allow = allow or Allowances()
    old = {p.key for p in before.procs.values()}
    for proc in after.procs.values():
        if proc.key in old or _spark_descendant(proc, after.all_procs, allow.spark_jvms | allow.process_roots):
            continue
        current = _read_proc(proc.pid)
        if current is not None and current.key == proc.key:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for name in after.shm - before.shm:
        path = os.path.join(shm_dir, name)
        if not _mapped_by_anyone(path):
            try:
                os.unlink(path)
            except OSError:
                pass


# ---------------------------------------------------------------- the pytest fixture

#: Every process this session starts inherits the tag, so the check finds daemons re-parented to init.
LEAK_TAG = os.environ.setdefault(TAG_VARIABLE, f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
def _pmi_server():
    """The driver's shared PMI server (``sparkmpi.run`` keeps one per process for later jobs)."""
    job = sys.modules.get("sparkmpi.launch.job")
    return getattr(job, "_server", None)


#: What the session fixtures own, and what the project keeps per process on purpose; the check allows it.
ALLOWANCES = Allowances(singletons=[_pmi_server])
#: Seconds a test's leftovers get to go away (processes take a moment to be reaped).
DEADLINE_S = float(os.environ.get("PYTEST_SPARKMPI_LEAK_DEADLINE", "10"))


def allow_spark(sc) -> None:
    """Record what the session's SparkContext owns: its JVM, Py4J connections, accumulator server."""
    gateway = sc._gateway
    ALLOWANCES.spark_jvms.add(gateway.proc.pid)
    ALLOWANCES.tcp_peer_ports.add(gateway.gateway_parameters.port)
    server = getattr(sc, "_accumulatorServer", None)
    if server is not None:
        ALLOWANCES.thread_owners.append(server)
        address = server.server_address
        if isinstance(address, tuple):
            ALLOWANCES.tcp_local_ports.add(address[1])
        else:
            ALLOWANCES.unix_paths.add(address)


def _close_caches() -> None:
    """Close what the project keeps open across calls on purpose (idle Kafka readers), so only
    what a test forgot is left to find."""
    offsets = sys.modules.get("sparkmpi.stream.offsets")
    if offsets is not None:
        offsets._ReaderPool.close_all()


def librdkafka_clients() -> int:
    """Live librdkafka client instances in this process (each has one 'rdk:main' thread)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as fh:
                count += fh.read().strip() == "rdk:main"
        except OSError:
            continue
    return count


def _socket_hints(before: Snapshot, found: list[str]) -> list[str]:
    """For a failure that names sockets: who may hold them (asked after the verdict, so the
    garbage collection here changes nothing about it)."""
    import gc

    if not any(line.startswith("socket ") for line in found):
        return []
    clients = librdkafka_clients()
    gc.collect()
    time.sleep(0.2)
    still = leaks(before, snapshot(LEAK_TAG), ALLOWANCES)
    gone = [line for line in found if line.startswith("socket ") and line not in still]
    hints = [f"(hint: {clients} librdkafka client(s) alive)"] if clients else []
    if gone:
        hints.append(f"(hint: gc.collect() freed {len(gone)} of those sockets: their owner was only held by a "
                     f"reference cycle, a traceback kept with the frame that made the client, say)")
    return hints


def _mpi_initialised() -> bool:
    mpi = sys.modules.get("mpi4py.MPI")
    try:
        return bool(mpi is not None and mpi.Is_initialized())
    except Exception:  # noqa: BLE001  (a broken MPI is not this check's business)
        return False


def _fixture():
    import pytest

    @pytest.fixture(autouse=True)
    def _no_leaks(request):
        """Fail the test if it leaves processes, threads, sockets, MPICH shared memory or namespaces behind.

        ``@pytest.mark.known_leak(pattern, reason)`` lets leftovers whose line matches the regular
        expression ``pattern`` pass, with a warning naming them (a bug found and not fixed yet)."""
        import re
        import warnings

        before = snapshot(LEAK_TAG)
        mpi_before = _mpi_initialised()
        yield
        _close_caches()
        if not mpi_before and _mpi_initialised():
            # The test initialised MPI in this process (mpi4py's import does): MPICH's netmod sockets
            # stay open until the process exits, so they are no leak, now or in a later test.
            ALLOWANCES.kept_sockets.update(set(open_sockets()) - set(before.sockets))
        patterns = [mark.args[0] for mark in request.node.iter_markers("known_leak")]
        found, after = wait_for_no_leaks(before, ALLOWANCES, tag=LEAK_TAG, timeout=DEADLINE_S,
                                         known=lambda line: any(re.search(p, line) for p in patterns),
                                         settle=_close_caches)
        for mark in request.node.iter_markers("known_leak"):
            known = [line for line in found if re.search(mark.args[0], line)]
            if known:
                warnings.warn(f"known leak ({mark.args[1]}): " + "; ".join(known), stacklevel=1)
                found = [line for line in found if line not in known]
        if found:
            hints = _socket_hints(before, found)
            clean_up(before, after, ALLOWANCES)
            pytest.fail(f"the test left behind (after {DEADLINE_S:g} s):\n  " + "\n  ".join(found + hints),
                        pytrace=False)

    return _no_leaks


_no_leaks = _fixture()
