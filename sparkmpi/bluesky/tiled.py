"""Results where a facility looks for them: a local Tiled server, and the live results written to it.

:class:`LocalTiled` starts ``tiled serve catalog`` as a subprocess (like the
Kafka broker: 127.0.0.1, a free port, a catalog and data folder of its own,
an API key, dies with its parent, stopped with nothing left behind).
:class:`TiledResults` writes, under each scan's uid (a container whose
metadata is the start document's, without the geometry arrays)::

    <uid>/snapshots/<NNNN>   the live object after each batch (metadata: the quality document)
    <uid>/object, probe, errors   the final result (container metadata: final=True, exit status, quality)

A write that fails because the server is down raises :class:`TiledUnavailable`
(naming the address and the cause) and is kept; the next write sends the
kept ones first, so nothing is lost while the stream goes on.

Failing fast: Tiled's client retries a failed request up to
``TILED_RETRY_ATTEMPTS`` (10) times within ``TILED_RETRY_TIMEOUT`` (45 s),
about 25 s against a server that refuses connections: that would stall the
live reconstruction at every write.  Those are process-wide settings read when
``tiled`` is imported, so :class:`TiledResults` bounds its own writes instead:
its client's HTTP requests carry a request hook that ends the retries of a
write once ``retry_window`` seconds (default 2 s) have passed without an answer
from the server (since the write began or the last response: a healthy server
answers every request, so only a silent one runs the window out), and after a failed write the next one first probes the server with one
plain GET (``probe_timeout``, default 1 s) and keeps the write at once when
that fails.  A write while the server is down thus costs at most about
``retry_window`` plus one backoff sleep of Tiled's client (the first) and a
few milliseconds after that.  Replaying a kept write is idempotent (a snapshot
or final array already there is overwritten, not refused).

A write the server refuses for good (a 4xx answer other than 408 and 429: an
API key it does not accept, a name it cannot store, a conflict) raises
:class:`TiledRefused` naming the answer, and is set aside in
:attr:`TiledResults.refused` with the reason rather than kept for retry:
retrying it would fail the same way and hold back every write after it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from .._proc import free_port, stop_process, with_parent_death
from .._retry import retry
from ..errors import InvalidArgument, RetryTimeout, SparkMPIError

__all__ = ["LocalTiled", "TiledResults", "TiledUnavailable", "TiledRefused", "TiledError"]

log = logging.getLogger("sparkmpi.bluesky.tiled")


class TiledError(SparkMPIError):
    """The Tiled server could not be started or stopped."""


class TiledUnavailable(SparkMPIError):
    """A write to Tiled failed (server down or not answering); the write is kept for later."""


class TiledRefused(SparkMPIError):
    """The Tiled server refused a write for good (4xx); the write is set aside, not retried."""


class _Refusal(Exception):
    """The server answered, and refused: retrying cannot help."""


def _refusal(exc: BaseException) -> str | None:
    """The server's refusal in ``exc`` (or what caused it), or None when the server did not answer."""
    import httpx

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, _Refusal):
            return str(exc)
        if isinstance(exc, httpx.HTTPStatusError):
            code = exc.response.status_code
            return str(exc) if 400 <= code < 500 and code not in (408, 429) else None
        exc = exc.__cause__ or exc.__context__
    return None


def _tiled_executable() -> str:
    exe = Path(sys.executable).with_name("tiled")
    if not exe.exists():
        raise TiledError(f"the 'tiled' command is not installed next to {sys.executable} "
                         f"(pip install 'tiled[server]')")
    return str(exe)


