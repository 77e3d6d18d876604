"""How a world's calls travel on the driver: its endpoint, the ranks' output, the call loop.

:class:`WorldCore` is one world's key space on the driver's PMI server plus
the endpoint its relays connect back to (a TCP listener).  Calls go out on
those connections as :mod:`.channel` frames; results, stdout and stderr come
back on them.  Failures are the PMI server's to notice (a rank's error,
exit, lost relay, ``MPI_Abort``): its job handle's ``failed`` event ends
the wait in progress, with the cause it recorded.  Who runs the Spark stage
(a thread of :class:`~.world.World`, or the caller of
:func:`~.world.run`) is the owner's business.
"""

from __future__ import annotations

import itertools
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

from ..config import Settings
from ..errors import InvalidArgument, JobFailed, JobTimeout
from . import channel, heartbeat
from .echo import LineEcho
from .job import get_server, resolve_host
from .task import TaskSpec, run_rank_task

#: Seconds a failure waits for the PMI server to record its cause.
FAILURE_GRACE_S = 5.0
_POLL_S = 0.05


class Endpoint:
    """The world's side of its relays' connections: rank -> socket."""

    def __init__(self, host: str, size: int, kvsname: str, token: str):
        self.listener = socket.create_server((host, 0), backlog=max(16, size))
        self.port = self.listener.getsockname()[1]
        self.size, self.kvsname, self.token = size, kvsname, token
        self.conns: dict[int, socket.socket] = {}
        self.hosts: dict[int, str] = {}
        #: Where each rank's relay takes partitions from Spark tasks: ``(host, port)``.
        self.inboxes: dict[int, tuple] = {}
        self.started: set[int] = set()
        self.closed: set[int] = set()

    def accept(self) -> None:
        accepted = channel.accept_relay(self.listener, self.kvsname, self.token, self.size, self.conns, self.hosts)
        if accepted is not None:
            rank, hello = accepted
            self.inboxes[rank] = tuple(hello.get("inbox") or ())

    def close(self) -> None:
        for sock in self.conns.values():
            sock.close()
        self.conns.clear()
        self.listener.close()


