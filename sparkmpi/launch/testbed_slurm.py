"""A real SLURM cluster on the testbed's simulated hosts: munged and slurmctld on the bridge, a slurmd per host.

For the test that runs the README's ``sbatch`` recipe as written.  Debian's
``slurm-wlm`` and ``munge`` come from ``scripts/install-slurm.sh``.  Each host
runs ``slurmd -N <its host name>`` as its first process, with ``/etc/hosts``
naming every host and the controller, and the cgroup v1 hierarchies slurmd
wants mounted inside the host (``ip netns exec`` hides the root's
``/sys/fs/cgroup``).  :func:`slurm_conf` is the pure part.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from .._proc import stop_process
from . import testbed_plan
from .testbed import Testbed, TestbedError

SBIN = "/usr/sbin"
#: Mounted in each host before slurmd starts (it checks them even with proctrack/linuxproc).
CGROUP_CONTROLLERS = ("cpuset", "memory", "freezer", "devices")


def unavailable_reason() -> str | None:
    for tool in ("slurmctld", "slurmd", "munged"):
        if not os.access(os.path.join(SBIN, tool), os.X_OK):
            return f"SLURM is not installed ({SBIN}/{tool} missing): run scripts/install-slurm.sh as root"
    for tool in ("sbatch", "srun", "sinfo"):
        if shutil.which(tool) is None:
            return f"SLURM's {tool} is not on PATH: run scripts/install-slurm.sh as root"
    return None


def slurm_conf(plan: testbed_plan.Plan, controller: str, folder: str, munge_socket: str, cpus: int) -> str:
    """slurm.conf for ``plan``'s hosts as nodes (``cpus`` each), the controller ``controller`` (this
    machine's host name, which slurmctld insists on) on the bridge address; state and logs in ``folder``."""
    nodes = "\n".join(f"NodeName={h.hostname} NodeAddr={h.address} CPUs={cpus} State=UNKNOWN"
                      for h in plan.hosts)
    return f"""ClusterName=sparkmpi
SlurmctldHost={controller}({plan.bridge_address})
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool-%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/linear
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
{nodes}
PartitionName=hosts Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def cgroup_script() -> str:
    mounts = " && ".join(f"mkdir -p /sys/fs/cgroup/{c} && mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c}"
                         for c in CGROUP_CONTROLLERS)
    return ("mount -t tmpfs cgroups /sys/fs/cgroup && " + mounts +
            " && mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd"
            ' && exec "$@"')


@dataclass
class SlurmCluster:
    """munged + slurmctld in the root namespace, slurmd in each host of ``bed`` (built ``spark=False``)."""

    bed: Testbed
    cpus: int = 16
    folder: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="sparkmpi-slurm-"))
    processes: list = field(default_factory=list)

    @property
    def conf_path(self) -> str:
        return os.path.join(self.folder, "slurm.conf")

    def environment(self) -> dict:
        return dict(os.environ, SLURM_CONF=self.conf_path)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.folder, f"{name}.out"), "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.environment(), start_new_session=True)
        log.close()
        self.processes.append(proc)

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason is not None:
            raise TestbedError(reason)
        os.chmod(self.folder, 0o755)
        os.makedirs(os.path.join(self.folder, "state"))
        key = os.path.join(self.folder, "munge.key")
        with open(key, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chmod(key, 0o600)
        socket_path = os.path.join(self.folder, "munge.socket")
        controller = os.uname().nodename
        with open(self.conf_path, "w") as fh:
            fh.write(slurm_conf(self.bed.plan, controller, self.folder, socket_path, self.cpus))
        hosts_file = os.path.join(self.folder, "hosts")
        with open(hosts_file, "w") as fh:
            fh.write(testbed_plan.hosts_file_text(self.bed.plan, {controller: self.bed.plan.bridge_address}))
        f = self.folder
        self._spawn("munged", [f"{SBIN}/munged", "-F", "-f", f"--socket={socket_path}", f"--key-file={key}",
                               f"--pid-file={f}/munged.pid", f"--log-file={f}/munged.log",
                               f"--seed-file={f}/munged.seed"])
        self._spawn("slurmctld", [f"{SBIN}/slurmctld", "-D", "-i", "-f", self.conf_path])
        for h in self.bed.hosts:
            slurmd = ["sh", "-c", cgroup_script(), "sh", f"{SBIN}/slurmd", "-D", "-N", h.hostname, "-f", self.conf_path]
            self.bed.start_on_host(h.index, f"slurmd-{h.index}", slurmd, env={"SLURM_CONF": self.conf_path},
                                   hosts_file=hosts_file)
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(["sinfo", "-h", "-o", "%n %t"], env=self.environment(), capture_output=True,
                                 text=True, timeout=30)
            idle = [line.split()[0] for line in out.stdout.splitlines() if line.split()[1:] == ["idle"]]
            if len(idle) == len(self.bed.hosts):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TestbedError(f"SLURM nodes not idle after {timeout:.0f} s: {out.stdout.strip()} "
                                   f"{out.stderr.strip()}; logs in {self.folder}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop slurmctld and munged (the slurmds go with the testbed's teardown)."""
        for proc in reversed(self.processes):
            stop_process(proc, grace=5.0, group=True)
        self.processes.clear()
