"""What a command shows on the terminal, and where everything else goes.

A ``sparkmpi`` command prints only its own progress (stderr) and results
(stdout).  Spark's and the JVM's messages, the Kafka clients' log lines and
Python logging go to one log file per command, whose path is printed once,
when the first of them starts; with ``--verbose`` everything stays on the
terminal.  Outside the CLI (library use, tests) nothing is redirected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

__all__ = ["setup", "log_file", "log_file_if_written", "output_to_log", "LOG4J2_CONFIG"]

#: Spark's log4j2 configuration that writes into the command's log file.
LOG4J2_CONFIG = str(resources.files("sparkmpi").joinpath("data/log4j2.properties"))

_state: dict = {"path": None, "announced": False, "quiet": False, "handler": None}


def setup(command: str, *, verbose: bool = False, quiet: bool = False, path: str | None = None) -> None:
    """Route this command's background messages: into a log file, or (``verbose``) to the terminal."""
    if _state["handler"] is not None:  # an earlier command in this process (tests call main() often)
        logging.getLogger().removeHandler(_state["handler"])
        _state["handler"].close()
        _state["handler"] = None
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        _state.update(path=None, announced=False, quiet=quiet)
        return
    if path is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(tempfile.gettempdir()) / "sparkmpi-logs" / f"{command}-{stamp}-{os.getpid()}.log"
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _state.update(path=path, announced=False, quiet=quiet, handler=handler)


def log_file() -> Path | None:
    """The command's log file, announced on stderr the first time; None when nothing is redirected."""
    path = _state["path"]
    if path is not None and not _state["announced"]:
        _state["announced"] = True
        if not _state["quiet"]:
            print(f"sparkmpi: messages of Spark, the JVM and Kafka go to {path}", file=sys.stderr, flush=True)
    return path


def log_file_if_written() -> Path | None:
    """The log file when something was written to it (to point at after a failure)."""
    path = _state["path"]
    return path if path is not None and path.exists() and path.stat().st_size else None


@contextlib.contextmanager
def output_to_log(path: Path | None):
    """While inside, file descriptors 1 and 2 go to ``path``: child processes started
    here (the JVM) keep writing there; this process gets its terminal back after."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)