class WorldCore:
    """One world's key space, endpoint and calls; the stage itself is run by the owner."""

    def __init__(self, sc, size: int, settings: Settings, env: dict | None, preload: tuple,
                 deliver_partition: bool):
        self.sc, self.size, self.settings = sc, size, settings
        host = resolve_host(settings, sc)
        server = get_server(host, settings.pmi_port)
        self.job = server.open_job(size)
        self.kvsname = self.job.kvsname
        self.endpoint = Endpoint(host, size, self.kvsname, self.job.token)
        self.spec = TaskSpec(server_host=host, server_port=server.port, kvsname=self.kvsname,
                             token=self.job.token, size=size, world_host=host, world_port=self.endpoint.port,
                             settings=settings, env=dict(env or {}), preload=preload,
                             deliver_partition=deliver_partition)
        self.tag = f"sparkmpi-{self.kvsname}"
        #: Called with the rank while a map_partitions delivery greets its relay (watch_relays).
        self._on_delivering: Callable[[int], None] | None = None
        self.stage_done = threading.Event()
        self.stage_error: BaseException | None = None
        self.output = LineEcho(prefix_rank=True)
        self.calls = itertools.count(1)
        self.closed_reason: str | None = None
        self.teardown_done = False
        #: Ranks whose host went silent (the heartbeat found them): teardown does not wait for them.
        self.silent_ranks: set[int] = set()

    # -- the stage -------------------------------------------------------------
    def task(self):
        spec = self.spec

        def rank_task(iterator):
            return run_rank_task(spec, iterator)

        return rank_task

    def run_stage(self, rdd) -> None:
        """Run the barrier stage in this thread until every task returns."""
        sc = self.sc
        previous_interrupt = sc.getLocalProperty("spark.job.interruptOnCancel")
        sc.addJobTag(self.tag)
        sc.setInterruptOnCancel(True)
        try:
            rdd.barrier().mapPartitions(self.task()).collect()
        except BaseException as exc:  # noqa: BLE001  (reported by whoever waits on the world)
            self.stage_error = exc
        finally:
            sc.removeJobTag(self.tag)
            sc.setLocalProperty("spark.job.interruptOnCancel", previous_interrupt)
            self.stage_done.set()

    # -- waiting ---------------------------------------------------------------
    def _wait(self, want: Callable[[], bool], deadline: float | None, on_frame, what: str,
              timeout_reason: Callable[[], str], outgoing: dict[int, deque] | None = None) -> None:
        """Read frames until ``want()``; raise on a failure, a lost relay or the deadline.

        ``outgoing`` (rank -> buffers to write) is sent meanwhile, as the relays
        take it: a rank that prints while a large call is on its way keeps
        its relay writing to us, and a blocking send would then wait on a
        relay that waits on us.
        """
        endpoint = self.endpoint
        watch = heartbeat.ContactWatch(self.settings.host_timeout)
        outgoing = {rank: queue for rank, queue in (outgoing or {}).items() if queue}
        for rank in list(outgoing):
            if self._send_some(rank, outgoing[rank], what, watch):
                del outgoing[rank]
        with selectors.DefaultSelector() as sel:
            sel.register(endpoint.listener, selectors.EVENT_READ, None)
            registered: dict[int, int] = {}
            while outgoing or not want():
                for rank, sock in endpoint.conns.items():
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if rank in outgoing else 0)
                    if registered.get(rank) not in (events, -1):
                        if rank in registered:
                            sel.modify(sock, events, rank)
                        else:
                            sel.register(sock, events, rank)
                        registered[rank] = events
                if self.job.failed.is_set():
                    self._raise_failure(what)
                if self.stage_done.is_set() and self.stage_error is not None:
                    self._raise_failure(what, lost="the Spark stage ended")
                if deadline is not None and time.monotonic() > deadline:
                    self.job.abort(timeout_reason(), dump_stacks=True)
                    self._raise_failure(what, timed_out=True)
                for key, mask in sel.select(timeout=_POLL_S):
                    if key.data is None:
                        endpoint.accept()
                        continue
                    rank = key.data
                    if mask & selectors.EVENT_WRITE and rank in outgoing:
                        if self._send_some(rank, outgoing[rank], what, watch):
                            del outgoing[rank]
                    if not mask & selectors.EVENT_READ:
                        continue
                    try:
                        kind, segments, _ = channel.recv_frame(endpoint.conns[rank])
                    except (OSError, EOFError, ValueError):
                        sel.unregister(key.fileobj)
                        registered[rank] = -1   # never registered again
                        if rank in endpoint.closed:
                            continue  # its relay is done after CLOSED
                        self._raise_failure(what, lost=f"lost the relay of rank {rank} "
                                                       f"(on {endpoint.hosts.get(rank, '?')})")
                    watch.contact(rank, time.monotonic())
                    if kind == channel.PONG:
                        continue
                    if kind == channel.DELIVERING:   # may also arrive after its delivery ended
                        if self._on_delivering is not None:
                            self._on_delivering(rank)
                        continue
                    if kind == channel.OUTPUT:
                        message = channel.decode(segments)
                        self.output.write(rank, message["stream"], message["data"])
                    else:
                        on_frame(rank, kind, segments)
                # After the frames that were waiting are read: a driver that was
                # not scheduled for a while must not take its own pause for silence.
                self._heartbeat(watch, {r for r, e in registered.items() if e != -1}, what, busy=outgoing)
        if self.job.failed.is_set():
            self._raise_failure(what)  # every rank answered, but the job failed meanwhile (an MPI_Abort)

    def _send_some(self, rank: int, queue: deque, what: str, watch: heartbeat.ContactWatch) -> bool:
        """Write what the relay of ``rank`` takes now, without blocking; True once ``queue`` is sent.

        A relay that takes bytes is in contact (``watch``), even before it answers.
        """
        sock = self.endpoint.conns[rank]
        while queue:
            try:
                sent = sock.send(queue[0], socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                self._raise_failure(what, lost=f"lost the relay of rank {rank} "
                                               f"(on {self.endpoint.hosts.get(rank, '?')})")
            if sent:
                watch.contact(rank, time.monotonic())
            if sent == queue[0].nbytes:
                queue.popleft()
            else:
                queue[0] = queue[0][sent:]
        return True

    def _heartbeat(self, watch: heartbeat.ContactWatch, connected: set, what: str, busy=()) -> None:
        """Ping the connected relays that are due; fail the job when one has been silent too long.

        Ranks in ``busy`` have a call half written to them: a ping there would
        cut into it (the bytes they take count as contact instead).
        """
        endpoint = self.endpoint
        pings, lost = watch.beat(time.monotonic(), connected - endpoint.closed, busy)
        channel.send_pings(endpoint.conns, pings)
        if lost:
            rank, silent = lost[0]
            self.silent_ranks.update(r for r, _ in lost)
            cause = heartbeat.lost_message(rank, endpoint.hosts.get(rank, "?"), silent, watch.timeout)
            self.job.abort(cause, rank=rank)
            self._raise_failure(what)

    def watch_relays(self, until: Callable[[], bool], what: str,
                     on_delivering: Callable[[int], None] | None = None) -> None:
        """Read the relays until ``until()`` while Spark work beside the world runs (a
        map_partitions delivery): their output is kept and the heartbeat goes on, so a host
        that goes silent meanwhile fails the world within ``host_timeout``.
        ``on_delivering(rank)``: a delivery's task greeted that rank's relay."""
        def on_frame(rank, kind, segments):
            raise self._protocol_error(rank, kind, what)

        self._on_delivering = on_delivering
        try:
            self._wait(until, None, on_frame, what, lambda: f"{what} timed out")
        finally:
            self._on_delivering = None

    def wait_started(self, deadline: float | None) -> None:
        endpoint = self.endpoint

        def on_frame(rank, kind, segments):
            if kind != channel.STARTED:
                raise self._protocol_error(rank, kind, "starting")
            endpoint.started.add(rank)

        start_deadline = time.monotonic() + self.settings.start_timeout
        self._wait(lambda: len(endpoint.started) == self.size,
                   start_deadline if deadline is None else min(deadline, start_deadline), on_frame, "start",
                   lambda: (f"not every rank connected within {self.settings.start_timeout:g} s "
                            f"(is the cluster short of free task slots?); {self.job.status()}"))

    def _protocol_error(self, rank: int, kind: int, phase: str) -> JobFailed:
        cause = f"rank {rank} sent {channel.KIND_NAMES.get(kind, kind)} while {phase}"
        self.job.abort(cause)
        return JobFailed(f"MPI world {self.kvsname}: {cause}", job_id=self.kvsname, rank=rank, cause=cause)

    # -- calls -----------------------------------------------------------------
    def encode_call(self, fn_bytes: bytes, per_rank_args: list | None, args: tuple, kwargs: dict
                    ) -> tuple[int, list]:
        """The call's id and its frame for each rank (arguments pickled once when shared)."""
        call_id = next(self.calls)
        try:
            if per_rank_args is None:
                shared = channel.encode({"id": call_id, "fn": fn_bytes, "args": list(args), "kwargs": kwargs})
                return call_id, [shared] * self.size
            return call_id, [channel.encode({"id": call_id, "fn": fn_bytes, "args": [*args, extra],
                                             "kwargs": kwargs}) for extra in per_rank_args]
        except Exception as exc:  # noqa: BLE001  (nothing was sent: the world stays open)
            raise InvalidArgument(f"the call's arguments cannot be pickled: {type(exc).__name__}: {exc}") from exc

    def call(self, call_id: int, frames: list, deadline: float | None, timeout: float | None) -> list:
        """Send ``frames`` (from :meth:`encode_call`) and wait for every rank's result."""
        what = f"call {call_id}"
        outgoing = {rank: deque(channel.frame_pieces(channel.CALL, frames[rank])) for rank in range(self.size)}
        results: dict[int, Any] = {}

        def on_frame(rank, kind, segments):
            if kind != channel.RESULT:
                raise self._protocol_error(rank, kind, what)
            self.output.flush(rank)
            results[rank] = channel.decode(segments)["value"]

        self._wait(lambda: len(results) == self.size, deadline, on_frame, what,
                   lambda: f"{what} timed out after {timeout:g} s; {self._waiting_for(results)}", outgoing)
        return [results[r] for r in range(self.size)]

    def _waiting_for(self, results: dict) -> str:
        missing = [r for r in range(self.size) if r not in results]
        return "no result yet from " + ", ".join(self.job.where(r) for r in missing)

    # -- ending ----------------------------------------------------------------
    def _raise_failure(self, what: str, timed_out: bool = False, lost: str | None = None):
        job = self.job
        if not job.failed.wait(FAILURE_GRACE_S if lost else 0) and lost:
            job.abort(lost)
        self.teardown(job.failure.cause if job.failure else lost or "failed")
        failure = job.failure
        cls = JobTimeout if timed_out else JobFailed
        message = f"MPI world {self.kvsname} failed ({what}): {failure.cause}"
        if timed_out and job.reports:
            message += "\n\nStacks of the ranks when they were stopped:\n" + "\n".join(
                f"--- {job.where(r)} ---\n{text}" for r, text in sorted(job.reports.items()))
        raise cls(message, job_id=self.kvsname, rank=failure.rank,
                  partition=job.partitions.get(failure.rank) if failure.rank is not None else None,
                  cause=failure.cause)

    def close(self, reason: str) -> None:
        """Finalise MPI on every rank and end the stage; a failure on the way raises."""
        if self.teardown_done:
            return
        endpoint = self.endpoint
        closed = endpoint.closed
        for rank in range(self.size):
            try:
                channel.send_frame(endpoint.conns[rank], channel.CLOSE, channel.encode(None))
            except (OSError, KeyError):
                self._raise_failure("close", lost=f"lost the relay of rank {rank}")

        def on_frame(rank, kind, segments):
            if kind != channel.CLOSED:
                raise self._protocol_error(rank, kind, "closing")
            self.output.flush(rank)
            closed.add(rank)

        grace = self.settings.kill_grace + 30.0
        self._wait(lambda: len(closed) == self.size, time.monotonic() + grace, on_frame, "close",
                   lambda: f"the ranks did not finalise MPI within {grace:g} s")
        self.teardown(reason, graceful=True)

    def teardown(self, reason: str, graceful: bool = False) -> None:
        """Stop everything that is left (relays, the stage) and forget the key space."""
        if self.teardown_done:
            return
        self.teardown_done = True
        self.closed_reason = (reason.strip().splitlines() or ["closed"])[0]
        job, settings = self.job, self.settings
        if not graceful:
            if not job.failed.is_set():
                job.abort(reason)
            # The relays got the abort: let them stop their ranks and report
            # before Spark kills the tasks, then cancel (no stage retries).
            job.wait_relays_gone(settings.kill_grace + 3.0, ignore=self.silent_ranks)
            if not self.stage_done.is_set():
                self.sc.cancelJobsWithTag(self.tag)
        self.endpoint.close()
        self.stage_done.wait(settings.kill_grace + 10.0)
        job.close()
