"""Settings precedence and the command line's contract (exit codes, one-line errors)."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from sparkmpi.cli import main
from sparkmpi.config import Settings, load_settings
from sparkmpi.errors import ConfigError, InvalidArgument, SparkMPIError


def test_precedence_argument_over_environment_over_default():
    assert load_settings({}).start_timeout == Settings().start_timeout
    assert load_settings({"SPARKMPI_START_TIMEOUT": "5"}).start_timeout == 5.0
    assert load_settings({"SPARKMPI_START_TIMEOUT": "5"}, start_timeout=7).start_timeout == 7
    assert load_settings({"SPARKMPI_JOB_TIMEOUT": "none"}).job_timeout is None
    assert load_settings({"SPARKMPI_JOB_TIMEOUT": "2.5"}).job_timeout == 2.5


@pytest.mark.parametrize("env, fragment", [
    ({"SPARKMPI_START_TIMOUT": "5"}, "unknown environment variable SPARKMPI_START_TIMOUT"),
    ({"SPARKMPI_PMI_PORT": "http"}, "SPARKMPI_PMI_PORT='http' is not a valid"),
    ({"SPARKMPI_PMI_PORT": "70000"}, "pmi_port must be in 0..65535"),
    ({"SPARKMPI_JOB_TIMEOUT": "-1"}, "job_timeout must be > 0"),
    ({"SPARKMPI_WARM_POOL": "-2"}, "warm_pool must be in 0..64"),
    ({"SPARKMPI_SINGLE_HOST_NETMOD": "tcp"}, "single_host_netmod must be one of"),
])
def test_bad_settings_are_named(env, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_settings(env)


def test_unknown_override_and_replace():
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_settings({}, colour="red")
    assert Settings().replace(warm_pool=0).warm_pool == 0
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings().replace(nope=1)


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "bench" in capsys.readouterr().out


def test_usage_error_exits_two_with_one_line(capsys):
    assert main(["bench", "allreduce", "--ranks", "999"]) == 2
    err = capsys.readouterr().err
    assert "--ranks must be in 1.." in err and "Traceback" not in err


def test_an_argument_refused_by_its_own_type_check_is_a_usage_error(capsys, tmp_path):
    assert main(["ptycho", "simulate", "--photons", "-1", str(tmp_path / "scan.npz")]) == 2
    err = capsys.readouterr().err
    assert "--photons must be > 0 or 'none', got '-1'" in err and "Traceback" not in err
    assert not (tmp_path / "scan.npz").exists()


def test_unknown_command_exits_two(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


@pytest.mark.slow
def test_bench_allreduce_json_end_to_end():
    cmd = [sys.executable, "-m", "sparkmpi.cli", "bench", "allreduce", "--ranks", "2", "--elements", "200000",
           "--repeat", "3", "--jobs", "2", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, PYSPARK_PYTHON=sys.executable))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("collect_s", "allreduce_s", "native_allreduce_s", "job_s", "trivial_barrier_job_s",
                "collect_over_allreduce", "allreduce_over_native"):
        assert report[key] > 0, key
    assert report["ranks"] == 2 and report["elements"] == 200000
    rounds = report["rounds"]
    assert len(rounds["allreduce_s"]) == len(rounds["native_allreduce_s"]) == 2
    assert report["collect_over_allreduce"] == pytest.approx(
        statistics.median(c / a for c, a in zip(rounds["collect_s"], rounds["allreduce_s"])))
    assert report["allreduce_over_native"] == pytest.approx(
        statistics.median(a / b for a, b in zip(rounds["allreduce_s"], rounds["native_allreduce_s"])))


def _failing_view(monkeypatch, exc):
    import sparkmpi.viz.cli as viz_cli

    def fail(args):
        raise exc

    monkeypatch.setattr(viz_cli, "_view", fail)


def test_a_bug_shows_its_traceback_and_says_so(monkeypatch, capsys):
    _failing_view(monkeypatch, ValueError("an internal shape mismatch"))
    assert main(["view", "x.tif"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: an internal shape mismatch" in err
    assert "this is a bug in sparkmpi" in err and "sparkmpi: error:" not in err


@pytest.mark.parametrize("exc", [InvalidArgument("size: expected an integer >= 16, got 3"),
                                 FileNotFoundError(2, "No such file or directory", "missing.tif")])
def test_user_errors_are_one_line(monkeypatch, capsys, exc):
    _failing_view(monkeypatch, exc)
    assert main(["view", "x.tif"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"sparkmpi: error: {exc}" and "Traceback" not in err


def test_library_argument_errors_are_sparkmpi_errors_and_value_errors():
    from sparkmpi.stream.broker import start_broker

    with pytest.raises(InvalidArgument, match="port: expected an integer") as info:
        start_broker("/nonexistent", port=-1)
    assert isinstance(info.value, ValueError) and isinstance(info.value, SparkMPIError)


def test_process_settings_go_through_the_loader(monkeypatch):
    from sparkmpi.backend import get_backend
    from sparkmpi.config import setting
    from sparkmpi.stream.broker import kafka_home

    monkeypatch.setenv("SPARKMPI_FFT_WORKERS", "3")
    assert get_backend("numpy").fft_workers == 3
    monkeypatch.setenv("SPARKMPI_FFT_WORKERS", "0")
    assert get_backend("numpy").fft_workers == (os.cpu_count() or 1)
    monkeypatch.setenv("SPARKMPI_FFT_WORKERS", "-2")
    with pytest.raises(ConfigError, match="fft_workers must be an integer >= 0"):
        get_backend("numpy").fft_workers
    monkeypatch.setenv("SPARKMPI_KAFKA_HOME", "/somewhere/kafka")
    assert str(kafka_home()) == "/somewhere/kafka"
    monkeypatch.setenv("SPARKMPI_RANK_IDLE_EXIT_S", "30")
    assert load_settings(environ={"SPARKMPI_RANK_IDLE_EXIT_S": "30"}).rank_idle_exit_s == 30.0
    assert setting("rank_idle_exit_s") == 30.0 and setting("rank_idle_exit_s", environ={}) == 900.0
    with pytest.raises(ConfigError, match="unknown setting 'nope'"):
        setting("nope")


@pytest.mark.parametrize("value, on", [("0", False), ("no", False), ("1", True), ("true", True)])
def test_sparkmpi_verbose_zero_means_off(monkeypatch, capsys, value, on):
    import sparkmpi.viz.cli as viz_cli

    def fail(args):
        raise InvalidArgument("size: expected an integer >= 16, got 3")

    monkeypatch.setattr(viz_cli, "_view", fail)
    monkeypatch.setenv("SPARKMPI_VERBOSE", value)
    assert main(["view", "x.tif"]) == 1
    assert ("Traceback" in capsys.readouterr().err) == on


@pytest.mark.parametrize("name", ["SPARKMPI_HOME", "SPARKMPI_TEST_STANDALONE"])
def test_names_nothing_reads_are_unknown(name):
    with pytest.raises(ConfigError, match=f"unknown environment variable {name}"):
        load_settings(environ={name: "1"})
