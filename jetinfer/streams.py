"""Idempotent creation of the streams INFER, RESULTS, DLQ and the consumers `worker-<model>`.

Whoever starts first (worker or producer) creates them with the same settings. An existing stream
whose configuration differs is never changed silently: `StreamMismatchError` names the field.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from jetinfer.errors import StreamMismatchError, StreamMissingError
from jetinfer.protocol import check_model_name
from jetinfer.settings import StreamSettings

__all__ = [
    "DLQ_STREAM",
    "INFER_STREAM",
    "RESULTS_STREAM",
    "consumer_name",
    "dlq_subject",
    "ensure_consumer",
    "ensure_streams",
    "infer_subject",
    "register_model",
    "reload_subject",
    "require_stream",
    "results_subject",
]

logger = logging.getLogger(__name__)

INFER_STREAM: Final = "INFER"
RESULTS_STREAM: Final = "RESULTS"
DLQ_STREAM: Final = "DLQ"
RELOAD_PREFIX: Final = "jetinfer.control.reload"


def infer_subject(model: str) -> str:
    """`infer.<model>`: where requests for `model` are published."""
    return f"infer.{check_model_name(model)}"


def consumer_name(model: str) -> str:
    """`worker-<model>`: the durable pull consumer that serves `model`."""
    return f"worker-{check_model_name(model)}"


def results_subject(job: str) -> str:
    """`results.<job>`: durable replies of a batch job."""
    return f"results.{job}"


def dlq_subject(model: str) -> str:
    """`dlq.<model>`: dead letters of `model`."""
    return f"dlq.{model}"


def reload_subject(model: str) -> str:
    """`jetinfer.control.reload.<model>`: the sidecar's reload signal."""
    return f"{RELOAD_PREFIX}.{check_model_name(model)}"


def _infer_config(settings: StreamSettings, subjects: list[str]) -> StreamConfig:
    return StreamConfig(
        name=INFER_STREAM,
        subjects=subjects,
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        max_msg_size=settings.max_msg_size_bytes,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.stream_replicas,
        discard=DiscardPolicy.OLD,
    )


def _results_config(settings: StreamSettings) -> StreamConfig:
    return StreamConfig(
        name=RESULTS_STREAM,
        subjects=["results.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.results_max_age_s,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.stream_replicas,
        allow_direct=True,
    )


def _dlq_config(settings: StreamSettings) -> StreamConfig:
    return StreamConfig(
        name=DLQ_STREAM,
        subjects=["dlq.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.dlq_max_age_s,
        duplicate_window=settings.duplicate_window_s,
        num_replicas=settings.stream_replicas,
    )


_COMPARED_STREAM_FIELDS: Final = (
    "retention",
    "storage",
    "max_msg_size",
    "duplicate_window",
    "num_replicas",
    "max_age",
)


def _check_stream(existing: StreamConfig, wanted: StreamConfig) -> None:
    for name in _COMPARED_STREAM_FIELDS:
        want = getattr(wanted, name)
        have = getattr(existing, name)
        if want is None or (name == "max_age" and not want):
            continue
        if isinstance(want, float) or isinstance(have, float):
            if abs(float(have or 0) - float(want)) > 1e-6:
                raise StreamMismatchError(f"stream {wanted.name}", name, have, want)
        elif have != want:
            raise StreamMismatchError(f"stream {wanted.name}", name, have, want)


async def _ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> StreamConfig:
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        try:
            info = await js.add_stream(config=wanted)
            logger.info("created stream %s subjects=%s", wanted.name, wanted.subjects)
        except Exception:
            # Someone else created it between our look-up and our create: compare with theirs.
            info = await js.stream_info(wanted.name)
    _check_stream(info.config, wanted)
    return info.config


async def ensure_streams(js: JetStreamContext, settings: StreamSettings) -> None:
    """Create RESULTS and DLQ if missing; check them if present. INFER is made by `register_model`."""
    await _ensure_stream(js, _results_config(settings))
    await _ensure_stream(js, _dlq_config(settings))


async def require_stream(js: JetStreamContext, name: str, hint: str) -> None:
    """Check that stream `name` exists, without creating or changing it; StreamMissingError otherwise.

    For producers, which may not create streams (and must not create them with settings of their own).
    """
    try:
        await js.stream_info(name)
    except NotFoundError:
        raise StreamMissingError(name, hint) from None


async def register_model(js: JetStreamContext, model: str, settings: StreamSettings) -> None:
    """Add `infer.<model>` to the INFER stream (creating it if needed); the registration outlives workers."""
    subject = infer_subject(model)
    for attempt in range(10):
        config = await _ensure_stream(js, _infer_config(settings, [subject]))
        subjects = list(config.subjects or [])
        if subject in subjects:
            return
        config.subjects = [*subjects, subject]
        try:
            await js.update_stream(config=config)
        except Exception as exc:  # a concurrent update; re-read and try again
            logger.debug("update of stream INFER raced (%s); retrying", exc)
        # Concurrent registrations are read-modify-write: verify ours survived.
        await asyncio.sleep(0.02 * attempt)
    info = await js.stream_info(INFER_STREAM)
    if subject not in (info.config.subjects or []):
        raise RuntimeError(f"could not add {subject} to stream {INFER_STREAM} after 10 attempts")


def _consumer_config(model: str, settings: StreamSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(model),
        filter_subject=infer_subject(model),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        max_waiting=512,
    )


async def ensure_consumer(js: JetStreamContext, model: str, settings: StreamSettings) -> None:
    """Create the durable pull consumer `worker-<model>`, or check the existing one."""
    wanted = _consumer_config(model, settings)
    name = consumer_name(model)
    try:
        info = await js.consumer_info(INFER_STREAM, name)
    except NotFoundError:
        try:
            info = await js.add_consumer(INFER_STREAM, config=wanted)
            logger.info("created consumer %s on %s", name, INFER_STREAM)
        except Exception:
            info = await js.consumer_info(INFER_STREAM, name)
    have = info.config
    for field_name in ("filter_subject", "ack_policy", "max_deliver", "max_ack_pending"):
        if getattr(have, field_name) != getattr(wanted, field_name):
            raise StreamMismatchError(
                f"consumer {name}", field_name, getattr(have, field_name), getattr(wanted, field_name)
            )
    if abs(float(have.ack_wait or 0) - float(wanted.ack_wait or 0)) > 1e-6:
        raise StreamMismatchError(f"consumer {name}", "ack_wait", have.ack_wait, wanted.ack_wait)
