"""Delivery under faults, the quick cases (issue 3): poison, slow batches, deadlines, drain, retries.

Every request is counted by its marker (the identity model echoes it back): lost = 0 everywhere,
and duplicates are counted and printed (`pytest -s` shows the `[delivery]` lines).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from jetinfer.errors import BackendError, RequestTimeoutError
from jetinfer.producer.client import Client
from jetinfer.producer.lost_replies import AckedWithoutReply
from jetinfer.producer.metrics import ClientMetrics
from jetinfer.protocol import ErrorReply, decode_reply, request_headers
from jetinfer.settings import StreamSettings
from jetinfer.streams import (
    DLQ_STREAM,
    INFER_STREAM,
    consumer_name,
    ensure_consumer,
    ensure_streams,
    infer_subject,
    register_model,
)
from jetinfer.worker.advisories import DeadLetters
from tests import faults
from tests.conftest import NatsUnderTest, running_worker


def body(marker: int, request_id: str) -> bytes:
    frame = faults.frames(marker)
    tensor = {"name": "input", "datatype": "FP32", "shape": list(frame.shape), "data": frame.tobytes()}
    return msgpack.packb({"id": request_id, "inputs": [tensor]}, use_bin_type=True)


async def dlq_entries(js: Any, model: str) -> list[Any]:
    info = await js.stream_info(DLQ_STREAM, subjects_filter=f"dlq.{model}")
    count = (info.state.subjects or {}).get(f"dlq.{model}", 0)
    if not count:
        return []
    sub = await js.pull_subscribe(f"dlq.{model}", durable=None, stream=DLQ_STREAM)
    return list(await sub.fetch(count, timeout=5))


@pytest.mark.parametrize("fronts", [0, 2], ids=["in-process", "two-fronts"])
async def test_poison_request_ends_in_dlq_with_an_error_while_the_rest_flows(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, monkeypatch: Any, fronts: int
) -> None:
    repo, model = model_repo("identity")
    markers = list(range(1, 301))
    async with (
        running_worker(
            nats_server.url,
            repo,
            [model],
            backend_factory=faults.faulty(poison=7777),
            max_deliver=3,
            nak_delays_ms=[50, 100],
            max_wait_ms=5.0,
            fronts=fronts,
        ) as worker,
        Client(nats_server.url) as client,
    ):
        poison = asyncio.create_task(
            client.infer(model, faults.frames(7777), timeout=60, request_id=f"poison-{model}")
        )
        results = await asyncio.gather(
            *(client.infer(model, faults.frames(m), timeout=60) for m in markers), return_exceptions=True
        )
        poison_result = await asyncio.gather(poison, return_exceptions=True)
        isolated = (worker.servers.get(model) or worker.engines[model]).isolated_runs
    tally = faults.tally(markers, results, client.duplicates_dropped)
    print(tally.line(f"poison request, max_deliver=3, fronts={fronts}") + f" isolated_runs={isolated}")
    assert tally.answered == len(markers), tally
    assert not tally.lost
    assert not tally.wrong
    # Batch-mates of the poison were re-run in smaller batches, never failed with it: each ran once.
    assert all(faults.EXECUTIONS[m] == 1 for m in markers), {m: faults.EXECUTIONS[m] for m in markers}
    [error] = poison_result
    assert isinstance(error, BackendError), error
    assert error.code == "internal"
    assert "poison" in str(error)
    [copy] = await dlq_entries(nc.jetstream(), model)
    assert copy.headers["Jetinfer-Dlq-Reason"] == "internal"
    assert copy.headers["Jetinfer-Dlq-Deliveries"] == "3"
    assert copy.headers["Jetinfer-Request-Id"] == f"poison-{model}"  # (ids are the stream's dedup keys)
    info = await nc.jetstream().consumer_info(INFER_STREAM, consumer_name(model))
    assert info.num_pending == 0
    assert info.num_ack_pending == 0


@pytest.mark.parametrize("fronts", [0, 2], ids=["in-process", "two-fronts"])
async def test_batch_slower_than_ack_wait_is_never_processed_twice(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, monkeypatch: Any, fronts: int
) -> None:
    # ack_wait 2 s, each batch takes 2.2 s, and the second batch waits in the pull buffer for the first:
    # without in_progress both would be redelivered (and run again) before they are answered.
    repo, model = model_repo("identity")
    markers = list(range(1, 9))
    slow = faults.faulty(sleep_s=2.2)
    async with (
        running_worker(
            nats_server.url,
            repo,
            [model],
            backend_factory=slow,
            ack_wait_s=2,
            max_batch=4,
            max_wait_ms=50.0,
            fronts=fronts,
        ) as worker,
        Client(nats_server.url) as client,
    ):
        results = await asyncio.gather(
            *(client.infer(model, faults.frames(m), timeout=60) for m in markers), return_exceptions=True
        )
        # With fronts, the fronts hold the messages and send in_progress (counted in their processes).
        progress = worker.servers[model].progress_sent if not fronts else None
    tally = faults.tally(markers, results, client.duplicates_dropped)
    print(tally.line(f"backend slower than ack_wait (2 s), fronts={fronts}") + f" in_progress={progress}")
    assert tally.answered == len(markers), tally
    assert fronts or progress
    assert {m: faults.EXECUTIONS[m] for m in markers} == dict.fromkeys(markers, 1)
    info = await nc.jetstream().consumer_info(INFER_STREAM, consumer_name(model))
    assert info.num_redelivered == 0
    assert tally.duplicates == 0


async def test_expired_requests_are_answered_and_never_run_under_load(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, monkeypatch: Any
) -> None:
    repo, model = model_repo("identity")
    js = nc.jetstream()
    inbox = nc.new_inbox()
    replies: dict[str, Any] = {}
    done = asyncio.Event()
    total = 24

    async def on_reply(msg: Any) -> None:
        reply = decode_reply(msg.data)
        replies.setdefault(reply.id, reply)
        if len(replies) == total:
            done.set()

    await nc.subscribe(f"{inbox}.*", cb=on_reply)
    slow = faults.faulty(sleep_s=0.2)
    async with running_worker(
        nats_server.url, repo, [model], backend_factory=slow, max_batch=2, max_wait_ms=0.0
    ):
        now_ms = int(time.time() * 1000)
        publishes = []
        for marker in range(1, total + 1):
            # Every other request allows 0.4 s: far less than the 12 batches ahead of it need.
            deadline = now_ms + (400 if marker % 2 == 0 else 120_000)
            headers = request_headers(f"d{marker}", f"{inbox}.{marker}", deadline_ms=deadline)
            publishes.append(js.publish(infer_subject(model), body(marker, f"d{marker}"), headers=headers))
        await asyncio.gather(*publishes)
        await asyncio.wait_for(done.wait(), 60)
    codes = {int(rid[1:]): (r.code if isinstance(r, ErrorReply) else "ok") for rid, r in replies.items()}
    expired = [m for m, code in codes.items() if code == "deadline_exceeded"]
    print(f"[delivery] deadlines under load: sent={total} answered={len(codes)} expired={len(expired)}")
    assert len(codes) == total
    assert all(codes[m] == "ok" for m in range(1, total + 1, 2))
    assert len(expired) > 0
    assert all(faults.EXECUTIONS[m] == 0 for m in expired)
    assert set(codes.values()) <= {"ok", "deadline_exceeded"}


async def test_stop_finishes_the_batch_in_flight_and_gives_back_the_rest_at_once(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, monkeypatch: Any
) -> None:
    slow: dict[str, Any] = {"sleep_s": 1.0}
    repo, model = model_repo("identity")
    markers = list(range(1, 21))
    # ack_wait of 10 minutes: a request not given back at once would miss the clients' 60 s timeout.
    settings = {"ack_wait_s": 600, "max_batch": 2, "max_wait_ms": 0.0}
    async with Client(nats_server.url) as client:
        factory = faults.faulty(**slow)
        async with running_worker(
            nats_server.url, repo, [model], backend_factory=factory, **settings
        ) as first:
            calls = [asyncio.create_task(client.infer(model, faults.frames(m), timeout=60)) for m in markers]
            while not faults.EXECUTIONS:  # noqa: ASYNC110 - the first batch ran; more wait, fetched
                await asyncio.sleep(0.02)
            await first.stop()
            ran_by_first = sum(faults.EXECUTIONS.values())
        slow.clear()  # the second worker runs at full speed (the factory shares this dict)
        async with running_worker(nats_server.url, repo, [model], backend_factory=factory, **settings):
            results = await asyncio.gather(*calls, return_exceptions=True)
    tally = faults.tally(markers, results, client.duplicates_dropped)
    print(tally.line("worker stop with a batch in flight") + f" ran_by_first={ran_by_first}")
    assert tally.answered == len(markers), tally
    assert 1 <= ran_by_first < len(markers)
    # What the first worker ran, it answered and acked before it stopped: nothing ran twice.
    assert all(faults.EXECUTIONS[m] == 1 for m in markers)


async def test_retried_publish_is_stored_once(nats_server: NatsUnderTest, nc: Any, model_repo: Any) -> None:
    repo, model = model_repo("identity")
    settings = StreamSettings()
    js = nc.jetstream()
    await ensure_streams(js, settings)
    await register_model(js, model, settings)
    await ensure_consumer(js, model, settings)
    async with Client(nats_server.url) as client:
        real_publish = client.js.publish
        calls = 0

        async def publish_then_lose_the_ack(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            ack = await real_publish(*args, **kwargs)
            if calls == 1:
                raise TimeoutError("the PubAck was lost")
            return ack

        client.js.publish = publish_then_lose_the_ack  # type: ignore[method-assign]
        inbox = client.nc.new_inbox()
        await client.publish(model, faults.frames(5), request_id="retried", reply_to=inbox)
    assert calls == 2
    info = await js.consumer_info(INFER_STREAM, consumer_name(model))
    assert info.num_pending == 1, "a retried publish was stored twice"
    async with running_worker(nats_server.url, repo, [model]):
        for _ in range(200):
            info = await js.consumer_info(INFER_STREAM, consumer_name(model))
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
    assert info.delivered.stream_seq > 0
    assert info.num_pending == 0


async def test_request_whose_worker_died_on_the_last_delivery_is_buried_once(
    nats_server: NatsUnderTest, model_repo: Any
) -> None:
    """MAX_DELIVERIES advisory: DLQ copy, one `internal` error reply, removed from INFER, by one worker."""
    _repo, model = model_repo("identity")
    settings = StreamSettings(ack_wait_s=1, max_deliver=2)
    listeners = [await nats.connect(nats_server.url) for _ in range(3)]
    crashed = await nats.connect(nats_server.url)
    try:
        js = crashed.jetstream()
        await ensure_streams(js, settings)
        await register_model(js, model, settings)
        await ensure_consumer(js, model, settings)
        dead_letters = [DeadLetters(c, c.jetstream(), [model], settings) for c in listeners]
        for d in dead_letters:
            await d.start()
        inbox = crashed.new_inbox()
        replies = await crashed.subscribe(inbox)
        headers = request_headers("doomed", inbox)
        await js.publish(infer_subject(model), body(9, "doomed"), headers=headers)
        # A "worker" takes both deliveries and dies each time before answering.
        pull = await js.pull_subscribe_bind(consumer_name(model), INFER_STREAM)
        for delivery in (1, 2):
            [msg] = await pull.fetch(1, timeout=10)
            assert msg.metadata.num_delivered == delivery
        # Live workers keep pulls waiting; the server gives up on the request while serving one.
        live_pull = asyncio.create_task(pull.fetch(1, timeout=2))
        reply_msg = await replies.next_msg(timeout=15)
        assert isinstance((await asyncio.gather(live_pull, return_exceptions=True))[0], TimeoutError)
        reply = decode_reply(reply_msg.data)
        assert isinstance(reply, ErrorReply)
        assert reply.id == "doomed"
        assert reply.code == "internal"
        assert "ran out of deliveries" in reply.message
        await asyncio.sleep(0.5)  # room for a second (wrong) reply
        assert replies.pending_msgs == 0, "more than one worker answered"
        [copy] = await dlq_entries(js, model)
        assert copy.headers["Jetinfer-Dlq-Reason"] == "max_deliveries"
        assert copy.headers["Jetinfer-Request-Id"] == "doomed"
        assert copy.data == body(9, "doomed")
        assert sum(d.buried for d in dead_letters) == 1
        stream = await js.stream_info(INFER_STREAM, subjects_filter=infer_subject(model))
        assert (stream.state.subjects or {}).get(infer_subject(model), 0) == 0
        # The sweep finds nothing left (and would have found it, had no worker listened).
        assert await dead_letters[0].sweep(model) == 0
    finally:
        for c in [*listeners, crashed]:
            await c.close()


async def test_sweep_buries_a_request_whose_advisory_nobody_heard(
    nats_server: NatsUnderTest, model_repo: Any
) -> None:
    _repo, model = model_repo("identity")
    settings = StreamSettings(ack_wait_s=1, max_deliver=1)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        await register_model(js, model, settings)
        await ensure_consumer(js, model, settings)
        inbox = nc.new_inbox()
        replies = await nc.subscribe(inbox)
        await js.publish(infer_subject(model), body(3, "unheard"), headers=request_headers("unheard", inbox))
        pull = await js.pull_subscribe_bind(consumer_name(model), INFER_STREAM)
        await pull.fetch(1, timeout=10)  # taken by a worker that dies; nobody listens for the advisory
        for _ in range(100):
            info = await js.consumer_info(INFER_STREAM, consumer_name(model))
            if info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.1)
        dead_letters = DeadLetters(nc, js, [model], settings)
        assert await dead_letters.sweep(model) == 1
        reply = decode_reply((await replies.next_msg(timeout=5)).data)
        assert isinstance(reply, ErrorReply)
        assert reply.code == "internal"
        [copy] = await dlq_entries(js, model)
        assert json.loads(json.dumps(dict(copy.headers)))["Jetinfer-Dlq-Reason"] == "max_deliveries"
        assert await dead_letters.sweep(model) == 0
    finally:
        await nc.close()


async def test_a_request_with_its_own_status_header_is_answered(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any
) -> None:
    """Pull statuses arrive as a "Status" header; a request with its own is still served (fuzzing)."""
    repo, model = model_repo("identity")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    async with running_worker(nats_server.url, repo, [model]):
        headers = {**request_headers("status-404", inbox), "Status": "404", "Description": "No Messages"}
        await nc.jetstream().publish(infer_subject(model), body(4, "status-404"), headers=headers)
        reply = decode_reply((await sub.next_msg(timeout=30)).data)
    assert not isinstance(reply, ErrorReply), reply
    assert reply.id == "status-404"


async def test_client_publishes_waiting_requests_again_after_a_reconnect(
    own_nats: Any, model_repo: Any
) -> None:
    """A reply sent while the client was away is lost: after reconnecting it asks again, under a new id."""
    repo, model = model_repo("identity")
    settings = StreamSettings()
    await register_on(own_nats.url, model, settings)
    async with Client(own_nats.url, resend_after_s=0.2) as client:
        call = asyncio.create_task(client.infer(model, faults.frames(8), timeout=60, request_id="again"))
        while not client._sent:  # noqa: ASYNC110 - published and waiting (no worker runs yet)
            await asyncio.sleep(0.01)
        await asyncio.to_thread(own_nats.restart)
        while client.resent == 0:  # noqa: ASYNC110 - the client's own counter
            await asyncio.sleep(0.05)
        async with running_worker(own_nats.url, repo, [model]):
            reply = await call
            while client.duplicates_dropped == 0:  # noqa: ASYNC110 - both copies are answered
                await asyncio.sleep(0.05)
    assert reply.id == "again"
    assert client.resent == 1
    assert client.duplicates_dropped == 1


async def register_on(url: str, model: str, settings: StreamSettings) -> None:
    connection = await nats.connect(url)
    try:
        js = connection.jetstream()
        await ensure_streams(js, settings)
        await register_model(js, model, settings)
        await ensure_consumer(js, model, settings)
    finally:
        await connection.close()


async def take_and_ack_without_reply(url: str, model: str) -> str:
    """Pull one request as a worker would and ack it without replying: what a client sees when the
    server carrying the reply dies after the ack landed. Returns the request's id."""
    connection = await nats.connect(url)
    try:
        sub = await connection.jetstream().pull_subscribe_bind(consumer_name(model), INFER_STREAM)
        [msg] = await sub.fetch(1, timeout=10)
        await msg.ack_sync()
        return str(msg.headers.get("Nats-Msg-Id") if msg.headers else "")
    finally:
        await connection.close()


