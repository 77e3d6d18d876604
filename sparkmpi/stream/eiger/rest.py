"""A small SIMPLON REST client: configure a DECTRIS detector, arm, trigger, disarm.

SIMPLON serves JSON under ``http://HOST:PORT/<subsystem>/api/<version>/``:
``detector/config/<key>`` (``nimages``, ``ntrigger``, ``trigger_mode``,
``compression``, ``count_time``...), ``detector/command/<command>`` (``arm``
returns the series id), ``detector/status/<key>`` and ``stream/config/<key>``
(``mode``, ``format``: ``legacy`` = Stream V1, ``cbor`` = Stream V2, and
``header_detail``).  A value is written as ``{"value": ...}`` with PUT and
read back as ``{"value": ..., ...}``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from ..._retry import retry
from ...errors import InvalidArgument, SparkMPIError

API_VERSION = "1.8.0"
STREAM_FORMATS = {"v1": "legacy", "v2": "cbor", "legacy": "legacy", "cbor": "cbor"}


class SimplonError(SparkMPIError):
    """The detector's REST interface refused a request or could not be reached."""


class SimplonClient:
    """``SimplonClient("127.0.0.1", 8081)``; every call has a timeout and names the URL when it fails."""

    def __init__(self, host: str, port: int = 80, *, api_version: str = API_VERSION, timeout: float = 10.0):
        if not isinstance(host, str) or not host:
            raise InvalidArgument(f"host: expected a host name, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidArgument(f"port: expected 1..65535, got {port!r}")
        if not timeout > 0:
            raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
        self.base, self.api_version, self.timeout = f"http://{host}:{port}", api_version, float(timeout)

    def url(self, subsystem: str, kind: str, key: str) -> str:
        return f"{self.base}/{subsystem}/api/{self.api_version}/{kind}/{key}"

    def _request(self, method: str, url: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            raise SimplonError(f"{method} {url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SimplonError(f"{method} {url}: no answer within {self.timeout:g} s "
                               f"({getattr(exc, 'reason', exc)})") from None
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise SimplonError(f"{method} {url}: the answer is not JSON: {text[:80]!r}") from None

    # -- values --------------------------------------------------------------
    def get(self, subsystem: str, kind: str, key: str):
        answer = self._request("GET", self.url(subsystem, kind, key))
        return answer.get("value") if isinstance(answer, dict) else answer

    def put(self, subsystem: str, kind: str, key: str, value):
        return self._request("PUT", self.url(subsystem, kind, key), {"value": value})

    def detector_config(self, key: str):
        return self.get("detector", "config", key)

    def set_detector_config(self, key: str, value) -> None:
        self.put("detector", "config", key, value)
        got = self.detector_config(key)
        if got != value and not (isinstance(value, float) and isinstance(got, (int, float))
                                 and abs(got - value) <= 1e-9 * max(1.0, abs(value))):
            raise SimplonError(f"detector config {key!r}: wrote {value!r}, the detector reports {got!r}")

    def state(self) -> str:
        return self.get("detector", "status", "state")

    def wait_until_reachable(self, timeout: float = 30.0) -> str:
        """Poll the detector's state until it answers; the state it reports."""
        return retry(lambda _left: self.state(), what="reach the SIMPLON interface at", address=self.base,
                     timeout=timeout, retry_on=(SimplonError,))

    # -- configuration --------------------------------------------------------
    def configure(self, *, nimages: int = 1, ntrigger: int = 1, stream: str = "v2", compression: str | None = None,
                  header_detail: str | None = None, frame_time: float | None = None,
                  trigger_mode: str = "ints") -> None:
        """Set the series up: images per trigger, triggers, stream interface, compression."""
        for name, value in (("nimages", nimages), ("ntrigger", ntrigger)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"{name}: expected an integer >= 1, got {value!r}")
        if stream not in STREAM_FORMATS:
            raise InvalidArgument(f"stream: expected 'v1' or 'v2', got {stream!r}")
        if header_detail not in (None, "none", "basic", "all"):
            raise InvalidArgument(f"header_detail: expected 'none', 'basic' or 'all', got {header_detail!r}")
        self.put("stream", "config", "mode", "enabled")
        self.put("stream", "config", "format", STREAM_FORMATS[stream])
        if self.get("stream", "config", "format") != STREAM_FORMATS[stream]:
            raise SimplonError(f"the detector at {self.base} did not take stream format {STREAM_FORMATS[stream]!r}")
        if header_detail is not None:
            self.put("stream", "config", "header_detail", header_detail)
        self.set_detector_config("trigger_mode", trigger_mode)
        self.set_detector_config("nimages", nimages)
        self.set_detector_config("ntrigger", ntrigger)
        if frame_time is not None:
            self.set_detector_config("frame_time", float(frame_time))
        if compression is not None:
            self.set_detector_config("compression", compression)

    # -- commands -------------------------------------------------------------
    def command(self, name: str, body=None):
        if name not in ("initialize", "arm", "trigger", "disarm", "cancel", "abort"):
            raise InvalidArgument(f"command: expected initialize, arm, trigger, disarm, cancel or abort, got {name!r}")
        return self._request("PUT", self.url("detector", "command", name), body)

    def initialize(self) -> None:
        self.command("initialize")

    def arm(self) -> int | None:
        """Arm; the series id the detector gives the next series (None if it does not say)."""
        answer = self.command("arm")
        if isinstance(answer, dict):
            value = answer.get("sequence id", answer.get("series_id"))
            return value if isinstance(value, int) else None
        return None

    def trigger(self) -> None:
        self.command("trigger")

    def disarm(self) -> None:
        self.command("disarm")

    def wait_for_state(self, wanted: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state == wanted:
                return
            if time.monotonic() > deadline:
                raise SimplonError(f"the detector at {self.base} is {state!r}, not {wanted!r}, after {timeout:g} s")
            time.sleep(0.05)

    def acquire(self, *, ntrigger: int = 1, timeout: float = 60.0) -> int | None:
        """Arm, trigger ``ntrigger`` times (internal triggers), wait for idle: the series id."""
        series = self.arm()
        for _ in range(ntrigger):
            self.trigger()
        self.wait_for_state("idle", timeout)
        return series
