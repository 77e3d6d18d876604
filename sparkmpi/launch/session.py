"""A SparkSession with the settings sparkmpi's jobs run best under.

Any SparkSession works with :func:`sparkmpi.run`; this one is tuned for many
short MPI jobs (micro-batches, iterative solvers driven from Python):

* ``spark.python.unix.domain.socket.enabled``: by default Spark feeds its
  Python workers over loopback TCP, where a task's command and data arrive
  in small writes that Nagle's algorithm and delayed ACKs hold back (the
  figures are in BENCHMARKS.md, "Launcher: why it is written as it is").
* the console progress bar is off (it interleaves with the caller's output).
* under a ``sparkmpi`` command, Spark's log4j output and the JVM's own
  start-up lines go to the command's log file (:mod:`sparkmpi._console`).

Callers building their own session can copy :data:`SESSION_DEFAULTS`.
"""

from __future__ import annotations

import os
import sys

from .. import _console
from ..errors import InvalidArgument

#: Spark settings applied by :func:`spark_session` unless the caller overrides them.
SESSION_DEFAULTS = {
    "spark.python.unix.domain.socket.enabled": "true",
    "spark.ui.showConsoleProgress": "false",
}


def spark_session(master: str = "local[2]", app: str = "sparkmpi", *, conf: dict | None = None,
                  log_level: str | None = "ERROR"):
    """``SparkSession.builder...getOrCreate()`` with :data:`SESSION_DEFAULTS`.

    Parameters
    ----------
    master : str
        Spark master URL: ``local[N]``, ``spark://host:7077``, ...
    app : str
        Application name shown by Spark.
    conf : dict, optional
        More settings (``{"spark.driver.memory": "4g"}``); they win over the defaults.
    log_level : str or None
        ``sc.setLogLevel`` value; None leaves Spark's default.

    An already running session is returned as it is (Spark's ``getOrCreate``
    rule), so settings only apply to a new one.
    """
    if not isinstance(master, str) or not master:
        raise InvalidArgument(f"master: expected a Spark master URL such as 'local[2]', got {master!r}")
    if not isinstance(app, str) or not app:
        raise InvalidArgument(f"app: expected a non-empty application name, got {app!r}")
    settings = dict(SESSION_DEFAULTS)
    for key, value in (conf or {}).items():
        if not isinstance(key, str) or not key.startswith("spark."):
            raise InvalidArgument(f"conf: expected keys starting with 'spark.', got {key!r}")
        settings[key] = str(value).lower() if isinstance(value, bool) else str(value)
    # Executors must run the interpreter that has sparkmpi installed.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    log = _console.log_file() if SparkContext._active_spark_context is None else None
    if log is not None:
        options = f"-Dlog4j2.configurationFile={_console.LOG4J2_CONFIG} -Dsparkmpi.log.file={log}"
        extra = settings.get("spark.driver.extraJavaOptions")
        settings["spark.driver.extraJavaOptions"] = f"{extra} {options}" if extra else options
    builder = SparkSession.builder.master(master).appName(app)
    for key, value in settings.items():
        builder = builder.config(key, value)
    with _console.output_to_log(log):  # the JVM inherits these descriptors for its lifetime
        session = builder.getOrCreate()
    if log_level is not None:
        session.sparkContext.setLogLevel(log_level)
    return session
