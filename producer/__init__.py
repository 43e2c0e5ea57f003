"""The jetinfer client library (async and sync) and the producer CLIs."""

from .client import Client, Payload, encode_payload
from .frames import Frame, read_frames
from .metrics import ClientMetrics
from .settings import ClientSettings, ProducerSettings
from .sync import SyncClient
from .video import FrameResult, JobProgress, video_job

__all__ = [
    "Client",
    "ClientMetrics",
    "ClientSettings",
    "Frame",
    "FrameResult",
    "JobProgress",
    "Payload",
    "ProducerSettings",
    "SyncClient",
    "encode_payload",
    "read_frames",
    "video_job",
]
