"""The jetinfer client library (async and sync) and the producer CLIs."""

from producer.client import Client, Payload, encode_payload
from producer.metrics import ClientMetrics
from producer.settings import ProducerSettings
from producer.sync import SyncClient
from producer.video import Frame, FrameResult, read_frames, video_job

__all__ = [
    "Client",
    "ClientMetrics",
    "Frame",
    "FrameResult",
    "Payload",
    "ProducerSettings",
    "SyncClient",
    "encode_payload",
    "read_frames",
    "video_job",
]
