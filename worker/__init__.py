"""The jetinfer worker: pulls micro-batches from JetStream, runs a backend, replies, acks."""

from worker.pipeline import ModelServer
from worker.service import Worker
from worker.settings import WorkerSettings

__all__ = ["ModelServer", "Worker", "WorkerSettings"]
