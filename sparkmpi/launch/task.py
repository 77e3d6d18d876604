"""The executor side of a world: one Spark barrier task per rank.

Each task takes a rank process (:mod:`.pool`), connects to the driver's PMI
server and to the driver's world endpoint with the job's token, hands the
rank a private PMI socket (``PMI_FD``, so the rank opens no port), and then
relays until the world closes: PMI lines between the rank and the server,
calls from the driver to the rank, results and the rank's stdout/stderr
back.  What to do with each thing that arrives is decided by
:class:`~.relay.RelayState`; this module only moves bytes.  Whatever
happens, the rank process is reaped and the job's shared-memory files are
removed before the task returns.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

from ..config import Settings
from ..pmi import control
from . import channel, interfaces, pool, relay, shm
from .relay_adapter import (CONNECT_TIMEOUT, STDERR_TAIL, RankError, RelayAdapter, barrier_rank,
                            connect_with_retry, send_quietly)

__all__ = ["TaskSpec", "RankError", "connect_with_retry", "run_rank_task", "deliver_partition", "CONNECT_TIMEOUT",
           "STDERR_TAIL", "PARTITION_KEY", "NETMOD_VARIABLE", "rank_environment"]

#: The key under which a task's own partition reaches its rank (``run``).
PARTITION_KEY = "partition"


@dataclass(frozen=True)
class TaskSpec:
    """What every task of one world needs; pickled into the Spark closure."""

    server_host: str
    server_port: int
    kvsname: str
    token: str
    size: int
    world_host: str
    world_port: int
    settings: Settings = field(default_factory=Settings)
    env: dict = field(default_factory=dict)
    preload: tuple = ()
    #: Send the task's partition to the rank (``run``); else the records are ignored.
    deliver_partition: bool = False


class _Delivery:
    """A map_partitions delivery being read by the relay: its connection and how far it got."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.reader = channel.FrameReader()
        self.greeted = False


