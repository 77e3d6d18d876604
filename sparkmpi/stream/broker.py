"""A single-node Apache Kafka broker (KRaft, no ZooKeeper) run by the project.

* :func:`fetch_kafka` copies Kafka's jars (and a log4j 2 binding for SLF4J)
  from Maven Central into a cache folder, once, with the ``pom.xml`` shipped in
  ``sparkmpi/stream/data/kafka-pom.xml``: ``mvn -C dependency:copy-dependencies``
  into a temporary folder, checked (expected jars present, every jar a readable
  zip, SHA-256 manifest written), then renamed into place.
* :func:`start_broker` writes ``server.properties`` into the data folder,
  formats the storage on first use, launches ``java ... kafka.Kafka`` as a
  daemon on 127.0.0.1, records it in ``broker.json`` and waits until the broker
  answers a metadata request.  A broker that dies or hangs is reported within
  seconds with the last lines of its log.
* :func:`stop_broker` stops it with :func:`sparkmpi._proc.stop_process`
  (SIGTERM, SIGKILL after a grace period, reaped).  :func:`broker_status` reads ``broker.json``.

Cache folder: ``$SPARKMPI_KAFKA_HOME`` if set, else
``~/.cache/sparkmpi/kafka-<version>``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from .._proc import free_port, pid_running, stop_process, with_parent_death
from .._retry import retry
from ..config import setting
from ..errors import InvalidArgument, ProcessError, RetryTimeout
from .kafka_client import check_broker
from ._errors import BrokerError, BrokerUnavailable

#: Newest ``org.apache.kafka:kafka_2.13`` on Maven Central when this was
#: written (checked against maven-metadata.xml); runs on Java 17.
DEFAULT_VERSION = "4.4.0"
DEFAULT_PORT = 9092
DEFAULT_DATA_DIR = Path("var/kafka")
DEFAULT_HEAP = "512m"
HOST = "127.0.0.1"
MANIFEST = "sparkmpi-manifest.json"
STATE_FILE = "broker.json"
LOG_FILE = "broker.log"
OUT_FILE = "broker.out"

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_HEAP_RE = re.compile(r"^\d+[mMgG]$")
_CHILDREN: dict[int, subprocess.Popen] = {}  # brokers this process started (reaped by stop)


def _check_version(version: str) -> str:
    match = _VERSION_RE.match(str(version))
    if not match:
        raise InvalidArgument(f"version: expected MAJOR.MINOR.PATCH like {DEFAULT_VERSION!r}, got {version!r}")
    if int(match.group(1)) < 4:
        raise InvalidArgument(f"version: Kafka 4.0 or newer is supported (KRaft-only configuration), got {version!r}")
    return version


def kafka_home(version: str = DEFAULT_VERSION) -> Path:
    """The cache folder for Kafka ``version``'s jars (``lib/`` inside it)."""
    _check_version(version)
    configured = setting("kafka_home")
    if configured:
        return Path(configured).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sparkmpi" / f"kafka-{version}"


def _expected_jars(version: str) -> list[str]:
    return [f"kafka_2.13-{version}.jar", f"kafka-clients-{version}.jar", f"kafka-server-{version}.jar",
            f"kafka-raft-{version}.jar", f"kafka-metadata-{version}.jar", "scala-library-",
            "slf4j-api-", "log4j-slf4j-impl-", "log4j-core-", "log4j-api-"]


def _verify_lib(lib: Path, version: str) -> list[str]:
    """Problems with the jars in ``lib`` (empty when it looks complete)."""
    if not lib.is_dir():
        return [f"{lib} is not a folder"]
    names = sorted(p.name for p in lib.glob("*.jar"))
    problems = [f"missing {want}*" for want in _expected_jars(version)
                if not any(n == want or (want.endswith("-") and n.startswith(want)) for n in names)]
    for name in names:
        if not zipfile.is_zipfile(lib / name):
            problems.append(f"{name} is not a valid jar (zip)")
    return problems


