"""Lines of sparkmpi's own relay protocol, spoken between a Spark task's relay
and the driver's PMI server on the same connection as the PMI-1 lines.

They use the PMI-1 line format with command names starting ``sparkmpi-``, a
prefix no PMI client uses, so one parser serves both.  Free text (tracebacks,
reasons) travels base64-encoded, since PMI values cannot hold newlines.

Relay to server::

    cmd=sparkmpi-hello job=KVSNAME token=HEX rank=R partition=P host=H pid=N
    cmd=sparkmpi-done
    cmd=sparkmpi-failed reason64=B64

Server to relay::

    cmd=sparkmpi-welcome
    cmd=sparkmpi-refused reason64=B64
    cmd=sparkmpi-abort reason64=B64 stacks=0|1
    cmd=sparkmpi-spawn job=KVSNAME token=HEX parent=R commands64=B64(JSON)

and the relay's answer to a spawn (:mod:`sparkmpi.launch.spawned` starts the children)::

    cmd=sparkmpi-spawned ok=1 | ok=0 reason64=B64
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from ..errors import PMIProtocolError
from .wire import Command, format_command

PREFIX = "sparkmpi-"
HELLO, WELCOME, REFUSED, ABORT, DONE, FAILED = (
    PREFIX + n for n in ("hello", "welcome", "refused", "abort", "done", "failed"))


SPAWN, SPAWNED = PREFIX + "spawn", PREFIX + "spawned"


def spawn_line(job: str, token: str, parent_rank: int, commands: list) -> bytes:
    """Ask the relay of ``parent_rank`` to start ``commands`` (``[{"execname", "nprocs",
    "args", "info"}]``) as the ranks of job ``job``."""
    blob = base64.b64encode(json.dumps(commands).encode()).decode("ascii")
    return format_command(SPAWN, {"job": job, "token": token, "parent": parent_rank, "commands64": blob})


def decode_spawn(command: Command) -> tuple[str, str, list]:
    """``(job, token, commands)`` of a :data:`SPAWN` line."""
    try:
        commands = json.loads(base64.b64decode(command.require("commands64"), validate=True))
    except ValueError:
        raise PMIProtocolError(f"cmd={command.name}: commands64 is not base64 JSON") from None
    return command.require("job"), command.require("token"), commands


def spawned_line(error: str | None) -> bytes:
    """The relay's answer to :data:`SPAWN`: the children started, or why not."""
    return format_command(SPAWNED, {"ok": 1}) if error is None else text_line(SPAWNED, error, ok=0)


def is_control(command: Command) -> bool:
    return command.name.startswith(PREFIX)


def encode_text(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "replace")).decode("ascii")


def decode_text(command: Command, key: str = "reason64") -> str:
    raw = command.get(key)
    if raw is None:
        return ""
    try:
        return base64.b64decode(raw, validate=True).decode("utf-8", "replace")
    except ValueError:
        raise PMIProtocolError(f"cmd={command.name}: {key} is not base64") from None


@dataclass(frozen=True)
class Hello:
    job: str
    token: str
    rank: int
    partition: int
    host: str
    pid: int

    def encode(self) -> bytes:
        return format_command(HELLO, {"job": self.job, "token": self.token, "rank": self.rank,
                                      "partition": self.partition, "host": self.host, "pid": self.pid})

    @classmethod
    def from_command(cls, command: Command) -> "Hello":
        if command.name != HELLO:
            raise PMIProtocolError(f"expected cmd={HELLO} as the first line, got cmd={command.name}")
        return cls(job=command.require("job"), token=command.require("token"),
                   rank=command.require_int("rank"), partition=command.require_int("partition"),
                   host=command.require("host"), pid=command.require_int("pid"))


def text_line(name: str, text: str, **flags: int) -> bytes:
    """A control line carrying free ``text`` (base64) and integer ``flags``."""
    return format_command(name, {"reason64": encode_text(text), **flags})


def bare_line(name: str) -> bytes:
    return format_command(name, {})
