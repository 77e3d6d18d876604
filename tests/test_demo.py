"""``sparkmpi demo`` end to end on a small scan: real broker, Spark, MPI, both reconstructions."""

import json
import os
import re
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

import leaks

pytestmark = pytest.mark.slow

# The demo's figures at this size are in BENCHMARKS.md ("Demo, small scan"); bounds are ~1.5-2x them.
FRAMES, FRAME_SIZE, TOMO_SIZE, TOMO_ANGLES = 96, 48, 48, 37
PTYCHO_NRMSE_MAX = 0.005         # recorded 0.0027 (whole scan, after the final refinement)
PTYCHO_HISTORY_NRMSE_MAX = 0.2   # worst live entry recorded 0.103 (the first batch: few frames, 10 iterations)
TOMO_RMSE_MAX = 0.175            # recorded 0.1195; an all-zero volume scores 0.206, a constant one 0.190
#: What the demo runs, by how the leak check sees it: each must be seen while it runs, none after.
KINDS = {"rank": lambda p: p.comm == leaks.RANK_NAME, "fork server": lambda p: p.comm == leaks.ZYGOTE_NAME,
         "Spark JVM": lambda p: "org.apache.spark.deploy.SparkSubmit" in p.cmdline,
         "Kafka broker": lambda p: "kafka.Kafka" in p.cmdline,
         "Python worker": lambda p: any(m.decode() in p.cmdline for m in leaks.SPARK_WORKER_MARKERS)}


def _kinds(procs):
    return {kind for p in procs for kind, match in KINDS.items() if match(p)}


def ptycho_quality_problems(summary) -> list[str]:
    """What in the demo's ptychography summary misses its bound (empty when every bound holds)."""
    problems = []
    if not summary["nrmse"] < PTYCHO_NRMSE_MAX:
        problems.append(f"object NRMSE {summary['nrmse']:.4f} >= {PTYCHO_NRMSE_MAX}")
    worst = max(h["nrmse"] for h in summary["history"])
    if not worst < PTYCHO_HISTORY_NRMSE_MAX:
        problems.append(f"a live reconstruction's NRMSE {worst:.4f} >= {PTYCHO_HISTORY_NRMSE_MAX}")
    return problems


def tomo_quality_problems(summary) -> list[str]:
    return [] if summary["rmse"] < TOMO_RMSE_MAX else [f"volume RMSE {summary['rmse']:.4f} >= {TOMO_RMSE_MAX}"]


def test_demo_small_end_to_end(tmp_path):
    out = tmp_path / "demo"
    tag = f"demo-{uuid.uuid4().hex[:12]}"
    cmd = [sys.executable, "-m", "sparkmpi.cli", "demo", "--out", str(out), "--frames", str(FRAMES),
           "--frame-size", str(FRAME_SIZE), "--rate", "200", "--tomo-size", str(TOMO_SIZE),
           "--tomo-angles", str(TOMO_ANGLES), "--json"]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, **{leaks.TAG_VARIABLE: tag})
    with open(tmp_path / "stdout", "w+") as stdout, open(tmp_path / "stderr", "w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env)
        seen = set()
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None:   # watch what runs, by the tag every process of the demo inherits
                assert time.monotonic() < deadline, "the demo took more than 240 s"
                seen |= _kinds(leaks.processes(proc.pid, tag)[0].values())
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    assert proc.returncode == 0, err_text[-4000:]
    # Nothing outlives the demo: no rank, fork server, Spark JVM or worker, broker (found by the tag).
    assert seen == set(KINDS), f"the check saw only {sorted(seen)} while the demo ran"
    left, every = leaks.processes(proc.pid, tag)
    deadline = time.monotonic() + 10
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left, every = leaks.processes(proc.pid, tag)
    assert not left, "\n".join(p.describe(every) for p in left.values())

    summary = json.loads(out_text.strip().splitlines()[-1])
    assert summary["stream"]["frames"] == FRAMES and summary["stream"]["dead_letters"] == 0
    assert summary["stream"]["batches"] >= 1
    history = summary["ptycho"]["history"]
    assert history[-1]["frames"] == FRAMES and history[-1]["coverage"] == 1.0
    # Quality is reported over the part of the object scanned so far (coverage apart).
    assert [h["coverage"] for h in history] == sorted(h["coverage"] for h in history)
    assert ptycho_quality_problems(summary["ptycho"]) == []
    assert tomo_quality_problems(summary["tomo"]) == []
    for path in list(summary["ptycho"]["files"].values()) + list(summary["tomo"]["files"].values()):
        assert os.path.getsize(path) > 0, path
    assert json.loads((out / "summary.json").read_text())["ptycho"]["nrmse"] == summary["ptycho"]["nrmse"]
    assert (out / "live" / "latest.json").exists()
    # Progress went to stderr, step by step.
    assert "[6/6" in err_text, err_text[-4000:]
    # A note per batch that added frames (the first may hold fewer frames than ranks and add none yet).
    assert re.search(r"batch \d+: \+\d+ frames \(\d+ received\)", err_text), err_text[-4000:]


def test_blank_and_wrong_results_fail_the_demo_bounds():
    """Each bound rejects what a broken pipeline would give: an all-zero or constant volume, the blank
    (free-space) object, random phases, a shifted object, a noise volume."""
    from sparkmpi.ptycho import simulate
    from sparkmpi.ptycho.metrics import illuminated_mask, nrmse
    from sparkmpi.tomo.algorithms import rmse
    from sparkmpi.tomo.simulate import shepp_logan_3d

    phantom = shepp_logan_3d(TOMO_SIZE)
    noise = np.random.default_rng(0).uniform(0, 1, phantom.shape).astype(phantom.dtype)
    for wrong in (np.zeros_like(phantom), np.full_like(phantom, phantom.mean()), noise):
        assert tomo_quality_problems({"rmse": rmse(wrong, phantom)}), "a wrong volume passed the bound"
    assert tomo_quality_problems({"rmse": rmse(phantom, phantom)}) == []

    scan = simulate(frames=FRAMES, frame_size=FRAME_SIZE, seed=0)
    mask = illuminated_mask(scan)
    truth = scan.object_true
    rng = np.random.default_rng(0)
    wrongs = {"blank": np.ones_like(truth), "shifted": np.roll(truth, 3, axis=1),
              "noise": np.exp(1j * rng.uniform(-np.pi, np.pi, truth.shape)).astype(truth.dtype)}
    for name, wrong in wrongs.items():
        score = nrmse(wrong, truth, mask)
        summary = {"nrmse": score, "history": [{"nrmse": score}]}
        assert len(ptycho_quality_problems(summary)) == 2, (name, score)
    assert ptycho_quality_problems({"nrmse": 0.0, "history": [{"nrmse": 0.0}]}) == []


def test_demo_rejects_bad_options(capsys):
    from sparkmpi.cli import main

    assert main(["demo", "--ranks", "99"]) == 2
    assert "--ranks must be in 1.." in capsys.readouterr().err


def test_live_iterations_fit_the_budget_after_the_call_overhead():
    from sparkmpi.demo import iterations_within

    # 0.12 s budget, 0.02 s of call overhead, 0.01 s per iteration: 10 fit, capped at 8.
    assert iterations_within(0.12, 0.01, 0.02, most=10) == 10
    assert iterations_within(0.12, 0.01, 0.02, most=8) == 8
    assert iterations_within(0.12, 0.02, 0.02, most=10) == 5
    # A call whose overhead alone passes the budget still refines once.
    assert iterations_within(0.12, 0.01, 0.5, most=10) == 1