def kafka_is_fetched(version: str = DEFAULT_VERSION, home: Path | None = None) -> bool:
    """True when ``home`` holds a complete, verified copy of Kafka ``version``."""
    home = Path(home) if home else kafka_home(version)
    try:
        manifest = json.loads((home / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("version") == version and not _verify_lib(home / "lib", version)


def fetch_kafka(version: str = DEFAULT_VERSION, home: Path | None = None, *, force: bool = False,
                timeout: float = 900.0, progress=sys.stderr) -> Path:
    """Fetch Kafka ``version``'s jars from Maven Central into ``home``; return ``home``.

    Does nothing when a verified copy is already there (unless ``force``).
    Needs ``mvn`` (Maven 3) and network access to Maven Central.

    Raises
    ------
    BrokerError
        Maven missing, the download failing (with Maven's last output lines),
        or the downloaded jars failing verification.
    """
    _check_version(version)
    home = Path(home) if home else kafka_home(version)
    if not force and kafka_is_fetched(version, home):
        return home
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven (mvn) is not on PATH: it is needed once to fetch Kafka's jars from Maven "
                          "Central (install Maven 3, or set SPARKMPI_KAFKA_HOME to a folder whose lib/ holds them)")
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{home.name}.fetch-", dir=home.parent))
    try:
        pom = resources.files("sparkmpi.stream").joinpath("data/kafka-pom.xml").read_bytes()
        (tmp / "pom.xml").write_bytes(pom)
        if progress:
            print(f"sparkmpi: fetching Apache Kafka {version} jars from Maven Central into {home} ...",
                  file=progress, flush=True)
        cmd = [mvn, "-q", "-B", "-C", "-f", str(tmp / "pom.xml"), "dependency:copy-dependencies",
               f"-DoutputDirectory={tmp / 'lib'}", f"-Dkafka.version={version}"]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BrokerError(f"fetching Kafka {version} with Maven did not finish within {timeout:.0f} s "
                              f"(is Maven Central reachable?)") from None
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise BrokerError(f"Maven could not fetch Kafka {version} (exit {proc.returncode}; is version "
                              f"{version} on Maven Central and the network reachable?):\n{tail}")
        problems = _verify_lib(tmp / "lib", version)
        if problems:
            raise BrokerError(f"downloaded Kafka {version} jars failed verification: {'; '.join(problems)}")
        jars = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((tmp / "lib").glob("*.jar"))}
        (tmp / MANIFEST).write_text(json.dumps({"version": version, "jars": jars,
                                                "fetched": time.time(),
                                                "seconds": round(time.monotonic() - start, 1)}, indent=1))
        if force and home.exists():
            shutil.rmtree(home)
        elif home.exists() and not kafka_is_fetched(version, home):
            stale = home.with_name(f".{home.name}.stale-{os.getpid()}")
            home.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(home)
        except OSError:
            if not kafka_is_fetched(version, home):  # a concurrent fetch did not win either
                raise
        if progress:
            print(f"sparkmpi: Kafka {version}: {len(jars)} jars in {home / 'lib'} "
                  f"({time.monotonic() - start:.1f} s)", file=progress, flush=True)
        return home
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- broker

@dataclass
class BrokerInfo:
    """What ``broker.json`` records about a broker started by :func:`start_broker`."""

    pid: int
    host: str
    port: int
    controller_port: int
    data_dir: str
    version: str
    started: float
    start_seconds: float = 0.0

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return Path(self.data_dir) / LOG_FILE


