"""Idempotent creation of the streams INFER, RESULTS, DLQ and the consumers `worker-<model>`.

Whoever starts first (worker or producer) creates them with the same settings. An existing stream
whose configuration differs is never changed silently: `StreamMismatchError` names the field.

A model takes requests on two subjects: `infer.<model>` (no tenant) and `infer.<model>.<tenant>`, where
the tenant token is fixed by the NATS server (each tenant's user may publish only
`infer.*.<tenant>`; docs/operations.md, Tenants). The consumer `worker-<model>` filters both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
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

from jetinfer.errors import InvalidInputError, StreamMismatchError, StreamMissingError, StreamUpdateError
from jetinfer.protocol import MODEL_NAME_PATTERN, check_model_name
from jetinfer.settings import StreamSettings

__all__ = [
    "DLQ_STREAM",
    "INFER_STREAM",
    "RESULTS_STREAM",
    "TENANT_NAME_PATTERN",
    "check_tenant_name",
    "consumer_name",
    "dlq_subject",
    "ensure_consumer",
    "ensure_streams",
    "infer_subject",
    "infer_subjects",
    "parse_infer_subject",
    "register_model",
    "reload_subject",
    "require_stream",
    "results_subject",
    "subject_matches",
]

logger = logging.getLogger(__name__)

INFER_STREAM: Final = "INFER"
RESULTS_STREAM: Final = "RESULTS"
DLQ_STREAM: Final = "DLQ"
RELOAD_PREFIX: Final = "jetinfer.control.reload"
#: Tenant names: one subject token, the same alphabet as model names.
TENANT_NAME_PATTERN: Final = re.compile(r"[a-z0-9_-]{1,64}")


def check_tenant_name(name: str) -> str:
    """Return `name` if it is a valid tenant name (`[a-z0-9_-]{1,64}`), else raise InvalidInputError."""
    if not isinstance(name, str) or not TENANT_NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(f"invalid tenant name {name!r}: must match [a-z0-9_-]{{1,64}}")
    return name


def infer_subject(model: str, tenant: str | None = None) -> str:
    """`infer.<model>`, or `infer.<model>.<tenant>`: where requests for `model` are published."""
    subject = f"infer.{check_model_name(model)}"
    return subject if tenant is None else f"{subject}.{check_tenant_name(tenant)}"


def infer_subjects(model: str) -> list[str]:
    """The subjects INFER takes for `model` and its consumer filters: `infer.<model>`, `infer.<model>.*`."""
    subject = infer_subject(model)
    return [subject, f"{subject}.*"]


def parse_infer_subject(subject: str) -> tuple[str, str | None]:
    """(model, tenant or None) of a request subject; InvalidInputError for any other subject."""
    parts = subject.split(".")
    if (
        len(parts) in (2, 3)
        and parts[0] == "infer"
        and MODEL_NAME_PATTERN.fullmatch(parts[1])
        and (len(parts) == 2 or TENANT_NAME_PATTERN.fullmatch(parts[2]))
    ):
        return parts[1], parts[2] if len(parts) == 3 else None
    raise InvalidInputError(f"{subject[:128]!r} is not a request subject (infer.<model>[.<tenant>])")


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the literal `subject` matches the NATS subject `pattern` (`*` one token, `>` the rest)."""
    want, have = pattern.split("."), subject.split(".")
    for index, token in enumerate(want):
        if token == ">":
            return len(have) > index
        if index >= len(have) or (token != "*" and token != have[index]):
            return False
    return len(have) == len(want)


def consumer_name(model: str) -> str:
    """`worker-<model>`: the durable pull consumer that serves `model`."""
    return f"worker-{check_model_name(model)}"


def results_subject(job: str, tenant: str | None = None) -> str:
    """`results.<job>`, or `results.<tenant>.<job>`: durable replies of a batch job."""
    return f"results.{job}" if tenant is None else f"results.{check_tenant_name(tenant)}.{job}"


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
    """Add `infer.<model>` and `infer.<model>.*` to the INFER stream (creating it if needed); the
    registration outlives workers. A stream registered before tenants gets the second subject added."""
    wanted = infer_subjects(model)
    for attempt in range(10):
        config = await _ensure_stream(js, _infer_config(settings, wanted))
        subjects = list(config.subjects or [])
        missing = [subject for subject in wanted if subject not in subjects]
        if not missing:
            return
        config.subjects = [*subjects, *missing]
        try:
            await js.update_stream(config=config)
        except Exception as exc:  # a concurrent update; re-read and try again
            logger.debug("update of stream INFER raced (%s); retrying", exc)
        # Concurrent registrations are read-modify-write: verify ours survived.
        await asyncio.sleep(0.02 * attempt)
    info = await js.stream_info(INFER_STREAM)
    missing = [subject for subject in wanted if subject not in (info.config.subjects or [])]
    if missing:
        raise StreamUpdateError(
            f"could not add {', '.join(missing)} to stream {INFER_STREAM} after 10 attempts"
        )


def _consumer_config(model: str, settings: StreamSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(model),
        filter_subjects=infer_subjects(model),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        max_waiting=512,
    )


def _filters(config: ConsumerConfig) -> list[str]:
    return list(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


async def ensure_consumer(js: JetStreamContext, model: str, settings: StreamSettings) -> None:
    """Create the durable pull consumer `worker-<model>`, or check the existing one.

    A consumer made before tenants (its one filter `infer.<model>`) gets `infer.<model>.*` added, with a
    log line: the only change ever applied to an existing consumer, and one that takes nothing away.
    """
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
    if _filters(info.config) == [infer_subject(model)]:
        upgraded = dataclasses.replace(
            info.config, filter_subject=None, filter_subjects=infer_subjects(model)
        )
        info = await js.add_consumer(INFER_STREAM, config=upgraded)  # create-or-update of a durable
        logger.info("consumer %s now also takes tenant requests (%s)", name, ", ".join(_filters(info.config)))
    have = info.config
    if _filters(have) != _filters(wanted):
        raise StreamMismatchError(f"consumer {name}", "filter_subjects", _filters(have), _filters(wanted))
    for field_name in ("ack_policy", "max_deliver", "max_ack_pending"):
        if getattr(have, field_name) != getattr(wanted, field_name):
            raise StreamMismatchError(
                f"consumer {name}", field_name, getattr(have, field_name), getattr(wanted, field_name)
            )
    if abs(float(have.ack_wait or 0) - float(wanted.ack_wait or 0)) > 1e-6:
        raise StreamMismatchError(f"consumer {name}", "ack_wait", have.ack_wait, wanted.ack_wait)
