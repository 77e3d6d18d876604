"""``sparkmpi bench stream``: detector -> Kafka -> Spark micro-batches -> MPI -> outputs.

Starts a real single-node Kafka broker in a temporary folder, then the
micro-batch driver (``sparkmpi stream run`` as a subprocess, so it can be
killed) and, once the driver reports it is ready, the detector simulator
(``sparkmpi detector simulate``, another process) publishing ``--frames``
synthetic frames at ``--rate`` (default: as fast as it can).  When the driver
has processed the end-of-scan markers, every output file is read back.

Reported:

* ``frames_per_s``: frames / (last output written - first frame produced);
* ``p50_latency_s``, ``p99_latency_s``, ``max_latency_s``: per frame, output
  written - producer timestamp;
* ``lost``, ``duplicated``: frame indices produced but absent from the outputs,
  and extra copies in them;
* the broker is warmed up first (one idempotent producer, one commit), as a
  long-running broker would be;
* the driver's per-batch means (``batch_frames``, ``batch_seconds``,
  ``job_s``, ``write_s``, ``commit_s``) to see where the time goes.

``--mode world`` (default) runs the batches on one long-lived MPI world,
``--mode jobs`` one Spark-MPI job per batch; ``--continuous`` starts the next
batch as soon as the previous one is written.

``--prefill``: the whole scan is published first, then drained once by a
world-mode driver and once by a jobs-mode driver (separate consumer groups on
the same topic): ``drain_frames_per_s`` of each, their ratio, and each mode's
per-phase means (``job_s`` = ranks reading Kafka + the MPI function, ``write_s``,
``commit_s``) to show where a batch's time goes.  The drain runs from the
first batch's start to the output of the last batch that carried frames (the
end-of-scan markers after it are not frames), and its batches are cut back
to back (as ``--continuous``: a drain has frames waiting all the time).

``--kill-driver-at 0.5``: once the outputs hold half the frames, the driver is
SIGKILLed at a random moment of its next batch, started again, and the figures
cover the whole scan (``kills``, ``restart_s``).
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .._proc import stop_process
from ..errors import UsageError

NAME = "stream"
HELP = "Kafka -> Spark micro-batches -> MPI: frames/s, latency percentiles, lost/duplicated (optionally across a kill)"


def add_arguments(parser) -> None:
    parser.add_argument("--frames", type=int, default=20000, help="frames in the scan (default: %(default)s)")
    parser.add_argument("--frame-shape", default="128x128", help="HxW (default: %(default)s)")
    parser.add_argument("--dtype", default="uint16", help="frame dtype (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=None, help="frames/s of the producer (default: as fast as possible)")
    parser.add_argument("--partitions", type=int, default=2, help="topic partitions (default: %(default)s)")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks per batch (default: %(default)s)")
    parser.add_argument("--trigger", type=float, default=None,
                        help="seconds between batches (default: 0.5, or 0.05 with --rate: cut as soon as possible)")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="cap on messages per batch (default: 5000, or 2 s of frames at --rate)")
    parser.add_argument("--mode", choices=("world", "jobs"), default="world",
                        help="world: one MPI world for the stream (default); jobs: one Spark-MPI job per batch")
    parser.add_argument("--continuous", action="store_true",
                        help="cut the next batch as soon as the previous one is written (trigger 0)")
    parser.add_argument("--prefill", action="store_true",
                        help="publish the whole scan first, then time the drain in world and in jobs mode")
    parser.add_argument("--kill-driver-at", type=float, default=None, metavar="FRACTION",
                        help="SIGKILL the driver once this fraction of the frames is processed, then restart it")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds the whole benchmark may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="work in DIR and keep the broker data, outputs and logs there")


def _mean_of(batches: list, key: str) -> float | None:
    """Mean of a per-batch figure; None where the batches do not report it (jobs mode's rank phases)."""
    values = [b[key] for b in batches if b.get(key) is not None]
    return float(np.mean(values)) if values else None


def _python() -> str:
    return sys.executable


def _driver_cmd(args, bootstrap: str, out: Path, lines: Path, mode: str | None = None,
                group: str = "bench") -> list[str]:
    cmd = [_python(), "-m", "sparkmpi.cli", "stream", "run", "--bootstrap", bootstrap, "--topic", "frames",
           "--group", group, "--out", str(out), "--ranks", str(args.ranks), "--trigger", str(args.trigger),
           "--max-frames", str(args.max_frames), "--until-end-of-scan", "--json-lines", str(lines),
           "--frame-shape", args.frame_shape, "--dtype", args.dtype, "--quiet", "--mode", mode or args.mode]
    return cmd + (["--continuous"] if args.continuous else [])


def _events(lines: Path) -> list[dict]:
    if not lines.exists():
        return []
    out = []
    for text in lines.read_text().splitlines():
        try:
            out.append(json.loads(text))
        except ValueError:
            pass  # a line being written
    return out


def _start_driver(cmd, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait_event(proc, lines: Path, predicate, deadline: float, log: Path, what: str) -> dict:
    while True:
        for event in reversed(_events(lines)):
            if predicate(event):
                return event
        if proc.poll() is not None:
            raise RuntimeError(f"the driver exited with status {proc.returncode} while {what}; "
                               f"last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]))
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out while {what}; see {log}")
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen, sig=signal.SIGKILL, wait: float = 30.0) -> None:
    """Kill the driver (and, once it is gone, whatever of its session is left: JVM, workers)."""
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    # The rest of the session gets ``wait`` s to notice the driver is gone by itself.
    stop_process(proc, wait, sig=0, group=True)


def run(args) -> dict:
    from sparkmpi.stream.kafka_client import ensure_topic
    from sparkmpi.stream._output import read_outputs
    from sparkmpi.stream.detector import parse_shape
    from sparkmpi.stream.broker import fetch_kafka, start_broker, stop_broker

    shape = parse_shape(args.frame_shape)
    if args.frames < 1:
        raise UsageError(f"--frames: expected >= 1, got {args.frames}")
    if args.kill_driver_at is not None and not 0 < args.kill_driver_at < 1:
        raise UsageError(f"--kill-driver-at: expected a fraction in (0, 1), got {args.kill_driver_at}")
    if args.trigger is None:
        args.trigger = 0.05 if args.rate else 0.5
    if args.max_frames is None:
        args.max_frames = max(100, int(2 * args.rate)) if args.rate else 5000
    deadline = time.monotonic() + args.timeout
    tmp = None
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sparkmpi-bench-stream-")
        work = Path(tmp.name)
    data_dir, out, lines, log = work / "kafka", work / "out", work / "driver.jsonl", work / "driver.log"
    fetch_kafka()
    print(f"starting a Kafka broker in {data_dir} ...", file=sys.stderr)
    info = start_broker(data_dir, 0, timeout=90, die_with_parent=True, heap="1g")
    procs: list[subprocess.Popen] = []
    try:
        bootstrap = info.bootstrap
        ensure_topic(bootstrap, "frames", args.partitions)
        # A fresh broker loads its transaction and group coordinators on first use
        # (an idempotent producer waits ~1 s for its producer id): do that now, as a
        # long-running facility broker would have, so it is not counted as latency.
        from sparkmpi.stream.detector import SyntheticScan, publish_kafka
        from sparkmpi.stream.offsets import commit_offsets, plan_batch

        publish_kafka(SyntheticScan(4, (8, 8)), bootstrap, "warmup", end_marker=False)
        commit_offsets(bootstrap, "bench-warmup", plan_batch({}, {("warmup", 0): 4}), timeout=30)
        producer_cmd = [_python(), "-m", "sparkmpi.cli", "detector", "simulate", "--bootstrap", bootstrap,
                        "--topic", "frames", "--frames", str(args.frames), "--frame-shape", args.frame_shape,
                        "--dtype", args.dtype, "--partitions", str(args.partitions), "--seed", str(args.seed),
                        "--json"] + (["--rate", str(args.rate)] if args.rate else [])
        if args.prefill:
            return _prefill(args, bootstrap, work, producer_cmd, procs, deadline)
        cmd = _driver_cmd(args, bootstrap, out, lines)
        print("starting the driver:", " ".join(cmd), file=sys.stderr)
        driver = _start_driver(cmd, log)
        procs.append(driver)
        _wait_event(driver, lines, lambda e: e.get("event") == "started", deadline, log, "starting the driver")
        print(f"driver ready; publishing {args.frames} frames of {args.frame_shape} {args.dtype} "
              f"at {args.rate or 'full'} frames/s ...", file=sys.stderr)
        producer = subprocess.Popen(producer_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        procs.append(producer)
        kills, restart_s = 0, None
        if args.kill_driver_at is not None:
            threshold = args.kill_driver_at * args.frames
            event = _wait_event(driver, lines, lambda e: e.get("event") == "batch" and e["total_frames"] >= threshold,
                                deadline, log, "waiting for the kill point")
            time.sleep(random.Random(args.seed).uniform(0, max(event["seconds"], 0.05)))
            print(f"SIGKILL the driver (pid {driver.pid}) after {event['total_frames']} frames", file=sys.stderr)
            _kill_group(driver)
            kills += 1
            before = len(_events(lines))
            t_restart = time.monotonic()
            driver = _start_driver(cmd, log)
            procs.append(driver)
            _wait_event(driver, lines, lambda e: e.get("event") == "started" and len(_events(lines)) > before,
                        deadline, log, "restarting the driver")
            restart_s = time.monotonic() - t_restart
        try:
            p_out, p_err = producer.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise TimeoutError("the producer did not finish in time") from None
        if producer.returncode != 0:
            raise RuntimeError(f"the producer failed (exit {producer.returncode}): {p_err[-2000:]}")
        published = json.loads(p_out.strip().splitlines()[-1])
        try:
            driver.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the driver did not reach the end of the scan in time; see {log}") from None
        if driver.returncode != 0:
            raise RuntimeError(f"the driver failed (exit {driver.returncode}); last lines of {log}:\n" +
                               "\n".join(log.read_text().splitlines()[-15:]))
        summary = read_outputs(out)
        lost, duplicated = summary.lost_and_duplicated(np.arange(args.frames))
        lat = summary.latencies
        first_produced = float(summary.frame_ts.min()) if summary.frame_ts.size else None
        span = (summary.last_written - first_produced) if first_produced is not None else None
        batches = [e for e in _events(lines) if e.get("event") == "batch"]
        mean = functools.partial(_mean_of, batches)
        report = {
            "frames": int(args.frames), "frame_shape": list(shape), "dtype": args.dtype,
            "rate": args.rate, "partitions": args.partitions, "ranks": args.ranks, "trigger": args.trigger,
            "mode": args.mode, "continuous": args.continuous,
            "max_frames": args.max_frames, "frames_out": int(summary.frame_index.size),
            "frames_per_s": args.frames / span if span else None,
            "p50_latency_s": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_latency_s": float(np.percentile(lat, 99)) if lat.size else None,
            "max_latency_s": float(lat.max()) if lat.size else None,
            "lost": lost, "duplicated": duplicated, "dead_letters": summary.dead_letters,
            "batches": summary.batches, "producer_frames_per_s": published["frames_per_s"],
            "batch_frames": mean("frames"), "batch_seconds": mean("seconds"), "job_s": mean("job_s"),
            "write_s": mean("write_s"), "commit_s": mean("commit_s"),
            "rank_read_s": mean("rank_read_s"), "rank_process_s": mean("rank_process_s"),
            "kill_driver_at": args.kill_driver_at, "kills": kills, "restart_s": restart_s,
            "retries": sum(1 for e in _events(lines) if e.get("event") in ("retry", "broker_retry")),
            "reconciled_batches": sum(1 for e in _events(lines) if e.get("event") == "reconciled"),
            "cpu_count": os.cpu_count(),
        }
        return report
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc)
        stop_broker(data_dir, grace=10)
        if tmp is not None:
            tmp.cleanup()


def _prefill(args, bootstrap: str, work: Path, producer_cmd: list, procs: list, deadline: float) -> dict:
    """Publish everything, then drain it in each mode; frames/s and the per-phase means side by side."""
    from sparkmpi.stream._output import read_outputs

    print(f"prefilling the topic with {args.frames} frames of {args.frame_shape} {args.dtype} ...", file=sys.stderr)
    done = subprocess.run(producer_cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=max(deadline - time.monotonic(), 1))
    if done.returncode != 0:
        raise RuntimeError(f"the producer failed (exit {done.returncode}): {done.stderr[-2000:]}")
    report: dict = {"frames": int(args.frames), "frame_shape": args.frame_shape, "dtype": args.dtype,
                    "ranks": args.ranks, "partitions": args.partitions, "max_frames": args.max_frames,
                    "trigger": 0.0, "continuous": True, "cpu_count": os.cpu_count()}
    for mode in ("world", "jobs"):
        out, lines, log = work / f"out-{mode}", work / f"driver-{mode}.jsonl", work / f"driver-{mode}.log"
        cmd = _driver_cmd(args, bootstrap, out, lines, mode=mode, group=f"bench-{mode}")
        if "--continuous" not in cmd:
            cmd.append("--continuous")
        print(f"draining in {mode} mode:", " ".join(cmd), file=sys.stderr)
        driver = _start_driver(cmd, log)
        procs.append(driver)
        try:
            driver.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the {mode}-mode driver did not drain the topic in time; see {log}") from None
        if driver.returncode != 0:
            raise RuntimeError(f"the {mode}-mode driver failed (exit {driver.returncode}); last lines of {log}:\n"
                               + "\n".join(log.read_text().splitlines()[-15:]))
        summary = read_outputs(out)
        lost, duplicated = summary.lost_and_duplicated(np.arange(args.frames))
        batches = [e for e in _events(lines) if e.get("event") == "batch" and e.get("frames")]
        started = [e for e in _events(lines) if e.get("event") == "started"][-1]
        # the drain: from the first batch's start (its output time less its duration) to the last output
        t0 = batches[0]["written_at"] - batches[0]["seconds"]
        mean = functools.partial(_mean_of, batches)
        span = batches[-1]["written_at"] - t0
        report[mode] = {"drain_frames_per_s": args.frames / span, "drain_s": span, "batches": len(batches),
                        "lost": lost, "duplicated": duplicated, "warm_up_s": started.get("warm_up_s"),
                        "batch_frames": mean("frames"), "batch_seconds": mean("seconds"), "job_s": mean("job_s"),
                        "write_s": mean("write_s"), "commit_s": mean("commit_s"),
                        "rank_read_s": mean("rank_read_s"), "rank_process_s": mean("rank_process_s")}
    report["drain_frames_per_s"] = {m: report[m]["drain_frames_per_s"] for m in ("world", "jobs")}
    report["world_over_jobs"] = report["world"]["drain_frames_per_s"] / report["jobs"]["drain_frames_per_s"]
    report["lost"] = report["world"]["lost"] + report["jobs"]["lost"]
    report["duplicated"] = report["world"]["duplicated"] + report["jobs"]["duplicated"]
    return report