@dataclass
class BrokerStatus:
    running: bool
    bootstrap: str | None
    pid: int | None
    data_dir: str | None
    detail: str


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding.

    Same form as ``kafka-storage.sh random-uuid`` (which never starts with
    '-'), without the cost of starting a JVM just for it.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _server_properties(data_dir: Path, port: int, controller_port: int, host: str = HOST) -> str:
    return "\n".join([
        "# written by sparkmpi kafka start; edits are overwritten",
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{host}:{controller_port}",
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        f"log.dirs={data_dir / 'logs'}",
        "auto.create.topics.enable=false",
        "num.partitions=1",
        "default.replication.factor=1",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=4",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "transaction.state.log.num.partitions=4",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        # detector frames can be MBs: allow 64 MB batches
        "message.max.bytes=67108864",
        "replica.fetch.max.bytes=67108864",
        "socket.request.max.bytes=134217728",
        # small footprint on a shared 2-core machine
        "num.network.threads=2",
        "num.io.threads=2",
        "num.recovery.threads.per.data.dir=1",
        "background.threads=2",
        "log.retention.hours=24",
        "",
    ])


def _log4j_properties(data_dir: Path) -> str:
    return "\n".join([
        "status = warn",
        "appender.file.type = File",
        "appender.file.name = FILE",
        f"appender.file.fileName = {data_dir / LOG_FILE}",
        "appender.file.layout.type = PatternLayout",
        "appender.file.layout.pattern = [%d] %p %m (%c)%n",
        "rootLogger.level = INFO",
        "rootLogger.appenderRef.file.ref = FILE",
        "logger.kafka.name = org.apache.kafka",
        "logger.kafka.level = INFO",
        "",
    ])


def _tail(path: Path, lines: int = 12) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _log_tail(data_dir: Path) -> str:
    parts = []
    for name in (OUT_FILE, LOG_FILE):
        tail = _tail(data_dir / name)
        if tail:
            parts.append(f"--- last lines of {data_dir / name}:\n{tail}")
    return "\n".join(parts) or f"(no log written in {data_dir})"


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie child is reaped and counts as gone)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    return pid_running(pid)


