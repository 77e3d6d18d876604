"""MPI across simulated hosts: network namespaces with their own host names and /dev/shm.

One testbed (3 hosts with 2, 2 and 1 cores) and one driver process serve the
whole module; each job is compared with what one process computes.
"""

import numpy as np
import pytest

from hosts_fixtures import CORES, bridge_broker, hosts_driver, testbed  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


def _expected_checksum(size):
    one = np.arange(200_000, dtype=np.float32).astype(np.float64).sum()
    return one * sum(r + 1 for r in range(size))


def _check_placement(result, size, records):
    assert [r["rank"] for r in result] == list(range(size))
    assert all(r["size"] == size for r in result)
    assert all(r["total"] == float(sum(range(records))) for r in result)
    assert all(r["big_checksum"] == _expected_checksum(size) for r in result)
    hosts = [r["host"] for r in result]
    assert all(r["hosts_seen"] == hosts for r in result)
    # COMM_TYPE_SHARED groups are exactly the ranks on one (simulated) host.
    for r in result:
        assert r["node_ranks"] == [o["rank"] for o in result if o["host"] == r["host"]]
    return hosts


def test_two_hosts_one_rank_each(hosts_driver, testbed):
    result = hosts_driver.ok("placement", ranks=2, records=10)
    hosts = _check_placement(result, 2, 10)
    assert len(set(hosts)) == 2 and set(hosts) <= {h.hostname for h in testbed.hosts}


def test_three_hosts_unequal_ranks_share_memory_only_within_a_host(hosts_driver, testbed):
    size = sum(CORES)
    result = hosts_driver.ok("placement", ranks=size, records=50)
    hosts = _check_placement(result, size, 50)
    counts = sorted(hosts.count(h) for h in set(hosts))
    assert counts == sorted(CORES)      # 2 + 2 + 1: shared memory inside, the network between
    assert any(len(r["node_ranks"]) == 2 for r in result) and any(len(r["node_ranks"]) == 1 for r in result)


def test_a_persistent_world_across_hosts_its_ucx_addresses_segmented_over_pmi_keys(hosts_driver):
    from sparkmpi.pmi.space import VALLEN_MAX

    out = hosts_driver.ok("world_calls", ranks=3, factors=[1.0, 2.5, -1.0])
    assert len(set(out["hosts"])) == 3     # one rank per host: Spark offers one task per executor a round
    # A UCX worker address is longer than a PMI value may be (vallen_max): MPICH puts
    # "segments=N" under the rank's allgather key and the address in N pieces, which every rank
    # gets and joins again (else no Allreduce below would work).
    (keys,) = out["pmi_keys"]
    assert all(len(v) <= VALLEN_MAX for v in keys.values())
    for rank in range(3):
        head = keys[f"-allgather-1-{rank}"]
        assert head.startswith("segments="), head
        n = int(head.split("=")[1])
        assert n > 1 and all(f"-allgather-1-{rank}-seg-{i}/{n}" in keys for i in range(1, n + 1)), sorted(keys)
    for i, factor in enumerate([1.0, 2.5, -1.0]):
        answers = out["answers"][i]
        assert [a["rank"] for a in answers] == [0, 1, 2]
        assert all(a["sum"] == factor * 6.0 and a["calls"] == i + 1 for a in answers)
        assert [a["host"] for a in answers] == out["hosts"]


def test_bench_allreduce_pointed_at_the_testbed_master_reports_its_figures(hosts_driver, testbed):
    out = hosts_driver.ok("bench_allreduce", ranks=2, elements=200_000)
    assert out["code"] == 0, out
    report = out["report"]
    assert report["master"] == testbed.master_url and report["ranks"] == 2, report
    for key in ("allreduce_s", "native_allreduce_s", "collect_s", "job_s", "trivial_barrier_job_s"):
        assert 0 < report[key] < 60, (key, report)


def test_mpi_tomography_across_hosts_equals_one_process(hosts_driver, tmp_path):
    tmp_path.chmod(0o755)
    out = hosts_driver.ok("tomography", ranks=len(CORES), folder=str(tmp_path))
    assert out["ranks"] == len(CORES) and out["max_abs_diff"] < 1e-5, out