class _Relay(RelayAdapter):
    """The socket adapter around :class:`~.relay.RelayState` for one rank."""

    def __init__(self, spec: TaskSpec, rank: int, proc: pool.RankProcess):
        super().__init__((spec.server_host, spec.server_port), rank, spec.settings.kill_grace)
        self.spec, self.proc = spec, proc
        self.state = relay.RelayState(spec.kvsname, rank, self.where)
        self.stderr_tail = bytearray()
        self.stdout_fd = -1
        self.driver = self.inbox = None
        self.rank_env: dict = {}
        #: map_partitions deliveries coming in (read between the relay's other work).
        self.deliveries: set = set()

    # -- setup -------------------------------------------------------------
    def connect(self, inbox_host: str) -> None:
        """Connect to the PMI server and the world endpoint; open the inbox
        on ``inbox_host`` where Spark tasks deliver partitions (map_partitions)."""
        spec = self.spec
        self.hello(spec.kvsname, spec.token)
        self.driver = connect_with_retry(spec.world_host, spec.world_port, what="world endpoint")
        self.driver.settimeout(None)
        self.inbox = socket.create_server((inbox_host, 0))
        channel.send_message(self.driver, channel.HELLO,
                             {"job": spec.kvsname, "token": spec.token, "rank": self.rank,
                              "host": socket.gethostname(), "pid": os.getpid(),
                              "inbox": (inbox_host, self.inbox.getsockname()[1])})

    def start_rank(self, env: dict, records: list | None) -> None:
        """Send the rank its JOB (with the task's partition for ``run``, read
        before MPI starts: a large partition sent later would block this
        relay while its rank waits in ``MPI_Init`` for PMI answers)."""
        pmi_ours, pmi_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.pmi = pmi_ours
        self.rank_env = dict(env)
        inputs = {} if records is None else {PARTITION_KEY: records}
        job = {"rank": self.rank, "size": self.spec.size, "env": env, "inputs": inputs}
        try:
            channel.send_message(self.proc.ctrl, channel.JOB, job, fds=(pmi_theirs.fileno(),))
        finally:
            pmi_theirs.close()

    # -- relay loop ----------------------------------------------------------
    def run(self) -> None:
        """Relay until the world closes (returns) or fails (raises RankError)."""
        super().run([(self.driver, "driver"), (self.proc.ctrl, "rank-ctrl"),
                     (self.proc.popen.stderr, "rank-stderr"), (self.proc.pidfd, "rank-exit"),
                     (self.inbox, "inbox")])

    def _readable_own(self, what: str) -> None:
        handle = self.state.handle
        if what == "driver":
            try:
                kind, segments, fds = channel.recv_frame(self.driver)
            except (channel.ChannelClosed, ConnectionError):
                self.execute(handle(relay.DriverClosed()))
                return
            if kind == channel.PING:
                self.answer_ping()
                return
            self.execute(handle(relay.DriverFrame(kind, segments)))
        elif what == "inbox":
            self._receive_partition()
        elif isinstance(what, _Delivery):
            self._delivery_readable(what)
        elif what in ("rank-stderr", "rank-stdout"):
            self._forward_output(2 if what == "rank-stderr" else 1)
        elif what == "rank-ctrl":
            self._from_rank_ctrl()
        elif what == "rank-exit":
            self.forward_rank_pmi()
            self._forward_output(1)
            self._forward_output(2)
            # A last message (its error, say) may still be queued on the control socket.
            while not self.state.finished and _readable_within(self.proc.ctrl, 0.2):
                self._from_rank_ctrl()
            if not self.state.finished:
                status = self.proc.popen.wait()
                tail = self.stderr_tail.decode("utf-8", "replace").strip()
                self.execute(handle(relay.RankExited(status, tail)))

    def _receive_partition(self) -> None:
        """A delivery to the inbox connects: read it piecewise from this loop (:meth:`_delivery_readable`),
        so that a long one leaves the relay answering the driver's pings meanwhile."""
        conn, _ = self.inbox.accept()
        conn.setblocking(False)
        delivery = _Delivery(conn)
        self.deliveries.add(delivery)
        self.sel.register(conn, selectors.EVENT_READ, delivery)

    def _delivery_readable(self, delivery: "_Delivery") -> None:
        """HELLO with the token, then the DATA frame, which goes to the rank; anything else ends it."""
        try:
            count = delivery.conn.recv_into(delivery.reader.buffer())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            count = 0
        try:
            frame = delivery.reader.advance(count) if count else None
        except ValueError:
            frame, count = None, 0
        if not count:
            self._end_delivery(delivery)
            return
        if frame is None:
            return
        kind, segments = frame
        if not delivery.greeted:
            try:
                hello = channel.decode(segments) if kind == channel.HELLO else None
            except Exception:  # noqa: BLE001  (a stranger's bytes)
                hello = None
            if (not isinstance(hello, dict) or hello.get("token") != self.spec.token
                    or hello.get("rank") != self.rank):
                self._end_delivery(delivery)   # not one of this world's deliveries: the sender fails
                return
            delivery.greeted = True
            self.execute(self.state.handle(relay.DeliveryGreeted()))
            return
        if kind == channel.DATA:
            self.execute(self.state.handle(relay.PartitionDelivered(segments)))
            delivery.conn.setblocking(True)
            delivery.conn.settimeout(CONNECT_TIMEOUT)
            send_quietly(lambda: channel.send_message(delivery.conn, channel.RESULT, self.rank))
        self._end_delivery(delivery)

    def _end_delivery(self, delivery: "_Delivery") -> None:
        self.deliveries.discard(delivery)
        try:
            self.sel.unregister(delivery.conn)
        except (KeyError, ValueError):
            pass
        delivery.conn.close()

    def _from_rank_ctrl(self) -> None:
        # The rank wrote its PMI lines before this frame (an MPI_Abort before a
        # result, say): they are handled first.
        self.forward_rank_pmi()
        if self.state.finished:
            return
        try:
            kind, segments, fds = channel.recv_frame(self.proc.ctrl)
        except (channel.ChannelClosed, ConnectionError):
            status = self.proc.popen.wait()
            self._forward_output(2)
            tail = self.stderr_tail.decode("utf-8", "replace").strip()
            self.execute(self.state.handle(relay.RankExited(status, tail)))
            return
        if kind == channel.STARTED and fds:
            self.stdout_fd = fds.pop(0)
            os.set_blocking(self.stdout_fd, False)
            self.sel.register(self.stdout_fd, selectors.EVENT_READ, "rank-stdout")
        for fd in fds:
            os.close(fd)
        if kind in (channel.RESULT, channel.CLOSED):
            # The rank flushed before answering: its output goes first.
            self._forward_output(1)
            self._forward_output(2)
        payload = channel.decode(segments) if kind in (channel.ERROR, channel.STARTED) else None
        self.execute(self.state.handle(relay.RankFrame(kind, segments, payload)))

    def _forward_output(self, stream: int) -> None:
        data = self._read_available(stream)
        if data and not self.state.finished:
            self.execute(self.state.handle(relay.RankOutput(stream, data)))

    def _read_available(self, stream: int) -> bytes:
        """What the rank wrote to ``stream`` so far (stderr's tail is kept for messages)."""
        fd = self.proc.popen.stderr.fileno() if stream == 2 else self.stdout_fd
        if fd < 0:
            return b""
        read = bytearray()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            read += chunk
        if stream == 2:
            self.stderr_tail += read
            del self.stderr_tail[:-STDERR_TAIL]
        return bytes(read)

    # -- actions ---------------------------------------------------------------
    def _execute_own(self, action) -> bool:
        if isinstance(action, relay.ToRank):
            send_quietly(lambda: channel.send_frame(self.proc.ctrl, action.kind, action.segments))
        elif isinstance(action, relay.ToDriver):
            send_quietly(lambda: channel.send_frame(self.driver, action.kind, action.segments))
        elif isinstance(action, relay.DumpStacks):
            self._report_stacks()
        elif isinstance(action, relay.StopRank):
            self.proc.stop(self.spec.settings.kill_grace)
        elif isinstance(action, relay.Fail):
            raise RankError(action.cause)
        elif isinstance(action, relay.Finish):
            return False
        return True

    def _children_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKMPI_")}
        env.update({"PYTHONPATH": pool._child_pythonpath(), **self.rank_env})
        return env

    def _report_stacks(self) -> None:
        """Ask the rank for its threads' stacks (faulthandler on SIGUSR1) and report them."""
        if not self.proc.alive():
            return
        self.proc.popen.send_signal(signal.SIGUSR1)
        stacks = bytearray()
        deadline = time.monotonic() + 1.0
        quiet_since = time.monotonic()
        # Read until the dump has been quiet for 0.2 s (or 1 s in all).
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 0.2:
            chunk = self._read_available(2)
            if chunk:
                stacks += chunk
                quiet_since = time.monotonic()
            time.sleep(0.02)
        text = stacks.decode("utf-8", "replace").strip() or "(no stack received)"
        send_quietly(self.server.sendall, control.text_line(control.FAILED, text[-8000:]))

    def close(self) -> None:
        super().close()
        for delivery in list(self.deliveries):
            delivery.conn.close()
        self.deliveries.clear()
        for sock in (self.driver, self.inbox):
            if sock is not None:
                sock.close()
        if self.stdout_fd >= 0:
            os.close(self.stdout_fd)
            self.stdout_fd = -1


