"""Streaming: detector frames through Kafka or ZeroMQ into micro-batches."""
