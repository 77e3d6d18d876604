"""``sparkmpi testbed``: the commands' answers without bringing hosts up (that is test_hosts.py's)."""

import json

from sparkmpi.cli import main
from sparkmpi.launch import testbed


def test_down_of_a_testbed_that_is_not_up_names_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(testbed, "STATE_DIR", str(tmp_path))
    assert main(["testbed", "down", "--name", "nope"]) == 1
    assert "no testbed named 'nope' is up" in capsys.readouterr().err


def test_status_and_down_with_nothing_up(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(testbed, "STATE_DIR", str(tmp_path / "absent"))
    assert main(["testbed", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"testbeds": []}
    assert main(["testbed", "down", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": []}


def test_up_refuses_bad_arguments_before_touching_the_network(capsys, monkeypatch):
    monkeypatch.setattr(testbed, "unavailable_reason", lambda: None)
    assert main(["testbed", "up", "--hosts", "0", "--name", "zz"]) == 1
    assert "hosts: expected 1..16, got 0" in capsys.readouterr().err
    assert main(["testbed", "up", "--hosts", "2", "--cores", "0", "--name", "zz"]) == 1
    assert "cores: expected an integer >= 1" in capsys.readouterr().err


def test_without_root_up_says_why(capsys, monkeypatch):
    monkeypatch.setattr(testbed.os, "geteuid", lambda: 1000)
    assert main(["testbed", "up", "--hosts", "2", "--name", "zz"]) == 1
    assert "needs root" in capsys.readouterr().err