def _is_our_broker(pid: int, data_dir: Path) -> bool:
    """``pid`` is a java process running kafka.Kafka with ``data_dir``'s properties."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _alive(pid)  # no /proc: trust the pid file
    return b"kafka.Kafka" in cmdline and str(data_dir / "server.properties").encode() in cmdline


def _read_state(data_dir: Path) -> BrokerInfo | None:
    try:
        return BrokerInfo(**json.loads((data_dir / STATE_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").exists() else shutil.which("java")
    if not java:
        raise BrokerError("java is not on PATH (and JAVA_HOME is not set): Kafka needs Java 17 or newer")
    return java


def _format_storage(java: str, classpath: str, data_dir: Path, timeout: float) -> None:
    if (data_dir / "logs" / "meta.properties").exists():
        return  # formatted by an earlier start: keep the topics and offsets
    cmd = [java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
           f"-Dlog4j2.configurationFile={data_dir / 'log4j2.properties'}", "-cp", classpath,
           "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(data_dir / "server.properties")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BrokerError(f"formatting Kafka storage in {data_dir / 'logs'} took more than {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise BrokerError(f"formatting Kafka storage in {data_dir / 'logs'} failed (exit {proc.returncode}):\n{tail}")


def start_broker(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, port: int = DEFAULT_PORT, *,
                 version: str = DEFAULT_VERSION, heap: str = DEFAULT_HEAP, timeout: float = 60.0,
                 home: Path | None = None, fetch: bool = True, die_with_parent: bool = False,
                 progress=None, host: str = HOST) -> BrokerInfo:
    """Start a single-node KRaft broker on ``host`` (127.0.0.1) as a daemon; return its :class:`BrokerInfo`.

    Parameters
    ----------
    data_dir : path
        Folder for the configuration, the logs (``broker.log``), the pid record
        (``broker.json``) and the topic data (``logs/``).  Reused across starts:
        topics and committed offsets survive a restart.
    port : int
        Client port; 0 picks a free one.  The controller listens on another
        free port.
    version : str
        Kafka version (fetched on first use when ``fetch``).
    heap : str
        JVM maximum heap, e.g. ``"512m"``.
    timeout : float
        Seconds to wait for the broker to answer.
    host : str
        The address the broker listens on and advertises: 127.0.0.1, or an
        address other machines reach (the testbed's bridge address for ranks
        on simulated hosts).
    die_with_parent : bool
        Linux: the kernel kills the broker when the calling process dies (tests,
        demos), so a crashed caller leaves no broker behind.  False (the CLI):
        the broker is a daemon that outlives the command.

    Raises
    ------
    BrokerError
        Already running from ``data_dir``, port busy, Java missing, storage
        formatting failed, or the broker exited or did not answer in time
        (with the last lines of its log).
    """
    _check_version(version)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgument(f"port: expected an integer in 0..65535 (0 = any free port), got {port!r}")
    if not isinstance(heap, str) or not _HEAP_RE.match(heap):
        raise InvalidArgument(f"heap: expected a JVM size like '512m' or '1g', got {heap!r}")
    if not timeout > 0:
        raise InvalidArgument(f"timeout: expected seconds > 0, got {timeout!r}")
    if not isinstance(host, str) or not host or any(c in host for c in " ,/:"):
        raise InvalidArgument(f"host: expected an IPv4 address or host name such as '127.0.0.1', got {host!r}")
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    old = _read_state(data_dir)
    if old is not None and _alive(old.pid) and _is_our_broker(old.pid, data_dir):
        raise BrokerError(f"a broker from {data_dir} is already running at {old.bootstrap} (pid {old.pid}); "
                          f"`sparkmpi kafka stop --data-dir {data_dir}` first")
    home = Path(home) if home else kafka_home(version)
    if not kafka_is_fetched(version, home):
        if not fetch:
            raise BrokerError(f"Kafka {version} is not fetched into {home}: run `sparkmpi kafka fetch`")
        fetch_kafka(version, home, progress=progress)
    java = _java()
    try:
        if port == 0:
            port = free_port(host)
        elif _port_in_use(host, port):
            raise BrokerError(f"port {port} on {host} is in use; pick another with --port (0 = any free port)")
        controller_port = free_port(host)
    except OSError as exc:
        raise BrokerError(f"cannot listen on host {host!r}: {exc} (no interface of this machine has it?)") from None
    while controller_port == port:
        controller_port = free_port(host)
    (data_dir / "server.properties").write_text(_server_properties(data_dir, port, controller_port, host))
    (data_dir / "log4j2.properties").write_text(_log4j_properties(data_dir))
    classpath = str(home / "lib" / "*")
    started = time.time()
    t0 = time.monotonic()
    _format_storage(java, classpath, data_dir, timeout)
    cmd = [java, f"-Xmx{heap}", "-Xms64m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
           "-XX:-UsePerfData", f"-Dlog4j2.configurationFile={data_dir / 'log4j2.properties'}",
           f"-Dkafka.logs.dir={data_dir}", "-cp", classpath, "kafka.Kafka", str(data_dir / "server.properties")]
    with open(data_dir / OUT_FILE, "ab") as out:
        proc = subprocess.Popen(with_parent_death(cmd) if die_with_parent else cmd, cwd=data_dir,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    info = BrokerInfo(pid=proc.pid, host=host, port=port, controller_port=controller_port,
                      data_dir=str(data_dir), version=version, started=started)
    (data_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=1))
    def exited() -> None:
        if proc.poll() is not None:
            _CHILDREN.pop(proc.pid, None)
            (data_dir / STATE_FILE).unlink(missing_ok=True)
            raise BrokerError(f"the Kafka broker exited with status {proc.returncode} "
                              f"{time.monotonic() - t0:.1f} s after start (data dir {data_dir}):\n"
                              f"{_log_tail(data_dir)}")

    try:
        retry(lambda left: check_broker(info.bootstrap, timeout=min(1.0, left)),
              what="reach the new Kafka broker at", address=info.bootstrap,
              timeout=max(t0 + timeout - time.monotonic(), 0.1), retry_on=(BrokerUnavailable,),
              first_delay=0.05, max_delay=0.25, check=exited)
    except RetryTimeout as exc:
        exited()
        stop_broker(data_dir, grace=5.0)
        raise BrokerError(f"{exc}; stopped it:\n{_log_tail(data_dir)}") from exc
    info.start_seconds = round(time.monotonic() - t0, 3)
    (data_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=1))
    return info


def stop_broker(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *, grace: float = 20.0,
                timeout: float = 10.0) -> bool:
    """Stop the broker started from ``data_dir``: SIGTERM, SIGKILL after ``grace`` s, wait.

    Returns True if a broker was stopped, False if none was running.

    Raises
    ------
    BrokerError
        If the process is still there ``timeout`` s after SIGKILL.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    info = _read_state(data_dir)
    if info is None:
        return False
    pid = info.pid
    if not _alive(pid) or not _is_our_broker(pid, data_dir):
        _CHILDREN.pop(pid, None)
        (data_dir / STATE_FILE).unlink(missing_ok=True)
        return False
    try:
        stop_process(_CHILDREN.pop(pid, None) or pid, grace, kill_timeout=timeout)
    except ProcessError as exc:
        raise BrokerError(f"Kafka broker pid {pid} ({data_dir}): {exc}") from exc
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    return True


