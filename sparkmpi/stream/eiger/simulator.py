"""Diamond Light Source's Eiger simulator (``tickit-devices``, run by ``tickit``) as a child process.

:class:`TickitEiger` writes a one-component tickit configuration (the Eiger
with its SIMPLON REST port, its Stream V1 (``legacy``) PUSH port and its
Stream V2 (``cbor``) PUSH port, all on 127.0.0.1 at free ports), starts
``python -m sparkmpi.stream.eiger.simulator CONFIG`` under
``setpriv --pdeathsig`` (it dies with its parent), waits until the REST
interface answers, and stops it (SIGTERM, then SIGKILL) on :meth:`stop`.

What the simulator sends (tickit-devices 0.4.1): every image is the same
frame captured from a real EIGER2 16M (4362 x 4148 uint16, bitshuffle-LZ4);
the Stream V2 start message is one captured from a real detector with the
series id, image count and geometry of the current settings; the Stream V1
series carries ``dheader-1.0`` (and the config part at detail ``basic``/``all``,
plus flat field, pixel mask and count-rate table at ``all``), four parts per
image (``dimage-1.0``, ``dimage_d-1.0``, the ``bs16-lz4<`` blob, ``dconfig-1.0``)
and ``dseries_end-1.0``.  Several messages produced in one simulation step
travel as the parts of one ZeroMQ message.

The entry point blocks ``apischema``'s optional GraphQL support before
tickit imports it: apischema 0.19 fails to import against graphql-core 3.3,
which other packages may bring into the same environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..._proc import free_port, stop_process, with_parent_death
from ...errors import SparkMPIError
from .rest import SimplonClient


class SimulatorError(SparkMPIError):
    """The tickit Eiger simulator is not installed, did not start, or died."""


def available() -> str | None:
    """None when tickit and tickit-devices are importable; otherwise why not."""
    import importlib.util

    for name in ("tickit", "tickit_devices"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed (pip install tickit-devices)"
    return None


CONFIG = """\
- type: tickit_devices.eiger.Eiger
  name: eiger
  inputs: {{}}
  host: 127.0.0.1
  port: {rest}
  stream_host: 127.0.0.1
  stream_legacy_port: {v1}
  stream_cbor_port: {v2}
"""


class TickitEiger:
    """The simulator as a child process; a context manager."""

    def __init__(self, *, start_timeout: float = 60.0, log_path=None):
        why = available()
        if why:
            raise SimulatorError(f"the Eiger simulator cannot run: {why}")
        self.rest_port, self.v1_port, self.v2_port = free_port(), free_port(), free_port()
        self.start_timeout = float(start_timeout)
        self._dir = tempfile.TemporaryDirectory(prefix="sparkmpi-tickit-")
        self.config = Path(self._dir.name) / "eiger.yaml"
        self.config.write_text(CONFIG.format(rest=self.rest_port, v1=self.v1_port, v2=self.v2_port))
        self.log_path = Path(log_path) if log_path else Path(self._dir.name) / "tickit.log"
        self.proc: subprocess.Popen | None = None
        self.client = SimplonClient("127.0.0.1", self.rest_port, timeout=5.0)

    @property
    def stream_v1(self) -> str:
        return f"tcp://127.0.0.1:{self.v1_port}"

    @property
    def stream_v2(self) -> str:
        return f"tcp://127.0.0.1:{self.v2_port}"

    def start(self) -> "TickitEiger":
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(with_parent_death([sys.executable, "-m", __name__, str(self.config)]),
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
        finally:
            log.close()
        try:
            self.client.wait_until_reachable(self.start_timeout)
        except Exception as exc:
            code = self.proc.poll()
            tail = self.log_tail()
            self.stop()
            state = f"exited with {code}" if code is not None else f"not answering after {self.start_timeout:g} s"
            raise SimulatorError(f"the tickit Eiger simulator {state} (REST port {self.rest_port}): {exc}; "
                                 f"its log ends: {tail}") from None
        return self

    def log_tail(self, chars: int = 800) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5.0)
            self.proc = None
        self._dir.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    """``python -m sparkmpi.stream.eiger.simulator CONFIG``: run tickit's ``all`` on CONFIG."""
    sys.modules.setdefault("graphql", None)   # module docstring: apischema's optional GraphQL support
    from tickit.cli import main as tickit_main

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m sparkmpi.stream.eiger.simulator CONFIG.yaml", file=sys.stderr)
        return 2
    return tickit_main(["all", args[0]], standalone_mode=True) or 0


if __name__ == "__main__":
    sys.exit(main())
