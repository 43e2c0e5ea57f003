"""The jetinfer client library (async and sync) and the producer CLIs."""

from producer.client import Client, Payload, encode_payload
from producer.settings import ProducerSettings
from producer.sync import SyncClient

__all__ = ["Client", "Payload", "ProducerSettings", "SyncClient", "encode_payload"]
