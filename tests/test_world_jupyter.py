"""A world used from a real Jupyter kernel: a function defined in one cell runs on the ranks from the next."""

from __future__ import annotations

import os
import sys

import ipykernel  # noqa: F401  (the kernel the test starts; a test dependency)
import jupyter_client  # noqa: F401


def _run_cell(client, code: str, timeout: float = 180.0):
    """Execute ``code``; return (stdout text, stderr text, reply content)."""
    streams = {"stdout": [], "stderr": []}
    results = []

    def hook(message):
        kind, content = message["header"]["msg_type"], message["content"]
        if kind == "stream":
            streams[content["name"]].append(content["text"])
        elif kind == "execute_result":
            results.append(content["data"].get("text/plain", ""))
        elif kind == "error":
            streams["stderr"].append("\n".join(content["traceback"]))

    reply = client.execute_interactive(code, output_hook=hook, timeout=timeout)
    return "".join(streams["stdout"]), "".join(streams["stderr"]), reply["content"], results


def test_a_world_from_a_jupyter_kernel():
    from jupyter_client.manager import start_new_kernel

    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    manager, client = start_new_kernel(kernel_name="python3", env=env, startup_timeout=120)
    try:
        out, err, reply, _ = _run_cell(client, (
            "import sys, sparkmpi\n"
            f"assert sys.executable == {sys.executable!r}, sys.executable\n"
            "spark = sparkmpi.spark_session('local[2]', conf={'spark.ui.enabled': 'false'})\n"
            "world = sparkmpi.World(spark, ranks=2)\n"))
        assert reply["status"] == "ok", err
        out, err, reply, _ = _run_cell(client, (
            "offset = 40\n"
            "def where_am_i(comm, state, x):\n"
            "    state['calls'] = state.get('calls', 0) + 1\n"
            "    print(f'rank {comm.rank} of {comm.size} got {x}')\n"
            "    return comm.rank + x + offset, state['calls']\n"))
        assert reply["status"] == "ok", err
        out, err, reply, results = _run_cell(client, "world.call(where_am_i, 2)\nworld.call(where_am_i, 2)")
        assert reply["status"] == "ok", err
        assert results == ["[(42, 2), (43, 2)]"]
        assert "[0] rank 0 of 2 got 2\n" in out and "[1] rank 1 of 2 got 2\n" in out
        out, err, reply, _ = _run_cell(client, "world.close(); spark.stop(); print(world.closed)")
        assert reply["status"] == "ok", err
        assert out.strip().endswith("True")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
        for context in {id(c): c for c in (client.context, manager.context)}.values():
            context.destroy(linger=0)   # its signalling sockets would outlive the test
        _close_jupyter_event_loop()


def _close_jupyter_event_loop() -> None:
    """jupyter_client's blocking calls run on an event loop jupyter_core keeps for the
    process; close it (and its self-pipe) so the test leaves nothing open."""
    import asyncio

    from jupyter_core import utils

    loop = utils._loop.get()
    if loop is not None and not loop.is_running():
        loop.close()
        utils._loop.set(None)
        asyncio.set_event_loop(None)