def broker_status(data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *, bootstrap: str | None = None,
                  timeout: float = 3.0) -> BrokerStatus:
    """Whether a broker runs (from ``data_dir``'s record, or at ``bootstrap``) and answers."""
    if bootstrap is not None:
        try:
            n = check_broker(bootstrap, timeout=timeout)
        except BrokerUnavailable as exc:
            return BrokerStatus(False, bootstrap, None, None, str(exc))
        return BrokerStatus(True, bootstrap, None, None, f"{n} broker(s) answered at {bootstrap}")
    data_dir = Path(data_dir).expanduser().resolve()
    info = _read_state(data_dir)
    if info is None:
        return BrokerStatus(False, None, None, str(data_dir), f"no broker started from {data_dir}")
    if not _alive(info.pid) or not _is_our_broker(info.pid, data_dir):
        return BrokerStatus(False, info.bootstrap, info.pid, str(data_dir),
                            f"broker pid {info.pid} from {data_dir} is not running (stale {STATE_FILE})")
    try:
        check_broker(info.bootstrap, timeout=timeout)
    except BrokerUnavailable as exc:
        return BrokerStatus(False, info.bootstrap, info.pid, str(data_dir),
                            f"process {info.pid} runs but does not answer: {exc}")
    return BrokerStatus(True, info.bootstrap, info.pid, str(data_dir),
                        f"running at {info.bootstrap} (pid {info.pid}, Kafka {info.version})")


def resolve_bootstrap(bootstrap: str | None, data_dir: str | os.PathLike = DEFAULT_DATA_DIR) -> str:
    """``bootstrap`` if given, else the address of the broker started from ``data_dir``."""
    if bootstrap:
        return bootstrap
    info = _read_state(Path(data_dir).expanduser().resolve())
    if info is None:
        raise BrokerUnavailable(f"no --bootstrap given and no broker started from {Path(data_dir).resolve()}: "
                                f"run `sparkmpi kafka start` or pass --bootstrap host:port")
    return info.bootstrap


class LocalBroker:
    """A broker started for the duration of a ``with`` block (tests, demos).

    >>> with LocalBroker(tmp_path, port=0) as broker:   # doctest: +SKIP
    ...     print(broker.bootstrap)
    """

    def __init__(self, data_dir, port: int = 0, **options):
        self.data_dir = Path(data_dir)
        self.port = port
        self.options = {"die_with_parent": True, **options}
        self.info: BrokerInfo | None = None

    @property
    def bootstrap(self) -> str:
        if self.info is None:
            raise BrokerError("the broker is not started")
        return self.info.bootstrap

    def start(self) -> "LocalBroker":
        self.info = start_broker(self.data_dir, self.port, **self.options)
        return self

    def stop(self) -> None:
        if self.info is not None:
            stop_broker(self.data_dir)
            self.info = None

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
