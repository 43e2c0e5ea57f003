"""The jetinfer client library (async and sync) and the producer CLIs."""

from .client import Client, Payload, encode_payload
from .metrics import ClientMetrics
from .settings import ClientSettings, ProducerSettings
from .sync import SyncClient
from .video import Frame, FrameResult, read_frames, video_job

__all__ = [
    "Client",
    "ClientMetrics",
    "ClientSettings",
    "Frame",
    "FrameResult",
    "Payload",
    "ProducerSettings",
    "SyncClient",
    "encode_payload",
    "read_frames",
    "video_job",
]
