"""A Spark standalone cluster on this machine, started from pyspark's own scripts.

Used by the tests and handy on a workstation: a master and workers bound to
127.0.0.1, each started with ``bin/spark-class`` from the installed pyspark
(the same thing ``start-master.sh`` does), and torn down with their process
groups.  On a SLURM allocation the same two classes are started by ``srun``;
see the README's SLURM recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

from .._proc import free_port, stop_process


def spark_home() -> str:
    """The installed pyspark's directory (it holds ``bin/spark-class`` and the jars)."""
    import pyspark

    return os.path.dirname(pyspark.__file__)


@dataclass
class LocalCluster:
    """Master plus ``workers`` workers with ``cores`` cores each, on 127.0.0.1."""

    workers: int = 1
    cores: int = 2
    memory: str = "1g"
    host: str = "127.0.0.1"
    start_timeout: float = 90.0
    processes: list = field(default_factory=list)
    log_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="sparkmpi-cluster-"))

    def __post_init__(self):
        if self.workers < 1 or self.cores < 1:
            raise ValueError(f"workers and cores must be >= 1, got {self.workers} and {self.cores}")
        self.port = free_port(self.host)
        self.webui_port = free_port(self.host)

    @property
    def master_url(self) -> str:
        return f"spark://{self.host}:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> None:
        env = dict(os.environ, SPARK_HOME=spark_home(), SPARK_LOCAL_IP=self.host,
                   SPARK_NO_DAEMONIZE="1", SPARK_LOG_DIR=self.log_dir)
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen([os.path.join(spark_home(), "bin", "spark-class"), *args],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        log.close()
        self.processes.append((name, proc))

    def alive_workers(self) -> int:
        """Workers the master reports ALIVE (0 while it is not answering)."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.webui_port}/json/", timeout=2) as r:
                state = json.load(r)
        except (OSError, ValueError):
            return 0
        return sum(1 for w in state.get("workers", []) if w.get("state") == "ALIVE")

    def start(self) -> "LocalCluster":
        self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", self.host,
                               "--port", str(self.port), "--webui-port", str(self.webui_port)])
        for i in range(self.workers):
            self._spawn(f"worker-{i}", ["org.apache.spark.deploy.worker.Worker", self.master_url,
                                        "--host", self.host, "--cores", str(self.cores),
                                        "--memory", self.memory, "--webui-port", "0"])
        deadline = time.monotonic() + self.start_timeout
        while self.alive_workers() < self.workers:
            for name, proc in self.processes:
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"Spark {name} exited with status {proc.returncode}; "
                                       f"see {self.log_dir}/{name}.log")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the local Spark cluster at {self.master_url} had no {self.workers} "
                                   f"live worker(s) after {self.start_timeout:.0f} s; logs in {self.log_dir}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        """Terminate every process group (executors included), kill stragglers, reap them."""
        for _, proc in reversed(self.processes):
            stop_process(proc, grace=10.0, group=True)
        self.processes.clear()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
