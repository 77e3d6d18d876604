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
* The first failure (an ``abort`` from a rank, a protocol error, a rank lost)
  wins and is kept as :attr:`JobSpace.failure`; later commands are ignored.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from ..errors import InvalidArgument, PMIProtocolError
from .wire import Command, format_command

KVSNAME_MAX = 256
KEYLEN_MAX = 64
VALLEN_MAX = 1024
PROCESS_MAPPING_KEY = "PMI_process_mapping"

Outgoing = tuple[int, bytes]

# Valid PMI-1 queries that sparkmpi does not offer (name service, spawn):
# answered with the reply name the client waits for and rc=-1.
_UNSUPPORTED_REPLIES = {"publish_name": "publish_result", "unpublish_name": "unpublish_result",
                        "lookup_name": "lookup_result", "spawn": "spawn_result"}


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


@dataclass
class RankState:
    host: str | None = None
    registered: bool = False
    initialized: bool = False
    in_barrier: bool = False
    finalized: bool = False
    done: bool = False
    last_command: str = ""


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

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise InvalidArgument(f"size must be a positive number of ranks, got {self.size!r}")
        if len(self.kvsname) > KVSNAME_MAX:
            raise InvalidArgument(f"kvsname must be at most {KVSNAME_MAX} characters")
        self.ranks = [RankState() for _ in range(self.size)]
        self._barrier_count = 0
        self._barrier_epoch = 0
        self._deferred_mapping_gets: list[int] = []

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

    def fail(self, rank: int | None, cause: str) -> bool:
        """Record a failure; returns True if it is the first one."""
        if self.failure is not None:
            return False
        self.failure = Failure(rank, cause)
        return True

    def _check_rank(self, rank: int) -> RankState:
        if not (0 <= rank < self.size):
            raise PMIProtocolError(f"rank {rank} is outside 0..{self.size - 1} for job {self.kvsname}")
        return self.ranks[rank]

    # -- events from relays ------------------------------------------------
    def register(self, rank: int, host: str) -> list[Outgoing]:
        """A relay for ``rank`` on ``host`` joined; may release waiting gets."""
        state = self._check_rank(rank)
        if state.registered:
            raise PMIProtocolError(f"rank {rank} of job {self.kvsname} is already connected")
        if not host:
            raise PMIProtocolError(f"rank {rank} registered without a host name")
        state.registered = True
        state.host = host
        if not self.all_registered:
            return []
        mapping = process_mapping([r.host or "" for r in self.ranks])
        waiting, self._deferred_mapping_gets = self._deferred_mapping_gets, []
        return [(r, _reply("get_result", rc=0, value=mapping)) for r in waiting]

    def mark_done(self, rank: int) -> None:
        """The rank's results were delivered: it finished cleanly."""
        self._check_rank(rank).done = True

    # -- PMI commands ------------------------------------------------------
    def handle(self, rank: int, command: Command) -> list[Outgoing]:
        """Apply ``command`` from ``rank``; return the replies to send.

        Raises PMIProtocolError for a command whose arguments are malformed.
        """
        state = self._check_rank(rank)
        if not state.registered:
            raise PMIProtocolError(f"rank {rank} sent cmd={command.name} before registering")
        if self.failure is not None:
            return []
        state.last_command = command.name
        if command.name in _UNSUPPORTED_REPLIES:
            return [(rank, _reply(_UNSUPPORTED_REPLIES[command.name], rc=-1,
                                  msg=f"cmd={command.name} is not supported by sparkmpi"))]
        handler = getattr(self, "_cmd_" + command.name.replace("-", "_"), None)
        if handler is None:
            return [(rank, _reply("error", rc=-1, msg=f"unknown or unsupported command {command.name!r}"))]
        return handler(rank, state, command)

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
        return [(rank, _reply("appnum", rc=0, appnum=self.appnum))]

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
        self.fail(rank, f"rank {rank} called MPI_Abort with exit code {code}: {message}")
        return []
