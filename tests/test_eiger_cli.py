"""The Eiger verbs of ``sparkmpi detector``: usage errors exit 2 naming the flag; a REST address with no
detector behind it is a one-line error (exit 1) naming the URL."""

from __future__ import annotations

import pytest

from sparkmpi._proc import free_port
from sparkmpi.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["detector", "bridge", "--from", "tcp://127.0.0.1:1", "--topic", "t", "--partitions", "0",
      "--bootstrap", "127.0.0.1:9"], "--partitions"),
    (["detector", "bridge", "--from", "tcp://127.0.0.1:1", "--topic", "t", "--series", "0",
      "--bootstrap", "127.0.0.1:9"], "--series"),
    (["detector", "send", "--frames", "0"], "--frames"),
    (["detector", "send", "--frame-shape", "12"], "--frame-shape"),
    (["detector", "send", "--thresholds", "0"], "--thresholds"),
    (["detector", "acquire", "--rest", "nohostport"], "--rest"),
])
def test_usage_errors(argv, needle, capsys):
    assert main(argv) == 2
    assert needle in capsys.readouterr().err


def test_acquire_without_a_detector_names_the_url(capsys):
    port = free_port()
    assert main(["detector", "acquire", "--rest", f"127.0.0.1:{port}", "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "timed out" in err
