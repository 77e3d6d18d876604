"""``sparkmpi demo`` end to end on a small scan: real broker, Spark, MPI, both reconstructions."""

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_small_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "sparkmpi.cli", "demo", "--out", str(out), "--frames", "96", "--frame-size", "48",
           "--rate", "200", "--tomo-size", "48", "--tomo-angles", "37", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, PYSPARK_PYTHON=sys.executable))
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["stream"]["frames"] == 96 and summary["stream"]["dead_letters"] == 0
    assert summary["stream"]["batches"] >= 1
    assert summary["ptycho"]["nrmse"] < 0.05
    history = summary["ptycho"]["history"]
    assert history[-1]["frames"] == 96 and history[-1]["coverage"] == 1.0
    # Quality is reported over the part of the object scanned so far (coverage apart).
    assert [h["coverage"] for h in history] == sorted(h["coverage"] for h in history)
    assert all(h["nrmse"] < 0.3 for h in history), history
    assert summary["tomo"]["rmse"] < 0.2
    for path in list(summary["ptycho"]["files"].values()) + list(summary["tomo"]["files"].values()):
        assert os.path.getsize(path) > 0, path
    assert json.loads((out / "summary.json").read_text())["ptycho"]["nrmse"] == summary["ptycho"]["nrmse"]
    assert (out / "live" / "latest.json").exists()
    # Progress went to stderr, step by step.
    assert "[6/6" in done.stderr, done.stderr[-4000:]
    # A note per batch that added frames (the first may hold fewer frames than ranks and add none yet).
    assert re.search(r"batch \d+: \+\d+ frames \(\d+ received\)", done.stderr), done.stderr[-4000:]
    # Nothing left running: no broker, no rank processes of this run.
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not leftovers, leftovers


def test_demo_rejects_bad_options(capsys):
    from sparkmpi.cli import main

    assert main(["demo", "--ranks", "99"]) == 2
    assert "--ranks must be in 1.." in capsys.readouterr().err
