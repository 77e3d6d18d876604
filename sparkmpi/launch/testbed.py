"""A test cluster of simulated hosts on this machine: ``sparkmpi testbed up|down|status``.

The thin adapter around :mod:`sparkmpi.launch.testbed_plan`: it runs the
plan's ``ip`` commands, starts a Spark standalone master on the bridge
address and one worker per host namespace (each under its own host name and
``/dev/shm``, see :func:`~sparkmpi.launch.testbed_plan.host_wrapper`), and
records what it started in a state file under :data:`STATE_DIR`, so
``sparkmpi testbed down`` works from another process.  Needs root and
``ip netns``; :func:`unavailable_reason` says why it cannot run here.

Teardown (:meth:`Testbed.down`) stops the workers and the master with their
process groups, kills whatever still runs in a host namespace (executors,
ranks), deletes the namespaces (their veth pairs and mounts go with them)
and the bridge; every step runs even when an earlier one failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

from .._proc import free_port, pid_running, stop_process
from ..errors import InvalidArgument, ProcessError, SparkMPIError
from . import testbed_plan
from .standalone import spark_home
from .testbed_plan import Host, Plan

STATE_DIR = "/run/sparkmpi-testbed"
DEFAULT_NAME = "cli"


class TestbedError(SparkMPIError):
    """The simulated hosts could not be built, started or removed."""

    __test__ = False  # not a pytest test class


def unavailable_reason() -> str | None:
    """Why a testbed cannot run here (not root, no ``ip``/``unshare``), or None."""
    if os.geteuid() != 0:
        return "the multi-host testbed needs root (network namespaces); run as root, as CI does"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"the multi-host testbed needs {tool!r} on PATH (iproute2 / util-linux)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'ip netns' does not work here: {probe.stderr.strip()}"
    return None


def _ip(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise TestbedError(f"{' '.join(cmd)!r} failed: {done.stderr.strip()}")
    return done


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def namespace_pids(namespace: str) -> list[int]:
    """Processes living in the network namespace ``namespace`` (empty when it is gone)."""
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def process_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Testbed:
    """One running (or planned) testbed; built by :func:`up`, found again by :func:`load`."""

    plan: Plan
    master_port: int = 0
    webui_port: int = 0
    cores: tuple = (1,)     # per host
    log_dir: str = ""
    pids: dict = field(default_factory=dict)     # role -> [pid, start time]
    _procs: dict = field(default_factory=dict, repr=False)

    @property
    def master_url(self) -> str:
        return f"spark://{self.plan.bridge_address}:{self.master_port}"

    @property
    def hosts(self) -> tuple:
        return self.plan.hosts

    def host(self, index: int) -> Host:
        return self.plan.hosts[index - 1]

    def spark_conf(self) -> dict:
        """Driver settings for a session on this testbed (the driver on the bridge address)."""
        return {"spark.driver.host": self.plan.bridge_address,
                "spark.driver.bindAddress": self.plan.bridge_address,
                # No spark.executor.cores: each worker runs one executor with all its cores, so
                # Spark's one-task-per-executor rounds spread ranks over hosts.
                "spark.executor.memory": "512m",
                "spark.cores.max": str(sum(self.cores)),
                "spark.ui.enabled": "false",
                "spark.executorEnv.PYTHONPATH": os.environ.get("PYTHONPATH", "")}

    def driver_environment(self) -> dict:
        """Environment for a driver process: Spark binds to the bridge address."""
        return {"SPARK_LOCAL_IP": self.plan.bridge_address, "PYSPARK_PYTHON": sys.executable}

    # ------------------------------------------------------------------ state
    def state_path(self) -> str:
        return os.path.join(STATE_DIR, f"{self.plan.name}.json")

    def save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        data = {"plan": self.plan.to_dict(), "master_port": self.master_port, "webui_port": self.webui_port,
                "cores": self.cores, "log_dir": self.log_dir, "pids": self.pids}
        tmp = self.state_path() + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, self.state_path())

    # ------------------------------------------------------------------ processes
    def _spawn(self, role: str, argv: list[str], env: dict) -> None:
        log = open(os.path.join(self.log_dir, f"{role}.log"), "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        log.close()
        self._procs[role] = proc
        self.pids[role] = [proc.pid, _start_time(proc.pid)]

    def _spark_env(self, local_ip: str) -> dict:
        return dict(os.environ, SPARK_HOME=spark_home(), SPARK_LOCAL_IP=local_ip, SPARK_NO_DAEMONIZE="1",
                    SPARK_LOG_DIR=self.log_dir, PYSPARK_PYTHON=sys.executable)

    def _start_spark(self, memory: str) -> None:
        spark_class = os.path.join(spark_home(), "bin", "spark-class")
        bridge = self.plan.bridge_address
        self._spawn("master", [spark_class, "org.apache.spark.deploy.master.Master", "--host", bridge,
                               "--port", str(self.master_port), "--webui-port", str(self.webui_port)],
                    self._spark_env(bridge))
        for h in self.plan.hosts:
            work = os.path.join(self.log_dir, f"work-{h.index}")
            os.makedirs(work, exist_ok=True)
            worker = [spark_class, "org.apache.spark.deploy.worker.Worker", self.master_url,
                      "--host", h.address, "--cores", str(self.cores[h.index - 1]), "--memory", memory,
                      "--webui-port", "0", "--work-dir", work]
            self._spawn(f"worker-{h.index}", ["ip", "netns", "exec", h.namespace,
                                              *testbed_plan.host_wrapper(h.hostname, worker)],
                        self._spark_env(h.address))

    def alive_workers(self) -> list[str]:
        """Addresses of the workers the master reports ALIVE (empty while it is not answering)."""
        url = f"http://{self.plan.bridge_address}:{self.webui_port}/json/"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                state = json.load(r)
        except (OSError, ValueError):
            return []
        return sorted(w.get("host", "") for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def wait_for_workers(self, count: int | None = None, timeout: float = 90.0) -> None:
        """Until ``count`` (default: every host's) workers are ALIVE; TestbedError after ``timeout`` s."""
        count = len(self.plan.hosts) if count is None else count
        deadline = time.monotonic() + timeout
        while len(self.alive_workers()) < count:
            for role, proc in self._procs.items():
                if proc.poll() is not None:
                    raise TestbedError(f"Spark {role} exited with status {proc.returncode}; "
                                       f"see {self.log_dir}/{role}.log")
            if time.monotonic() > deadline:
                raise TestbedError(f"the testbed's master at {self.master_url} had {len(self.alive_workers())} "
                                   f"live worker(s) of {count} after {timeout:.0f} s; logs in {self.log_dir}")
            time.sleep(0.3)

    def _live(self, role: str) -> int | None:
        pid, start = self.pids.get(role, (None, None))
        if pid is None or not pid_running(pid) or _start_time(pid) != start:
            return None
        return pid

    # ------------------------------------------------------------------ host faults (for tests, bench)
    def host_pids(self, index: int) -> list[int]:
        """Every process on host ``index`` (its worker, executors, Python workers, ranks)."""
        return namespace_pids(self.host(index).namespace)

    def executor_pids(self, index: int) -> list[int]:
        return [p for p in self.host_pids(index) if "CoarseGrainedExecutorBackend" in process_cmdline(p)]

    def link(self, index: int, up: bool) -> None:
        """Set host ``index``'s link up or down (its veth end on the bridge)."""
        h = self.host(index)
        _ip(self.plan.link_up_command(h) if up else self.plan.link_down_command(h))

    def signal_host(self, index: int, sig: int) -> list[int]:
        """Send ``sig`` to every process on host ``index`` (SIGSTOP freezes the host); the pids."""
        pids = self.host_pids(index)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def restart_worker(self, index: int, memory: str = "1g") -> None:
        """Start host ``index``'s worker again (after it was killed) and wait until it is ALIVE."""
        h = self.host(index)
        role = f"worker-{index}"
        old = self._procs.pop(role, None)
        if old is not None:
            stop_process(old, grace=2.0, group=True)
        spark_class = os.path.join(spark_home(), "bin", "spark-class")
        worker = [spark_class, "org.apache.spark.deploy.worker.Worker", self.master_url,
                  "--host", h.address, "--cores", str(self.cores[index - 1]), "--memory", memory,
                  "--webui-port", "0", "--work-dir", os.path.join(self.log_dir, f"work-{index}")]
        self._spawn(role, ["ip", "netns", "exec", h.namespace, *testbed_plan.host_wrapper(h.hostname, worker)],
                    self._spark_env(h.address))
        self.save()
        deadline = time.monotonic() + 60
        while h.address not in self.alive_workers():
            if time.monotonic() > deadline:
                raise TestbedError(f"the worker of {h.hostname} did not come back within 60 s")
            time.sleep(0.3)

    def refresh(self) -> None:
        """Take the pids from the state file (another process may have restarted a worker)."""
        try:
            with open(self.state_path()) as fh:
                pids = json.load(fh)["pids"]
        except (OSError, ValueError, KeyError):
            return
        for role, entry in pids.items():
            if self.pids.get(role) != entry:
                self.pids[role] = entry
                replaced = self._procs.pop(role, None)
                if replaced is not None:
                    replaced.poll()    # reap it if it is gone (it was killed: a fault test)

    def start_on_host(self, index: int, role: str, argv: list[str], env: dict | None = None,
                      hosts_file: str = "") -> None:
        """Start ``argv`` as host ``index``'s process 1 (instead of a Spark worker: ``up(spark=False)``),
        recorded as ``role`` (``<name>-<index>``) for teardown."""
        h = self.host(index)
        self._spawn(role, ["ip", "netns", "exec", h.namespace, *testbed_plan.host_wrapper(h.hostname, argv, hosts_file)],
                    dict(os.environ, **(env or {})))
        self.save()

    def host_init_pid(self, index: int) -> int | None:
        """The pid (as the root namespace numbers it) of host ``index``'s process 1: the child that
        ``unshare`` forked into the host's namespaces (None when the host is not running)."""
        roles = [r for r in self.pids if r.endswith(f"-{index}") and r != "master"]
        outer = next((pid for pid in map(self._live, sorted(roles)) if pid is not None), None)
        if outer is None:
            return None
        try:
            with open(f"/proc/{outer}/task/{outer}/children") as fh:
                children = fh.read().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def launcher_script(self) -> str:
        """Write the ``ssh`` stand-in for Hydra into the log folder; its path (see
        :func:`~sparkmpi.launch.testbed_plan.launcher_script`)."""
        self.refresh()
        pids = {}
        for h in self.plan.hosts:
            pid = self.host_init_pid(h.index)
            if pid is None:
                raise TestbedError(f"the worker of {h.hostname} is not running; no process to enter that host by")
            pids[h.address] = pid
        path = os.path.join(self.log_dir, "enter-host.sh")
        with open(path, "w") as fh:
            fh.write(testbed_plan.launcher_script(pids))
        os.chmod(path, 0o755)
        return path

    # ------------------------------------------------------------------ teardown
    def down(self) -> list[str]:
        """Remove everything; returns one line per step that failed (empty: all gone)."""
        problems: list[str] = []
        self.refresh()
        for h in self.plan.hosts:      # a frozen host would ignore SIGTERM
            self.signal_host(h.index, signal.SIGCONT)
        roles = sorted(self.pids, key=lambda r: r == "master")   # workers first, the master last
        for role in roles:
            proc = self._procs.get(role)
            target = proc if proc is not None else self._live(role)
            if target is None:
                continue
            try:
                stop_process(target, grace=5.0, group=True)
            except ProcessError as exc:
                problems.append(f"{role}: {exc}")
        for h in self.plan.hosts:
            for pid in namespace_pids(h.namespace):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while namespace_pids(h.namespace) and time.monotonic() < deadline:
                time.sleep(0.05)
            if namespace_pids(h.namespace):
                problems.append(f"processes still in {h.namespace}: {namespace_pids(h.namespace)}")
        existing_ns = set(_ip(["ip", "netns", "list"], check=False).stdout.split())
        existing_links = set(_links())
        for cmd in self.plan.down_commands():
            target = cmd[-1]
            if target not in existing_ns and target not in existing_links:
                continue
            done = _ip(cmd, check=False)
            if done.returncode != 0 and (target in set(_ip(["ip", "netns", "list"], check=False).stdout.split())
                                          or target in _links()):
                problems.append(f"{' '.join(cmd)!r}: {done.stderr.strip()}")
        self.pids.clear()
        self._procs.clear()
        try:
            os.unlink(self.state_path())
        except FileNotFoundError:
            pass
        return problems

    def leftovers(self) -> list[str]:
        """What of this testbed still exists: namespaces, links, processes (empty when it is gone)."""
        found = []
        namespaces = set(_ip(["ip", "netns", "list"], check=False).stdout.split())
        links = set(_links())
        for name in sorted(self.plan.names()):
            if name in namespaces:
                found.append(f"network namespace {name}")
            if name in links:
                found.append(f"link {name}")
        for role in self.pids:
            if self._live(role) is not None:
                found.append(f"process {role} ({self.pids[role][0]})")
        for h in self.plan.hosts:
            if h.namespace in namespaces and namespace_pids(h.namespace):
                found.append(f"processes in {h.namespace}")
        return found

    def describe(self) -> dict:
        return {"name": self.plan.name, "master": self.master_url, "bridge": self.plan.bridge,
                "bridge_address": self.plan.bridge_address, "log_dir": self.log_dir,
                "workers_alive": self.alive_workers(),
                "hosts": [{"hostname": h.hostname, "namespace": h.namespace, "address": h.address}
                          for h in self.plan.hosts]}


def _links() -> list[str]:
    done = _ip(["ip", "-o", "link", "show"], check=False)
    return [line.split(": ")[1].split("@")[0] for line in done.stdout.splitlines() if ": " in line]


def new_name() -> str:
    return "t" + uuid.uuid4().hex[:4]


def up(hosts: int, name: str | None = None, *, cores: int | tuple = 1, memory: str = "1g",
       second_interface: bool = False, timeout: float = 90.0, spark: bool = True) -> Testbed:
    """Build the network of ``hosts`` simulated hosts and start Spark on it; torn down on failure.

    ``cores`` is each host's worker's core count, one for all or a tuple with one per host.
    ``spark=False`` builds the network only; start each host's process 1 with
    :meth:`Testbed.start_on_host` (the SLURM test starts ``slurmd`` there).

    Raises
    ------
    TestbedError
        Not root, ``ip netns`` missing, a testbed of that name exists, or Spark did not start.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise TestbedError(reason)
    per_host = (cores,) * hosts if isinstance(cores, int) and not isinstance(cores, bool) else tuple(cores)
    if len(per_host) != hosts or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1
                                         for c in per_host):
        raise InvalidArgument(f"cores: expected an integer >= 1 or {hosts} of them (one per host), got {cores!r}")
    name = new_name() if name is None else name
    if os.path.exists(os.path.join(STATE_DIR, f"{name}.json")):
        raise TestbedError(f"a testbed named {name!r} is up already; 'sparkmpi testbed down --name {name}'")
    in_use = testbed_plan.subnets_in_use(_ip(["ip", "-o", "-4", "addr", "show"]).stdout)
    bed = Testbed(plan=testbed_plan.plan(name, hosts, in_use), cores=per_host,
                  log_dir=tempfile.mkdtemp(prefix=f"sparkmpi-testbed-{name}-"))
    try:
        bed.save()
        for cmd in bed.plan.up_commands(second_interface=second_interface):
            _ip(cmd)
        if spark:
            bed.master_port = free_port(bed.plan.bridge_address)
            bed.webui_port = free_port(bed.plan.bridge_address)
            bed._start_spark(memory)
            bed.save()
            bed.wait_for_workers(timeout=timeout)
    except BaseException:
        bed.down()
        raise
    return bed


def load(name: str = DEFAULT_NAME) -> Testbed:
    """The testbed ``name`` that some process brought up (from its state file)."""
    path = os.path.join(STATE_DIR, f"{name}.json")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise TestbedError(f"no testbed named {name!r} is up (no {path})") from None
    return Testbed(plan=Plan.from_dict(data["plan"]), master_port=data["master_port"],
                   webui_port=data["webui_port"], cores=tuple(data["cores"]) if isinstance(data["cores"], list)
                   else (data["cores"],) * len(data["plan"]["hosts"]), log_dir=data["log_dir"],
                   pids=data["pids"])


def names_up() -> list[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(STATE_DIR) if f.endswith(".json"))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------- the command line
def register(subparsers) -> None:
    parser = subparsers.add_parser("testbed", help="simulated hosts (network namespaces) with Spark on them")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    p_up = verbs.add_parser("up", help="build N hosts and start a Spark master and one worker per host")
    p_up.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    p_up.add_argument("--cores", type=int, default=1, help="cores per host's worker (default 1)")
    p_up.add_argument("--name", default=DEFAULT_NAME, help=f"testbed name (default {DEFAULT_NAME!r})")
    p_up.add_argument("--second-interface", action="store_true",
                      help="give each host a second, non-routed interface (eth1)")
    p_up.set_defaults(func=_cmd_up)
    p_down = verbs.add_parser("down", help="stop Spark and remove the hosts")
    p_down.add_argument("--name", default=None, help="testbed name (default: every testbed that is up)")
    p_down.set_defaults(func=_cmd_down)
    p_status = verbs.add_parser("status", help="what is up")
    p_status.add_argument("--name", default=None, help="testbed name (default: all)")
    p_status.set_defaults(func=_cmd_status)


def _print(args, data) -> None:
    print(json.dumps(data, indent=None if args.json else 1, sort_keys=True))


def _cmd_up(args) -> int:
    bed = up(args.hosts, args.name, cores=args.cores, second_interface=args.second_interface)
    _print(args, bed.describe())
    if not args.quiet:
        print(f"driver: SPARK_LOCAL_IP={bed.plan.bridge_address} and master {bed.master_url}; "
              f"'sparkmpi testbed down --name {bed.plan.name}' removes it", file=sys.stderr)
    return 0


def _cmd_down(args) -> int:
    names = [args.name] if args.name else names_up()
    failed = []
    for name in names:
        failed += load(name).down()
    if failed:
        raise TestbedError("teardown incomplete: " + "; ".join(failed))
    _print(args, {"removed": names})
    return 0


def _cmd_status(args) -> int:
    names = [args.name] if args.name else names_up()
    _print(args, {"testbeds": [load(n).describe() for n in names]})
    return 0
