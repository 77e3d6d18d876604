"""A Spark driver on the testbed's bridge, serving the multi-host tests from its own process.

pytest's process already holds the session's ``local[2]`` SparkContext (one per
process), so the multi-host tests drive the testbed through this process:
started once per module, it opens a session on the testbed's master, waits
for an executor per host, then runs the scenario functions of ``jobs.py`` that
the tests name, one at a time, over a ``multiprocessing.connection`` socket.
Each answer is ``("ok", result, seconds)`` or ``("error", type name, message,
attributes, seconds)``.
"""

import json
import os
import sys
import time
import traceback
from multiprocessing.connection import Listener

sys.path.insert(0, os.path.dirname(__file__))
import jobs  # noqa: E402  (next to this file; pickled by value for the executors)

import sparkmpi  # noqa: E402


def main():
    bed_state, address, authkey = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
    from sparkmpi.launch import testbed

    bed = testbed.load(bed_state)
    spark = sparkmpi.spark_session(bed.master_url, "sparkmpi-hosts-tests", conf=bed.spark_conf())
    jobs.wait_for_executors(spark, len(bed.hosts), timeout=90)
    with Listener(address, authkey=authkey) as listener:
        print("READY", flush=True)
        with listener.accept() as conn:
            while True:
                try:
                    name, kwargs = conn.recv()
                except EOFError:
                    break
                if name == "stop":
                    break
                started = time.monotonic()
                try:
                    result = getattr(jobs, name)(spark, bed, **kwargs)
                    conn.send(("ok", result, time.monotonic() - started))
                except Exception as exc:  # noqa: BLE001  (sent to the test, which checks it)
                    attrs = {k: v for k, v in vars(exc).items() if isinstance(v, (int, str, float, type(None)))}
                    conn.send(("error", type(exc).__name__, str(exc)[:4000] + "\n" + traceback.format_exc()[-3000:],
                               attrs, time.monotonic() - started))
    spark.stop()


if __name__ == "__main__":
    main()