class LocalTiled:
    """A Tiled server on 127.0.0.1 serving a writable catalog in ``data_dir``.

    >>> with LocalTiled(tmp_path) as server:            # doctest: +SKIP
    ...     client = server.client()
    """

    def __init__(self, data_dir, *, port: int = 0, api_key: str | None = None, timeout: float = 60.0):
        self.data_dir = Path(data_dir)
        self.port = int(port) or 0
        self.api_key = api_key or uuid.uuid4().hex
        self.timeout = float(timeout)
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalTiled":
        if self.proc is not None:
            raise TiledError(f"the Tiled server at {self.uri} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        catalog = self.data_dir / "catalog.db"
        self.port = self.port or free_port()
        cmd = [_tiled_executable(), "serve", "catalog", str(catalog), "-w", str(self.data_dir / "data"),
               "--api-key", self.api_key, "--host", "127.0.0.1", "--port", str(self.port)]
        if not catalog.exists():
            cmd.insert(4, "--init")
        log_file = open(self.data_dir / "tiled.log", "ab")
        env = dict(os.environ, TILED_SINGLE_USER_API_KEY=self.api_key)
        with log_file:
            self.proc = subprocess.Popen(with_parent_death(cmd), stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, cwd=self.data_dir, env=env,
                                         start_new_session=True)
        t0 = time.monotonic()

        def up(left):
            if self.proc.poll() is not None:
                raise TiledError(f"the Tiled server exited with status {self.proc.returncode} after "
                                 f"{time.monotonic() - t0:.1f} s:\n{self._log_tail()}")
            import httpx

            httpx.get(f"{self.uri}/api/v1/", timeout=min(left, 1.0)).raise_for_status()

        try:
            import httpx

            retry(up, what="reach the new Tiled server at", address=self.uri, timeout=self.timeout,
                  retry_on=(httpx.HTTPError, OSError), first_delay=0.1, max_delay=0.5)
        except (RetryTimeout, TiledError) as exc:
            self.stop()
            raise TiledError(f"{exc}\n{self._log_tail()}") from exc
        return self

    def _log_tail(self, lines: int = 12) -> str:
        try:
            return "\n".join((self.data_dir / "tiled.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5.0, group=True)
            self.proc = None

    def client(self):
        from tiled.client import from_uri

        return from_uri(self.uri, api_key=self.api_key)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _plain(value):
    """JSON-friendly metadata (NumPy scalars and arrays to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class _RetryWindowOver(Exception):
    """Raised by the request hook once a write's retry window has passed; not an httpx error, so
    Tiled's client does not retry it."""


class TiledResults:
    """Writes a scan's snapshots and final results to Tiled under its uid (module docstring).

    Parameters
    ----------
    uri : str
        The Tiled server, ``http(s)://host:port``.
    api_key : str
    retry_window : float
        Seconds a write may go on retrying without an answer from the server before it is kept for
        later (Tiled's client retries inside it; no new request starts after it).
    probe_timeout : float
        Seconds the reachability probe (after a failed write, before the next) may take.
    """

    def __init__(self, uri: str, api_key: str, *, retry_window: float = 2.0, probe_timeout: float = 1.0):
        if not isinstance(uri, str) or not uri.startswith("http"):
            raise InvalidArgument(f"uri: expected an http(s) address of a Tiled server, got {uri!r}")
        for name, value in (("retry_window", retry_window), ("probe_timeout", probe_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidArgument(f"{name}: expected seconds > 0, got {value!r}")
        self.uri, self.api_key = uri.rstrip("/"), api_key
        self.retry_window, self.probe_timeout = float(retry_window), float(probe_timeout)
        self._client = None
        self._deadline: float | None = None   # the current write's end of retries (monotonic), moved by answers
        self.pending: list[tuple] = []
        #: Writes the server refused for good, each ``(write, reason)``, oldest first.
        self.refused: list[tuple] = []
        self.written = 0

    def _check_window(self, request) -> None:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise _RetryWindowOver(f"no answer within the retry window of {self.retry_window:g} s "
                                   f"({request.method} {request.url.path})")

    def _answered(self, response) -> None:
        if self._deadline is not None:
            self._deadline = time.monotonic() + self.retry_window

    def _probe(self) -> None:
        """One plain GET of the root's metadata with the key, no retries: fails in milliseconds
        when the server refuses connections, and says so when it refuses the key (Tiled's
        client would raise from inside ``from_uri`` and leave its connection open)."""
        import httpx

        response = httpx.get(f"{self.uri}/api/v1/metadata/", timeout=self.probe_timeout,
                             headers={"Authorization": f"Apikey {self.api_key}"})
        if response.status_code in (401, 403):
            raise _Refusal(f"the server did not accept the API key ({response.status_code}: "
                           f"{response.text[:100]})")
        response.raise_for_status()

    def _root(self):
        if self._client is None:
            from tiled.client import from_uri

            self._probe()   # a connection after a failure (or the first): is anyone there?
            self._client = from_uri(self.uri, api_key=self.api_key)
            hooks = self._client.context.http_client.event_hooks
            hooks["request"].append(self._check_window)
            hooks["response"].append(self._answered)
        return self._client

    def _scan(self, uid: str, geometry):
        root = self._root()
        if uid in root:
            return root[uid]
        md = {} if geometry is None else {"start": _plain(dict(geometry.metadata)),
                                          "object_shape": list(geometry.object_shape),
                                          "frame_shape": list(geometry.frame_shape or ()),
                                          "pixel_size": geometry.pixel_size, "origin": list(geometry.origin),
                                          "points_planned": geometry.points_planned}
        container = root.create_container(key=uid, metadata=md)
        container.create_container(key="snapshots")
        return container

    def _attempt(self, op) -> None:
        kind, args = op[0], op[1:]
        self._deadline = time.monotonic() + self.retry_window
        try:
            getattr(self, f"_do_{kind}")(*args)
            self.written += 1
        except Exception as exc:  # httpx errors, tiled's ClientError, the window: the server is down or refused
            self.close()
            what = f"writing the {kind} of scan {args[0]} to Tiled at {self.uri}"
            reason = _refusal(exc)
            if reason is not None:
                raise TiledRefused(f"{what} was refused: {reason}"[:400]) from exc
            raise TiledUnavailable(f"{what} failed: {type(exc).__name__}: {exc}"[:400]) from exc
        finally:
            self._deadline = None

    def _do_snapshot(self, uid, n, obj, quality, geometry):
        scan = self._scan(uid, geometry)
        snapshots, key = scan["snapshots"], f"{n:04d}"
        if key in snapshots:   # a kept write replayed after the server had stored it
            snapshots[key].write(np.asarray(obj, np.complex64))
            snapshots[key].update_metadata(metadata=_plain(quality))
        else:
            snapshots.write_array(np.asarray(obj, np.complex64), key=key, metadata=_plain(quality))

    def _do_final(self, uid, obj, probe, errors, quality, geometry, exit_status):
        scan = self._scan(uid, geometry)
        for key, value in (("object", np.asarray(obj, np.complex64)), ("probe", np.asarray(probe, np.complex64)),
                           ("errors", np.asarray(errors, np.float64))):
            if key in scan:
                scan[key].write(value)
            else:
                scan.write_array(value, key=key)
        scan.update_metadata(metadata={"final": True, "exit_status": exit_status, "quality": _plain(quality)})

    def _queue(self, op) -> None:
        try:
            self.flush_pending()
            self._attempt(op)
        except TiledUnavailable:
            self.pending.append(op)
            raise
        except TiledRefused as exc:
            self._set_aside(op, exc)
            raise

    def _set_aside(self, op, exc: TiledRefused) -> None:
        self.refused.append((op, str(exc)))
        log.error("%s; set aside (TiledResults.refused), not retried", exc)

    def flush_pending(self) -> None:
        """Send the writes kept while the server was down (oldest first); TiledUnavailable if it still is.

        A kept write that the server now refuses for good is set aside (:attr:`refused`) and
        the next one is sent."""
        while self.pending:
            op = self.pending[0]
            try:
                self._attempt(op)
            except TiledRefused as exc:
                self._set_aside(op, exc)
            self.pending.pop(0)

    def close(self) -> None:
        """Close the HTTP connections (kept writes stay kept)."""
        if self._client is not None:
            try:
                self._client.context.close()
            except Exception:  # closing a client whose server is gone
                pass
            self._client = None

    def write_snapshot(self, uid: str, n: int, obj, quality: dict, geometry=None) -> None:
        self._queue(("snapshot", uid, int(n), np.array(obj), dict(quality), geometry))

    def write_final(self, uid: str, obj, probe, errors, quality: dict, geometry=None, exit_status=None) -> None:
        self._queue(("final", uid, np.array(obj), np.array(probe), np.array(errors), dict(quality), geometry,
                     exit_status))