async def test_client_asks_again_for_a_request_acknowledged_without_its_reply(
    own_nats: Any, model_repo: Any
) -> None:
    """The ack landed, the reply did not (the client stayed connected): found through the ack floor."""
    repo, model = model_repo("identity")
    await register_on(own_nats.url, model, StreamSettings())
    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    async with Client(own_nats.url, resend_after_s=0.2, lost_reply_check_s=0.1, metrics=metrics) as client:
        call = asyncio.create_task(client.infer(model, faults.frames(9), timeout=60, request_id="lost"))
        assert await take_and_ack_without_reply(own_nats.url, model) == "lost"
        async with running_worker(own_nats.url, repo, [model]):
            reply = await asyncio.wait_for(call, 30)
    assert reply.id == "lost"
    assert np.array_equal(reply.output(), faults.frames(9))
    assert (client.lost_replies, client.resent) == (1, 1)
    names = ("resent", "lost_replies", "requests")
    counted = [registry.get_sample_value(f"jetinfer_client_{name}_total", {"model": model}) for name in names]
    assert counted == [1, 1, 1]


async def test_client_asks_again_only_once_for_a_request_acknowledged_without_its_reply(
    own_nats: Any, model_repo: Any
) -> None:
    """Acked without a reply twice: asked again once, then the caller's time-out (no loop of re-sends)."""
    _, model = model_repo("identity")
    await register_on(own_nats.url, model, StreamSettings())
    async with Client(own_nats.url, resend_after_s=0.2, lost_reply_check_s=0.1) as client:
        call = asyncio.create_task(client.infer(model, faults.frames(9), timeout=4, request_id="twice"))
        assert await take_and_ack_without_reply(own_nats.url, model) == "twice"
        assert await take_and_ack_without_reply(own_nats.url, model) == "twice~r1"
        with pytest.raises(RequestTimeoutError):
            await call
        js = client.js
        info = await js.consumer_info(INFER_STREAM, consumer_name(model))
    assert (client.lost_replies, client.resent) == (1, 1)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def test_a_consumer_that_cannot_be_read_is_read_less_often_and_named_once(caplog: Any) -> None:
    """Reading the ack floor fails (no permission, no leader): tries back off, one warning names the fix."""
    tries: list[float] = []

    async def unreadable(model: str) -> int:
        tries.append(time.monotonic())
        raise TimeoutError(f"nobody answered for {model}")

    async def never(token: str) -> int | None:
        raise AssertionError("nothing may be published again without an ack floor")

    watch = AckedWithoutReply(unreadable, never, check_s=0.001, grace_s=0)
    watch.watch("1", "identity", "some-id", 5)
    checks = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        await watch.check()
        checks += 1
        await asyncio.sleep(0.001)
    warnings = [r.getMessage() for r in caplog.records if r.name == "jetinfer.producer.lost_replies"]
    assert 5 <= len(tries) <= 10 < checks, (len(tries), checks)
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps[-1] > 2 * gaps[0], gaps
    assert len(warnings) == 1, warnings
    assert "identity" in warnings[0]
    assert "$JS.API.CONSUMER.INFO.INFER.*" in warnings[0]
