"""Shared fixtures: one local SparkSession per test session, leak checks."""

from __future__ import annotations

import os
import sys

import pytest

# The Spark Python workers must run this interpreter (the one with sparkmpi).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def spark():
    """A ``local[2]`` SparkSession shared by every test that needs Spark."""
    from sparkmpi.launch.session import spark_session

    session = spark_session("local[2]", "sparkmpi-tests", conf={
        "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sc(spark):
    return spark.sparkContext