def test_distributed_ptychography_across_hosts_equals_one_process(hosts_driver, tmp_path):
    tmp_path.chmod(0o755)
    out = hosts_driver.ok("ptychography", ranks=len(CORES), folder=str(tmp_path))
    assert out["ranks"] == len(CORES) and out["frames_per_rank"] == [24, 24, 24], out
    assert out["object_rel_diff"] < 1e-4, out


def test_a_compiled_program_under_run_program_spans_the_hosts(hosts_driver, testbed, tmp_path):
    """``sparkmpi exec``'s path (run_program) with a C program: one MPI_COMM_WORLD over three hosts,
    shared memory only within a host, an Allreduce over the network between them."""
    tmp_path.chmod(0o755)
    out = hosts_driver.ok("program", ranks=len(CORES), folder=str(tmp_path))
    assert out["returncode"] == 0 and out["exit_codes"] == [0] * len(CORES), out
    expected = sum((r + 1.0) for r in range(len(CORES))) * sum(range(200_000))
    rows = [line.split() for text in out["stdout"] for line in text.splitlines()]
    assert [int(row[1]) for row in rows] == list(range(len(CORES))), out["stdout"]
    hosts = [row[5] for row in rows]
    assert set(hosts) <= {h.hostname for h in testbed.hosts} and len(set(hosts)) >= 2, hosts
    for row in rows:
        assert row[3] == str(len(CORES)) and float(row[9]) == expected, row
        assert int(row[7]) == hosts.count(row[5]), rows    # the shared-memory group is the host