def _readable_within(sock: socket.socket, timeout: float) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(timeout=timeout))


NETMOD_VARIABLE = "MPIR_CVAR_CH4_NETMOD"


def rank_environment(spec: TaskSpec, task_hosts, environ=None) -> dict:
    """The environment additions for this world's rank: the world's ``env``, plus
    ``MPIR_CVAR_CH4_NETMOD=<single_host_netmod setting>`` when every task of the
    stage (``task_hosts``) is on one host and nobody chose a netmod already."""
    env = dict(spec.env)
    environ = os.environ if environ is None else environ
    netmod = spec.settings.single_host_netmod
    if (netmod and len(set(task_hosts)) == 1
            and NETMOD_VARIABLE not in env and NETMOD_VARIABLE not in environ):
        env[NETMOD_VARIABLE] = netmod
    env.update(interfaces.interface_environment(spec.settings.network_interface, env, environ))
    return env


def check_network_interface(spec: TaskSpec, task_relay: "_Relay") -> None:
    """Fail this rank (and so the job) before MPI starts when its host lacks ``network_interface``."""
    problem = interfaces.missing_interface(spec.settings.network_interface,
                                           [name for _, name in socket.if_nameindex()], socket.gethostname())
    if problem is not None:
        send_quietly(task_relay.server.sendall, control.text_line(control.FAILED, problem))
        raise RankError(problem)


def _task_hosts(context) -> list:
    """Host of every task in the barrier stage (``host:port`` addresses, port dropped)."""
    return [info.address.rsplit(":", 1)[0] for info in context.getTaskInfos()]


def run_rank_task(spec: TaskSpec, iterator):
    """Body of one barrier task: serve rank = partition index until its world closes."""
    context, rank, records = barrier_rank(spec.size, iterator, spec.deliver_partition, "world")
    settings = spec.settings
    spares = pool.worker_pool()
    proc = spares.acquire(settings.fork_server, spec.preload)
    task_relay = _Relay(spec, rank, proc)
    try:
        hosts = _task_hosts(context)
        task_relay.connect(hosts[rank])
        check_network_interface(spec, task_relay)
        task_relay.start_rank(rank_environment(spec, hosts), records)
        del records
        task_relay.run()
        # The rank finalised and is exiting; reap it.
        try:
            proc.popen.wait(timeout=10)
        except Exception:
            pass
    finally:
        task_relay.close()
        proc.stop(settings.kill_grace)
        spares.end_rank_group(proc.pid)
        shm.remove_job_segments(spec.kvsname)
        spares.replenish_soon(settings.warm_pool, settings.fork_server, preload=spec.preload)
    return iter(())


def deliver_partition(index: int, iterator, *, inboxes: list, token: str, key: str):
    """Spark task body of ``World.map_partitions``: send partition ``index`` to its rank's inbox.

    The greeting goes first, before the partition is computed: the driver then knows this
    task has its slot, however long the computation takes."""
    host, port = inboxes[index]
    with connect_with_retry(host, port, what=f"inbox of rank {index}") as sock:
        sock.settimeout(None)
        channel.send_message(sock, channel.HELLO, {"token": token, "rank": index})
        records = list(iterator)
        channel.send_message(sock, channel.DATA, {"key": key, "records": records})
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            kind, _, _ = channel.recv_message(sock)
        except (OSError, EOFError) as exc:
            raise RankError(f"rank {index}'s relay at {host}:{port} did not take partition {index}: {exc}") from exc
    return [len(records)]
