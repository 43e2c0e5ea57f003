"""The intake's pulls are bounded in bytes as well as messages, so large messages (a batch job's 8 JPEGs
a message) never get the worker's connection cut as a slow consumer (nats-server's 64 MiB max_pending)."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from jetinfer.embedded import EmbeddedNatsServer
from jetinfer.worker.intake import PULL_MAX_BYTES, PullConsumer, pull_max_bytes

MESSAGE_BYTES = 150_000  # about 8 JPEGs of 224x224


async def _fill(url: str, stream: str, count: int, size: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"], max_msg_size=4 * 1024 * 1024))
    payload = b"x" * size
    for index in range(count):
        if index % 100 == 99:
            await js.publish(f"{stream}.in", payload)  # now and then, wait for the stream to keep up
        else:
            await nc.publish(f"{stream}.in", payload)
    await js.publish(f"{stream}.in", payload)
    await nc.close()


async def _take(intake: PullConsumer, count: int, timeout_s: float) -> int:
    got, deadline = 0, time.monotonic() + timeout_s
    while got < count and time.monotonic() < deadline:
        got += len(await intake.get(256, 0.01))
    return got


@pytest.mark.timeout(180)
async def test_a_pull_of_large_messages_stays_under_the_servers_max_pending(
    own_nats: EmbeddedNatsServer,
) -> None:
    count = 3001  # 450 MB: pulls of 512 of them asked for 77 MB each, and the server cut the connection
    await _fill(own_nats.url, "BIG", count - 1, MESSAGE_BYTES)
    nc = await nats.connect(own_nats.url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    await js.add_consumer("BIG", ConsumerConfig(durable_name="big", ack_policy=AckPolicy.NONE))
    intake = PullConsumer(nc, "BIG", "big", capacity=512, heartbeat_s=5.0)
    await intake.start()
    try:
        got = await _take(intake, count, timeout_s=60)
    finally:
        await intake.stop(0)
        reconnects = nc.stats["reconnects"]
        await nc.close()
    log = own_nats.log_file.read_text()
    assert "Slow Consumer" not in log
    assert reconnects == 0
    assert got == count


@pytest.mark.timeout(120)
async def test_a_message_larger_than_a_pull_asks_for_is_still_delivered(
    own_nats: EmbeddedNatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    await _fill(own_nats.url, "HUGE", 2, 300_000)
    nc = await nats.connect(own_nats.url)
    js = nc.jetstream()
    await js.add_consumer("HUGE", ConsumerConfig(durable_name="huge", ack_policy=AckPolicy.NONE))
    intake = PullConsumer(nc, "HUGE", "huge", capacity=8, heartbeat_s=5.0, max_bytes=100_000)
    await intake.start()
    try:
        got = await _take(intake, 3, timeout_s=30)
    finally:
        await intake.stop(0)
        await nc.close()
    assert got == 3
    assert intake.max_bytes >= 300_000
    assert "larger than a pull's max_bytes" in caplog.text


def test_a_pull_can_always_hold_the_largest_message_the_stream_accepts() -> None:
    assert pull_max_bytes(1024) == PULL_MAX_BYTES
    assert pull_max_bytes(64 * 1024 * 1024) > 64 * 1024 * 1024
    assert 2 * PULL_MAX_BYTES < 64 * 1024 * 1024  # two pulls outstanding stay under max_pending


async def test_ordinary_messages_still_come_in_full_pulls(own_nats: EmbeddedNatsServer) -> None:
    await _fill(own_nats.url, "SMALL", 999, 1_000)
    nc = await nats.connect(own_nats.url)
    js = nc.jetstream()
    await js.add_consumer("SMALL", ConsumerConfig(durable_name="small", ack_policy=AckPolicy.NONE))
    intake = PullConsumer(nc, "SMALL", "small", capacity=512, heartbeat_s=5.0)
    await intake.start()
    try:
        await asyncio.sleep(0.5)
        first = len(intake.buffered_entries())  # one pull of 512 small messages, not cut by bytes
        got = await _take(intake, 1000, timeout_s=30)
    finally:
        await intake.stop(0)
        await nc.close()
    assert first == 512
    assert got == 1000


@pytest.mark.timeout(120)
async def test_the_buffer_holds_about_two_pulls_of_bytes_until_it_is_taken(
    own_nats: EmbeddedNatsServer,
) -> None:
    await _fill(own_nats.url, "HELD", 199, MESSAGE_BYTES)  # 30 MB waiting
    nc = await nats.connect(own_nats.url)
    js = nc.jetstream()
    await js.add_consumer("HELD", ConsumerConfig(durable_name="held", ack_policy=AckPolicy.NONE))
    limit = 1_000_000
    intake = PullConsumer(nc, "HELD", "held", capacity=512, heartbeat_s=5.0, max_bytes=limit)
    await intake.start()
    try:
        await asyncio.sleep(1.0)  # nothing taken: the intake asks for no more than its bound
        held = sum(len(entry.msg.data) for entry in intake.buffered_entries())
        got = await _take(intake, 200, timeout_s=30)
    finally:
        await intake.stop(0)
        await nc.close()
    assert limit <= held <= 2 * limit  # the pull that reached the bound, and no more asked for
    assert got == 200
