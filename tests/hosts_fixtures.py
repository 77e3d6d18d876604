"""The multi-host testbed for tests: simulated hosts, Spark on them, a driver process on the bridge.

``testbed`` (module scope) brings up :data:`CORES` workers' worth of hosts, each
with a second interface (``eth1``) that leads nowhere,
and tears them down after the module, also when a test failed, then checks
that no namespace, link or process of it is left.  ``hosts_driver`` is a
:class:`Driver` talking to ``tests/hosts/driver.py`` in its own process; ``bridge_broker`` the Kafka
broker on the bridge address.
"""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client

import pytest

import leaks
from sparkmpi._proc import stop_process

HERE = os.path.dirname(__file__)
#: Cores of each host's worker: 2 + 2 + 1 slots, so 2 ranks spread over 2 hosts, 5 fill 2 + 2 + 1.
CORES = (2, 2, 1)
NETWORK_INTERFACE = "eth0"


def skip_reason():
    from sparkmpi.launch.testbed import unavailable_reason

    return unavailable_reason()


class Driver:
    """The tests' handle on the driver process: ``call(name, **kwargs)`` runs ``jobs.name``."""

    def __init__(self, bed, timeout=150):
        self.bed = bed
        self.address = os.path.join(tempfile.mkdtemp(prefix="sparkmpi-hosts-driver-"), "socket")
        key = secrets.token_bytes(16)
        # Every host also has eth1, which leads nowhere: the jobs must keep to eth0.
        env = dict(os.environ, **bed.driver_environment(), SPARKMPI_NETWORK_INTERFACE=NETWORK_INTERFACE)
        self.log = open(os.path.join(bed.log_dir, "driver.log"), "w+")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "hosts", "driver.py"), bed.plan.name,
                                      self.address, key.hex()], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.key, self.deadline = key, time.monotonic() + timeout

    def wait_ready(self):
        """Until the driver listens (its session has an executor on every host), then connect."""
        while not os.path.exists(self.address):
            if self.proc.poll() is not None or time.monotonic() > self.deadline:
                raise RuntimeError(f"the testbed's driver did not start; its log:\n{self.tail()}")
            time.sleep(0.2)
        self.conn = Client(self.address, authkey=self.key)
        leaks.ALLOWANCES.unix_paths.add(self.address)

    def tail(self, chars=4000):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-chars:]

    def call(self, name, timeout=120, **kwargs):
        """``("ok", result, s)`` or ``("error", type, message, attrs, s)`` of ``jobs.name``."""
        self.conn.send((name, kwargs))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{name} did not answer within {timeout} s; driver log:\n{self.tail()}")
        return self.conn.recv()

    def ok(self, name, **kwargs):
        answer = self.call(name, **kwargs)
        assert answer[0] == "ok", answer
        return answer[1]

    def close(self):
        conn = getattr(self, "conn", None)
        if conn is not None:
            try:
                conn.send(("stop", {}))
            except OSError:
                pass
            conn.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        stop_process(self.proc, grace=5.0, group=True)
        self.log.close()
        shutil.rmtree(os.path.dirname(self.address), ignore_errors=True)


@pytest.fixture(scope="module")
def testbed():
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from sparkmpi.launch import testbed as tb

    bed = tb.up(len(CORES), cores=CORES, second_interface=True)
    leaks.ALLOWANCES.process_roots.update(pid for pid, _ in bed.pids.values())
    try:
        yield bed
    finally:
        problems = bed.down()
        left = bed.leftovers()
        assert not problems and not left, f"the testbed was not removed: {problems} {left}"
        shutil.rmtree(bed.log_dir, ignore_errors=True)     # its logs, kept only when teardown failed


@pytest.fixture(scope="module")
def hosts_driver(testbed, tmp_path_factory):
    """The driver process, and beside it (``.broker``) the project's Kafka broker listening on the
    bridge address, where the hosts reach it; the broker starts while the driver's JVM does."""
    from stream_fixtures import java_processes_using

    from sparkmpi.stream.broker import fetch_kafka, start_broker, stop_broker

    driver = Driver(testbed)
    leaks.ALLOWANCES.process_roots.add(driver.proc.pid)
    broker_dir = None
    try:
        fetch_kafka()
        broker_dir = tmp_path_factory.mktemp("kafka-bridge")
        driver.broker = start_broker(broker_dir, 0, host=testbed.plan.bridge_address, timeout=90,
                                     die_with_parent=True)
        driver.wait_ready()
        yield driver
    finally:
        driver.close()
        if broker_dir is not None:
            stop_broker(broker_dir, grace=15)
            assert java_processes_using(broker_dir) == [], "the bridge's Kafka broker outlived its module"


@pytest.fixture(scope="module")
def bridge_broker(hosts_driver):
    """The Kafka broker on the testbed's bridge (see ``hosts_driver``)."""
    return hosts_driver.broker
