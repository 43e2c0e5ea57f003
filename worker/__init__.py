"""The jetinfer worker: pulls micro-batches from JetStream, runs a backend, replies, acks."""

from .pipeline import Pipeline
from .service import Worker
from .settings import WorkerSettings

__all__ = ["Pipeline", "Worker", "WorkerSettings"]
