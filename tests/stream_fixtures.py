"""A real Kafka broker for the streaming driver's tests (session scope).

``conftest.py`` imports the fixture, once for every module (a module importing it
itself would get a broker of its own).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparkmpi.stream.broker import fetch_kafka, start_broker, stop_broker


def java_processes_using(data_dir: Path) -> list[int]:
    """Live java processes whose command line names ``data_dir``'s server.properties."""
    marker = str(Path(data_dir) / "server.properties").encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline.split(b"\0") and state != "Z":
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A single-node KRaft broker on a free 127.0.0.1 port; stopped (and checked gone) at the end."""
    fetch_kafka()
    data_dir = tmp_path_factory.mktemp("kafka-driver")
    info = start_broker(data_dir, 0, timeout=90, die_with_parent=True)
    try:
        yield info
    finally:
        stop_broker(data_dir, grace=15)
        assert java_processes_using(data_dir) == [], "a Kafka broker process outlived the test session"
