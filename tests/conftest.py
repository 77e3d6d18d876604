"""Shared fixtures: one local SparkSession per test session, leak checks."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import leaks  # noqa: E402  (tests/leaks.py, next to this file)

# The Spark Python workers must run this interpreter (the one with sparkmpi).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
from leaks import ALLOWANCES, LEAK_TAG, _no_leaks  # noqa: E402,F401  (the autouse leak check)
# The Kafka broker is defined here once: a session fixture imported into each module that
# uses it is a separate fixture there, and each module then started a broker of its own.
from stream_fixtures import broker  # noqa: E402,F401  (session fixture)

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def spark():
    """A ``local[2]`` SparkSession shared by every test that needs Spark."""
    from sparkmpi.launch.session import spark_session

    session = spark_session("local[2]", "sparkmpi-tests", conf={
        "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"})
    leaks.allow_spark(session.sparkContext)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sc(spark):
    return spark.sparkContext