def test_a_kafka_stream_whose_batches_span_hosts_exactly_once(hosts_driver, testbed, bridge_broker, tmp_path):
    """The micro-batch driver's own world (mode="world") with its two ranks on two hosts, reading
    their offset ranges from the broker on the bridge: every frame once, each result as one process
    computes it."""
    import json

    from sparkmpi.stream._output import list_outputs, read_outputs
    from sparkmpi.stream.detector import SyntheticScan, publish_kafka

    tmp_path.chmod(0o755)
    n, shape, topic = 300, (16, 16), "hosts-stream"
    scan = SyntheticScan(n, shape, "uint16", seed=5, scan_id="hosts")
    publish_kafka(scan, bridge_broker.bootstrap, topic, partitions=2)
    out = tmp_path / "out"
    report = hosts_driver.ok("stream", bootstrap=bridge_broker.bootstrap, topic=topic, out=str(out))
    assert report["stopped"] == "end_of_scan" and report["frames"] == n and report["dead_letters"] == 0, report
    assert report["batches"] == -(-(n + 2) // 100) and len(report["world_hosts"]) == report["batches"]
    # One world for the stream, its two ranks on two hosts.
    world_hosts = {tuple(h) for h in report["world_hosts"]}
    assert len(world_hosts) == 1 and len(set(next(iter(world_hosts)))) == 2, report["world_hosts"]
    summary = read_outputs(out)
    assert summary.lost_and_duplicated(np.arange(n)) == (0, 0), "frames lost or duplicated"
    assert sorted(summary.frame_index.tolist()) == list(range(n))
    total = np.zeros(shape)
    for _, path in list_outputs(out):
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            assert sum(r["end"] - r["start"] for r in meta["ranges"]) == meta["messages"]
            if z["frame_index"].size == 0:      # the end-of-scan markers' batch
                continue
            frames = np.stack([scan.frame(i) for i in z["frame_index"]]).astype(np.float64)
            np.testing.assert_allclose(z["result.intensity"], frames.sum(axis=(1, 2)))
            np.testing.assert_allclose(z["result.sum_image"], frames.sum(axis=0))   # Allreduce across hosts
            assert len(set(z["result.host"].tolist())) == 2, "a batch ran on one host only"
            total += z["result.sum_image"]
    np.testing.assert_allclose(total, sum(scan.frame(i).astype(np.float64) for i in range(n)))


def _check_lost_host(report, testbed, index, within):
    error = report["error"]
    assert error is not None and error["type"] == "JobFailed", report
    host = testbed.host(index).hostname
    assert report["detected_s"] is not None and report["detected_s"] < within, report
    if report["fault"] != "sigkill":
        assert "no contact for" in error["message"] and host in error["message"], error
        assert f"rank {error['rank']} on host {host}" in error["message"], error
    else:
        assert f"on {host}" in error["message"] and error["rank"] is not None, error
    # The next job on every host (the link back, the host thawed, the worker restarted) works.
    _check_placement(report["next"], sum(CORES), 10)
    assert len({r["host"] for r in report["next"]}) == len(CORES)


@pytest.mark.parametrize("fault, within", [("link_down", 8.0), ("sigstop", 8.0)])
def test_a_silent_host_fails_the_job_within_host_timeout(hosts_driver, testbed, fault, within):
    report = hosts_driver.ok("lost_host", fault=fault, host=3, host_timeout=4.0)
    _check_lost_host(report, testbed, 3, within)


def test_a_killed_host_fails_the_job_in_seconds_and_two_hosts_x_two_ranks_run_the_next(hosts_driver, testbed):
    report = hosts_driver.ok("lost_host", fault="sigkill", host=3)
    _check_lost_host(report, testbed, 3, 8.0)
    # The survivors' job is 2 hosts x 2 ranks (host 3 gone, hosts 1 and 2 with 2 cores each): shared
    # memory inside each host, the network between them, COMM_TYPE_SHARED groups = the hosts.
    survivors = report["survivors"]
    hosts = _check_placement(survivors, CORES[0] + CORES[1], 10)
    assert sorted(hosts.count(h) for h in set(hosts)) == [2, 2], hosts
    assert set(hosts) == {testbed.host(1).hostname, testbed.host(2).hostname}
    assert all(len(r["node_ranks"]) == 2 for r in survivors)


def test_without_network_interface_the_unrouted_second_interface_fails_the_job_fast(hosts_driver):
    answer = hosts_driver.call("placement", ranks=2, records=4, network_interface="")
    assert answer[0] == "error" and answer[1] == "JobFailed", answer
    assert answer[4] < 20, answer          # MPI_Init fails ("unreachable"): no hang
    assert "unreachable" in answer[2].lower() or "No route" in answer[2], answer[2][:2000]


def test_a_network_interface_the_hosts_lack_is_named_at_once(hosts_driver, testbed):
    answer = hosts_driver.call("placement", ranks=2, records=4, network_interface="ib7")
    assert answer[0] == "error" and answer[1] == "JobFailed", answer
    assert answer[4] < 15, answer
    assert "network_interface 'ib7' does not exist on host smpi-" in answer[2], answer[2][:2000]
    assert "eth0, eth1" in answer[2]


def test_native_mpiexec_across_the_same_hosts(testbed):
    """Hydra from the mpich wheel, its ssh launcher replaced by a script entering each host."""
    import os
    import subprocess
    import sys

    from hosts_fixtures import NETWORK_INTERFACE
    from sparkmpi.bench.allreduce import mpiexec_path

    hosts = ",".join(h.address for h in testbed.hosts)
    # One line from rank 0: Hydra interleaves the ranks' output.
    code = ("import json, socket; import numpy as np; from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "s = c.Split_type(MPI.COMM_TYPE_SHARED); b = np.arange(100000, dtype='f') * (c.rank + 1); "
            "o = np.empty_like(b); c.Allreduce(b, o); "
            "rows = c.gather([str(c.rank), socket.gethostname(), str(s.size), str(float(o.astype('d').sum()))]); "
            "c.rank == 0 and print('RANKS ' + json.dumps(rows), flush=True)")
    cmd = [mpiexec_path(), "-launcher", "ssh", "-launcher-exec", testbed.launcher_script(),
           "-localhost", testbed.plan.bridge_address, "-hosts", hosts, "-n", "3", "-ppn", "1",
           "-genv", "UCX_NET_DEVICES", NETWORK_INTERFACE, sys.executable, "-c", code]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PMI_")}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    lines = [json.loads(line[6:]) for line in done.stdout.splitlines() if line.startswith("RANKS ")][0]
    expected = float(np.arange(100000, dtype=np.float32).astype(np.float64).sum() * 6)
    assert [int(r) for r, *_ in lines] == [0, 1, 2]
    assert sorted(h for _, h, _, _ in lines) == sorted(h.hostname for h in testbed.hosts)
    assert all(size == "1" and float(total) == expected for _, _, size, total in lines)
