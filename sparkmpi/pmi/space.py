"""The key-value space and barrier of one MPI job, as a state object with no I/O.

:class:`JobSpace` takes parsed PMI commands from ranks and returns the replies
to send, as ``(rank, line)`` pairs.  The server that owns the sockets is a
thin loop around it (see :mod:`sparkmpi.pmi.server`), so every rule here is
tested without a network.

Rules worth knowing:

* ``PMI_process_mapping`` tells MPICH which ranks share a node (and so shared
  memory).  It is computed from the host each rank's relay registered with,
  so a ``get`` of it waits until every rank has registered.
* A barrier completes when all ``size`` ranks have entered it; each then
  gets ``barrier_out``.
* A relay is admitted once per rank, only while the job is open and has not
  failed; the server checks its token first, since that needs the handle.
* The first failure (an ``abort`` from a rank, a relay's failure report, a
  protocol error, a relay lost before it reported done, the driver's abort)
  wins and is kept as :attr:`JobSpace.failure`; it sends an abort line to
  every rank whose relay is still connected.  Later PMI commands are ignored
  and later failure reports are kept in :attr:`JobSpace.reports`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from ..errors import InvalidArgument, PMIProtocolError
from . import control
from .wire import Command, format_command

KVSNAME_MAX = 256
KEYLEN_MAX = 64
VALLEN_MAX = 1024
PROCESS_MAPPING_KEY = "PMI_process_mapping"

Outgoing = tuple[int, bytes]

#: Every PMI-1 query MPICH's client sends, and the reply name it waits for
#: (MPICH's src/pmi/maint/pmi-1.1.txt).  A query without a handler here gets
#: that reply with rc=-1 and a message, so the one MPI call fails in its rank.
REPLY_NAMES = {"init": "response_to_init", "initack": "initack", "fullinit": "fullinit-response",
               "get_maxes": "maxes", "get_universe_size": "universe_size", "get_appnum": "appnum",
               "get_my_kvsname": "my_kvsname", "put": "put_result", "get": "get_result",
               "barrier_in": "barrier_out", "finalize": "finalize_ack", "publish_name": "publish_result",
               "unpublish_name": "unpublish_result", "lookup_name": "lookup_result", "spawn": "spawn_result",
               "singinit": "singinit_info"}
#: Reply name for a query MPICH does not define either.
UNKNOWN_REPLY = "error"
#: Longest service name and port name accepted by the name service (MPI_MAX_PORT_NAME is 256).
SERVICE_MAX = 256
PORT_MAX = 1024


def new_kvsname() -> str:
    """A fresh random key-space name.

    MPICH derives its shared-memory segment names from the kvsname, so a
    reused name could pick up a segment left by a crashed job.
    """
    return f"sparkmpi_{secrets.token_hex(8)}"


def process_mapping(hosts: list[str]) -> str:
    """MPICH's ``PMI_process_mapping`` value for ranks placed on ``hosts``.

    ``hosts[r]`` is the host of rank ``r``.  Node ids are numbered in order of
    first appearance; each run of consecutive ranks on one node becomes one
    ``(node, 1, count)`` block.

    >>> process_mapping(["a", "a", "a"])
    '(vector,(0,1,3))'
    >>> process_mapping(["a", "b", "a"])
    '(vector,(0,1,1),(1,1,1),(0,1,1))'
    """
    if not hosts:
        raise InvalidArgument("hosts must name at least one rank's host")
    node_of: dict[str, int] = {}
    blocks: list[list[int]] = []
    for host in hosts:
        node = node_of.setdefault(host, len(node_of))
        if blocks and blocks[-1][0] == node:
            blocks[-1][1] += 1
        else:
            blocks.append([node, 1])
    return "(vector," + ",".join(f"({node},1,{count})" for node, count in blocks) + ")"


@dataclass
class Failure:
    """Why a job failed: the rank it came from (None for the job as a whole)."""

    rank: int | None
    cause: str
    #: The code the rank passed to MPI_Abort, when that is how it failed.
    exit_code: int | None = None


@dataclass
class RankState:
    host: str | None = None
    partition: int | None = None
    registered: bool = False
    connected: bool = False
    initialized: bool = False
    in_barrier: bool = False
    finalized: bool = False
    done: bool = False
    last_command: str = ""


@dataclass(frozen=True)
class SpawnCommand:
    """One command of an ``MPI_Comm_spawn(_multiple)``: one ``mcmd=spawn`` block."""

    execname: str
    nprocs: int
    args: tuple[str, ...] = ()
    info: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SpawnRequest:
    """A whole spawn from ``parent_rank``: its commands and the keys to preput in the children's space."""

    parent_rank: int
    commands: tuple[SpawnCommand, ...]
    preput: tuple[tuple[str, str], ...] = ()

    @property
    def total(self) -> int:
        """Size of the children's COMM_WORLD."""
        return sum(c.nprocs for c in self.commands)


