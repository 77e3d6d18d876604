"""What a person sees: a command's own progress on the terminal, the rest in its log file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sparkmpi._proc import free_port

# Lines that belong in the log file, never on the terminal.
NOISE = re.compile(r"log4j|WARN|WARNING|NativeCodeLoader|incubator|Setting default log level|%\d\|\d+\.\d+\||"
                   r"rdkafka|py4j", re.IGNORECASE)


def _sparkmpi(args, cwd, timeout=240):
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    env.pop("SPARKMPI_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "sparkmpi.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def _log_path(stderr: str) -> str:
    match = re.search(r"^sparkmpi: messages of Spark, the JVM and Kafka go to (\S+)$", stderr, re.M)
    assert match, f"no log-file line in:\n{stderr}"
    return match.group(1)


def test_a_spark_command_shows_only_its_own_progress(tmp_path):
    done = _sparkmpi(["--json", "tomo", "simulate", "--size", "16", "--angles", "10", "--out", "t.tif"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_angles"] == 10          # --json before the command
    log = tmp_path / "run.log"
    done = _sparkmpi(["tomo", "reconstruct", "t.tif", "--algorithm", "art", "--spark-partitions", "2",
                      "--out", "o", "--json", "--log-file", str(log)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["mode"] == "spark-slices"
    terminal = done.stdout + done.stderr
    assert not [line for line in terminal.splitlines() if NOISE.search(line)], terminal
    assert "tomo art" in done.stderr                          # its own progress is there
    assert _log_path(done.stderr) == str(log)
    text = log.read_text()
    assert NOISE.search(text), f"the JVM's and Spark's lines are not in the log:\n{text}"


def test_quiet_and_a_dead_broker_show_one_error_line(tmp_path):
    bootstrap = f"127.0.0.1:{free_port()}"
    done = _sparkmpi(["kafka", "status", "--bootstrap", bootstrap, "--timeout", "2", "--json"], tmp_path)
    terminal = done.stdout + done.stderr
    assert not [line for line in terminal.splitlines() if NOISE.search(line)], terminal
    assert json.loads(done.stdout)["running"] is False
    done = _sparkmpi(["--quiet", "tomo", "simulate", "--size", "16", "--angles", "10", "--out", "q.tif"], tmp_path)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("argv", [["--verbose", "view"], ["view", "--verbose"]])
def test_global_options_work_before_and_after_the_command(argv, tmp_path):
    from sparkmpi.cli import build_parser

    args = build_parser().parse_args([*argv, "x.tif"])
    assert args.verbose is True and args.json is False and args.quiet is False and args.log_file is None