#: Most processes one spawn may ask for.
SPAWN_MAX_PROCS = 1024


def parse_spawn_block(cmd: Command) -> tuple[SpawnCommand, int, int, tuple[tuple[str, str], ...]]:
    """One ``mcmd=spawn`` block as ``(command, totspawns, spawnssofar, preput)``.

    MPICH sends ``nprocs execname totspawns spawnssofar argcnt arg1.. preput_num
    preput_key_i preput_val_i info_num info_key_i info_val_i`` (preput keys in
    the first block only).  Raises PMIProtocolError naming a missing or bad field.
    """
    nprocs = cmd.require_int("nprocs")
    if not 1 <= nprocs <= SPAWN_MAX_PROCS:
        raise PMIProtocolError(f"mcmd=spawn: nprocs must be 1..{SPAWN_MAX_PROCS}, got {nprocs}")
    total, so_far = cmd.require_int("totspawns"), cmd.require_int("spawnssofar")
    if not 1 <= so_far <= total:
        raise PMIProtocolError(f"mcmd=spawn: spawnssofar={so_far} outside 1..totspawns={total}")

    def counted(count_key: str, *names: str, base: int = 0) -> list:
        raw = cmd.get(count_key) or "0"
        if not raw.isdigit():
            raise PMIProtocolError(f"mcmd=spawn: {count_key} must be a count, got {raw!r}")
        count = int(raw)
        items = []
        for i in range(base, base + count):
            values = [cmd.get(name.format(i)) for name in names]
            if any(v is None for v in values):
                missing = [n.format(i) for n, v in zip(names, values) if v is None]
                raise PMIProtocolError(f"mcmd=spawn: {count_key}={count} but {', '.join(missing)} is missing")
            items.append(values[0] if len(values) == 1 else tuple(values))
        return items

    command = SpawnCommand(execname=cmd.require("execname"), nprocs=nprocs,
                           args=tuple(counted("argcnt", "arg{}", base=1)),
                           info=tuple(counted("info_num", "info_key_{}", "info_val_{}")))
    return command, total, so_far, tuple(counted("preput_num", "preput_key_{}", "preput_val_{}"))


def _reply(name: str, **args: object) -> bytes:
    return format_command(name, args)


@dataclass
class JobSpace:
    """PMI state of one job: key-value pairs, barrier, per-rank progress.

    Parameters
    ----------
    size : int
        Number of ranks (the size of MPI_COMM_WORLD).
    kvsname : str, optional
        Key-space name; a fresh random one by default.
    """

    size: int
    kvsname: str = field(default_factory=new_kvsname)
    appnum: int = 0
    kvs: dict[str, str] = field(default_factory=dict)
    failure: Failure | None = None
    #: What relays reported after the failure (e.g. their rank's stacks), by rank.
    reports: dict[int, str] = field(default_factory=dict)
    closed: bool = False
    #: Published service names -> port names (MPI_Publish_name); a job and
    #: the jobs it spawns share one table.
    names: dict[str, str] = field(default_factory=dict)
    #: Whether ``MPI_Comm_spawn`` is served: the server then takes each
    #: finished request from :attr:`spawn_requests` and answers with
    #: :meth:`spawn_started`; otherwise it fails in the calling rank.
    spawn_enabled: bool = False
    spawn_requests: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise InvalidArgument(f"size must be a positive number of ranks, got {self.size!r}")
        if len(self.kvsname) > KVSNAME_MAX:
            raise InvalidArgument(f"kvsname must be at most {KVSNAME_MAX} characters")
        self.ranks = [RankState() for _ in range(self.size)]
        self._barrier_count = 0
        self._barrier_epoch = 0
        self._deferred_mapping_gets: list[int] = []
        self._spawn_blocks: dict[int, list] = {}
        #: Size of the spawn each rank's relay is starting (answered by its SPAWNED line).
        self.spawn_pending: dict[int, int] = {}
        #: appnum of each rank (MPI_APPNUM: the command index of a spawn_multiple); None: all ``appnum``.
        self.rank_appnums: list[int] | None = None

    # -- progress --------------------------------------------------------
    @property
    def all_registered(self) -> bool:
        return all(r.registered for r in self.ranks)

    @property
    def all_done(self) -> bool:
        return all(r.done for r in self.ranks)

    def pending_ranks(self) -> list[int]:
        """Ranks that have not reported their results yet."""
        return [i for i, r in enumerate(self.ranks) if not r.done]

    def connected_ranks(self) -> list[int]:
        """Ranks whose relay is connected now."""
        return [i for i, r in enumerate(self.ranks) if r.connected]

    def where(self, rank: int | None) -> str:
        """``"rank R (partition P on HOST)"`` as far as it is known, for messages."""
        if rank is None:
            return "the job"
        state = self.ranks[rank] if 0 <= rank < self.size else None
        if state is None or state.partition is None:
            return f"rank {rank}"
        return f"rank {rank} (partition {state.partition} on {state.host})"

    def describe_rank(self, rank: int) -> str:
        """One line on where ``rank`` got to, for error messages."""
        r = self.ranks[rank]
        if not r.registered:
            return "never connected"
        if r.done:
            return "finished"
        if r.in_barrier:
            return "waiting in a PMI barrier"
        if r.finalized:
            return "finalized, results not yet delivered"
        if r.initialized:
            return f"running (last PMI command: {r.last_command or 'none'})"
        return "connected, MPI not initialised"

    def status(self) -> str:
        """One line per rank on how far it got (for timeout messages)."""
        return "; ".join(f"{self.where(r)}: {self.describe_rank(r)}" for r in range(self.size))

    def _check_rank(self, rank: int) -> RankState:
        if not (0 <= rank < self.size):
            raise PMIProtocolError(f"rank {rank} is outside 0..{self.size - 1} for job {self.kvsname}")
        return self.ranks[rank]

    # -- the job's life: admission, end, failure ---------------------------
    def admit(self, rank: int, partition: int, host: str) -> list[Outgoing]:
        """A relay for ``rank`` (Spark ``partition``, on ``host``) introduced itself.

        Returns the welcome line for it, plus the ``PMI_process_mapping``
        replies that waited for the last rank.  Raises PMIProtocolError with
        the reason when the relay must be refused.
        """
        if self.closed:
            raise PMIProtocolError(f"job {self.kvsname} is closed")
        if self.failure is not None:
            last = self.failure.cause.splitlines()[-1:] or [""]
            raise PMIProtocolError(f"job {self.kvsname} has already failed: {last[0]}")
        state = self._check_rank(rank)
        if state.registered:
            raise PMIProtocolError(f"rank {rank} of job {self.kvsname} is already connected")
        if not host:
            raise PMIProtocolError(f"rank {rank} registered without a host name")
        if partition < 0:
            raise PMIProtocolError(f"rank {rank} registered with partition {partition}, expected 0 or more")
        state.registered = state.connected = True
        state.host, state.partition = host, partition
        out = [(rank, control.bare_line(control.WELCOME))]
        if not self.all_registered:
            return out
        mapping = process_mapping([r.host or "" for r in self.ranks])
        waiting, self._deferred_mapping_gets = self._deferred_mapping_gets, []
        return out + [(r, _reply("get_result", rc=0, value=mapping)) for r in waiting]

    def relay_done(self, rank: int) -> list[Outgoing]:
        """The rank's results were delivered: it finished cleanly."""
        self._check_rank(rank).done = True
        return []

    def relay_failed(self, rank: int, text: str) -> list[Outgoing]:
        """The relay reported its rank failed with ``text`` (a traceback, an exit status).

        After the job has failed, the report is kept in :attr:`reports`
        (stacks asked for by the abort, say) instead.
        """
        self._check_rank(rank)
        if self.failure is not None:
            self.reports[rank] = text
            return []
        return self.abort(rank, text)

    def relay_broke(self, rank: int, problem: str) -> list[Outgoing]:
        """The relay sent a line that is not valid PMI-1 or relay protocol."""
        return self.abort(rank, f"{self.where(rank)} sent a malformed PMI command: {problem}")

    def relay_lost(self, rank: int, why: str) -> list[Outgoing]:
        """The relay's connection went away; a failure unless it reported done first."""
        state = self._check_rank(rank)
        state.connected = False
        if state.done or self.closed:
            return []  # the rank finished, or the driver is tearing the job down
        return self.abort(rank, f"lost the relay of {self.where(rank)}: {why}")

    def abort(self, rank: int | None, cause: str, dump_stacks: bool = False,
              exit_code: int | None = None) -> list[Outgoing]:
        """Fail the job from ``rank`` (None: the job as a whole) with ``cause``.

        Only the first failure counts: it returns an abort line for every
        connected relay, which kills its rank (after reporting the rank's
        Python stacks, with ``dump_stacks``); later ones return nothing.
        """
        if self.failure is not None:
            return []
        self.failure = Failure(rank, cause, exit_code)
        line = control.text_line(control.ABORT, cause, stacks=int(dump_stacks))
        return [(r, line) for r in self.connected_ranks()]

    def close(self) -> None:
        """The driver is done with the job: no more relays, and losing one is no failure."""
        self.closed = True

    # -- lines from relays ---------------------------------------------------
    def handle(self, rank: int, command: Command) -> list[Outgoing]:
        """Apply ``command`` (PMI-1 or relay control) from ``rank``; return the replies to send.

        Raises PMIProtocolError for a command whose arguments are malformed.
        """
        state = self._check_rank(rank)
        if not state.registered:
            raise PMIProtocolError(f"rank {rank} sent cmd={command.name} before registering")
        if control.is_control(command):
            return self._control(rank, command)
        if self.failure is not None:
            return []
        state.last_command = command.name
        handler = getattr(self, "_cmd_" + command.name.replace("-", "_"), None)
        if handler is None:
            reply = REPLY_NAMES.get(command.name, UNKNOWN_REPLY)
            what = "not served by sparkmpi's PMI server" if command.name in REPLY_NAMES else "unknown"
            return [(rank, _reply(reply, rc=-1, msg=f"PMI command {command.name!r} is {what}"))]
        return handler(rank, state, command)

    def _control(self, rank: int, command: Command) -> list[Outgoing]:
        if command.name == control.DONE:
            return self.relay_done(rank)
        if command.name == control.FAILED:
            return self.relay_failed(rank, control.decode_text(command))
        if command.name == control.SPAWNED and rank in self.spawn_pending:
            total = self.spawn_pending.pop(rank)
            error = None if command.get("ok") == "1" else (control.decode_text(command) or "the spawn failed")
            return self.spawn_started(rank, total, error)
        raise PMIProtocolError(f"unexpected control command {command.name} from rank {rank}")

    def _cmd_initack(self, rank, state, cmd):
        pmiid = cmd.require_int("pmiid")
        if pmiid != rank:
            raise PMIProtocolError(f"rank {rank} announced pmiid={pmiid}")
        line = (_reply("initack") + _reply("set", size=self.size) + _reply("set", rank=rank)
                + _reply("set", debug=0))
        return [(rank, line)]

    def _cmd_fullinit(self, rank, state, cmd):
        state.initialized = True
        return [(rank, _reply("fullinit-response", rc=0, rank=rank, size=self.size,
                              appnum=self.appnum, debugged="FALSE", pmiverbose="FALSE"))]

    def _cmd_init(self, rank, state, cmd):
        version = cmd.require_int("pmi_version")
        if version != 1:
            return [(rank, _reply("response_to_init", rc=-1, pmi_version=1, pmi_subversion=1,
                                  msg=f"only PMI version 1 is served, client asked for {version}"))]
        state.initialized = True
        return [(rank, _reply("response_to_init", rc=0, pmi_version=1, pmi_subversion=1))]

    def _cmd_get_maxes(self, rank, state, cmd):
        return [(rank, _reply("maxes", rc=0, kvsname_max=KVSNAME_MAX, keylen_max=KEYLEN_MAX,
                              vallen_max=VALLEN_MAX))]

    def _cmd_get_appnum(self, rank, state, cmd):
        appnum = self.rank_appnums[rank] if self.rank_appnums else self.appnum
        return [(rank, _reply("appnum", rc=0, appnum=appnum))]

    def _cmd_get_my_kvsname(self, rank, state, cmd):
        return [(rank, _reply("my_kvsname", rc=0, kvsname=self.kvsname))]

    def _cmd_get_universe_size(self, rank, state, cmd):
        return [(rank, _reply("universe_size", rc=0, size=self.size))]

    def _check_kvsname(self, rank, cmd, reply_name):
        name = cmd.get("kvsname")
        if name is not None and name != self.kvsname:
            return [(rank, _reply(reply_name, rc=-1, msg=f"unknown kvsname {name!r}"))]
        return None

    def _cmd_put(self, rank, state, cmd):
        bad = self._check_kvsname(rank, cmd, "put_result")
        if bad:
            return bad
        key = cmd.require("key")
        value = cmd.get("value") or ""
        if len(key) > KEYLEN_MAX:
            return [(rank, _reply("put_result", rc=-1, msg=f"key longer than {KEYLEN_MAX} characters"))]
        if len(value) > VALLEN_MAX:
            return [(rank, _reply("put_result", rc=-1, msg=f"value longer than {VALLEN_MAX} characters"))]
        self.kvs[key] = value
        return [(rank, _reply("put_result", rc=0))]

    def _cmd_get(self, rank, state, cmd):
        bad = self._check_kvsname(rank, cmd, "get_result")
        if bad:
            return bad
        key = cmd.require("key")
        if key in self.kvs:
            return [(rank, _reply("get_result", rc=0, value=self.kvs[key]))]
        if key == PROCESS_MAPPING_KEY:
            if not self.all_registered:
                self._deferred_mapping_gets.append(rank)
                return []
            mapping = process_mapping([r.host or "" for r in self.ranks])
            return [(rank, _reply("get_result", rc=0, value=mapping))]
        return [(rank, _reply("get_result", rc=-1, found="FALSE", msg=f"key {key} not found"))]

    def _cmd_barrier_in(self, rank, state, cmd):
        if state.in_barrier:
            raise PMIProtocolError(f"rank {rank} entered the same barrier twice")
        state.in_barrier = True
        self._barrier_count += 1
        if self._barrier_count < self.size:
            return []
        self._barrier_count = 0
        self._barrier_epoch += 1
        for r in self.ranks:
            r.in_barrier = False
        out = _reply("barrier_out", rc=0)
        return [(r, out) for r in range(self.size)]

    def _cmd_finalize(self, rank, state, cmd):
        state.finalized = True
        return [(rank, _reply("finalize_ack", rc=0))]

    def _cmd_abort(self, rank, state, cmd):
        code = cmd.get("exitcode", "?")
        message = cmd.get("message") or "(no message)"
        try:
            exit_code = int(code)
        except ValueError:
            exit_code = None
        return self.abort(rank, f"rank {rank} called MPI_Abort with exit code {code}: {message}",
                          exit_code=exit_code)

    # -- MPI_Comm_spawn ----------------------------------------------------------
    def _cmd_spawn(self, rank, state, cmd):
        command, total, so_far, preput = parse_spawn_block(cmd)
        blocks = self._spawn_blocks.setdefault(rank, [])
        if so_far != len(blocks) + 1:
            self._spawn_blocks.pop(rank, None)
            raise PMIProtocolError(f"mcmd=spawn: block {so_far} of {total} arrived after {len(blocks)} blocks")
        blocks.append((command, preput))
        if so_far < total:
            return []  # MPICH waits for one reply, after the last block
        del self._spawn_blocks[rank]
        request = SpawnRequest(rank, tuple(c for c, _ in blocks), blocks[0][1])
        if not self.spawn_enabled:
            return [(rank, _reply("spawn_result", rc=-1,
                                  msg="MPI_Comm_spawn is not served for this job by sparkmpi's PMI server"))]
        if request.total > SPAWN_MAX_PROCS:
            return [(rank, _reply("spawn_result", rc=-1,
                                  msg=f"a spawn of {request.total} processes is more than {SPAWN_MAX_PROCS}"))]
        self.spawn_requests.append(request)
        return []

    def spawn_started(self, rank: int, total: int, error: str | None = None) -> list[Outgoing]:
        """The server's answer to a spawn from ``rank``: its ``total`` children
        were started (``error`` None) or could not be (``error`` says why)."""
        self._check_rank(rank)
        if self.failure is not None:
            return []
        if error is not None:
            return [(rank, _reply("spawn_result", rc=-1, msg=error))]
        return [(rank, _reply("spawn_result", rc=0, errcodes=",".join(["0"] * total)))]

    # -- the name service (MPI_Publish_name, MPI_Lookup_name, MPI_Unpublish_name) --
    def _service(self, rank, cmd, reply_name):
        """The command's service name, or the error reply to send instead."""
        service = cmd.get("service")
        if not service:
            return None, [(rank, _reply(reply_name, rc=-1, msg=f"cmd={cmd.name} needs service=..."))]
        if len(service) > SERVICE_MAX:
            return None, [(rank, _reply(reply_name, rc=-1,
                                        msg=f"service name longer than {SERVICE_MAX} characters"))]
        return service, None

    def _cmd_publish_name(self, rank, state, cmd):
        service, bad = self._service(rank, cmd, "publish_result")
        if bad:
            return bad
        port = cmd.get("port")
        if not port or len(port) > PORT_MAX:
            return [(rank, _reply("publish_result", rc=-1,
                                  msg=f"cmd=publish_name needs port=... of at most {PORT_MAX} characters"))]
        if service in self.names:
            return [(rank, _reply("publish_result", rc=-1, msg=f"service {service} is already published"))]
        self.names[service] = port
        return [(rank, _reply("publish_result", rc=0))]

    def _cmd_lookup_name(self, rank, state, cmd):
        service, bad = self._service(rank, cmd, "lookup_result")
        if bad:
            return bad
        if service not in self.names:
            return [(rank, _reply("lookup_result", rc=-1, msg=f"service {service} is not published"))]
        return [(rank, _reply("lookup_result", rc=0, port=self.names[service]))]

    def _cmd_unpublish_name(self, rank, state, cmd):
        service, bad = self._service(rank, cmd, "unpublish_result")
        if bad:
            return bad
        if self.names.pop(service, None) is None:
            return [(rank, _reply("unpublish_result", rc=-1, msg=f"service {service} is not published"))]
        return [(rank, _reply("unpublish_result", rc=0))]
