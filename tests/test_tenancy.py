"""Tenants isolated through the worker (issue 15), on nats-server processes running the shipped
deploy/nats/accounts.conf: each attack of the issue is refused or harmless.

Through the worker a tenant's credential (producer_a) can write to no subject it could not publish to
itself, cannot receive another tenant's replies or results, and cannot make another tenant's request
a duplicate. The last section holds the tests of "no silent drop": a reply the server refuses (no
permission, over max_payload with or without its headers) is not an answer, and costs no connection.

Synchronisation without sleeping: a request is settled once its consumer has nothing pending and
nothing unacknowledged; the worker acks or terms a request after every publish made for it, on the same
connection, so by then the server has routed anything the worker published for it, and a flush of the
observer's connection brings it in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from nats.js.errors import NotFoundError

from jetinfer.embedded import EmbeddedNatsServer
from jetinfer.errors import StreamMismatchError
from jetinfer.producer.client import Client
from jetinfer.producer.settings import ClientSettings
from jetinfer.producer.video import Frame, video_job
from jetinfer.protocol import (
    HEADER_STATUS,
    InferRequest,
    Tensor,
    decode_reply,
    encode_outputs,
    encode_request,
    request_headers,
)
from jetinfer.settings import StreamSettings
from jetinfer.streams import (
    DLQ_STREAM,
    INFER_STREAM,
    RESULTS_STREAM,
    consumer_name,
    ensure_consumer,
    infer_subject,
    infer_subjects,
    register_model,
)
from tests.conftest import REPO_ROOT, running_worker

ACCOUNTS = REPO_ROOT / "deploy" / "nats" / "accounts.conf"
PASSWORDS = {
    "ops": "test-ops",
    "worker": "test-worker",
    "sidecar": "test-sidecar",
    "producer_a": "test-producer-a",
    "producer_b": "test-producer-b",
}
WORKER_INBOX = "_INBOX.worker"
BOUND_S = 30.0  # every wait below ends by this, passed or failed


@pytest.fixture
def shipped_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedNatsServer]:
    """A nats-server running the shipped accounts.conf (its passwords from the environment, as deployed)."""
    for user, password in PASSWORDS.items():
        monkeypatch.setenv(f"JETINFER_{user.upper()}_PASSWORD", password)
    with EmbeddedNatsServer(extra_config=ACCOUNTS.read_text()) as server:
        yield server


async def raw(url: str, user: str, errors: list[str] | None = None) -> NatsClient:
    """A plain nats-py connection as `user` (inbox `_INBOX.<user>`), collecting -ERR messages."""

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc).lower())

    inbox = {"worker": WORKER_INBOX, "sidecar": "_INBOX.sidecar", "ops": "_INBOX"}.get(user, f"_INBOX.{user}")
    return await nats.connect(
        url,
        user=user,
        password=PASSWORDS[user],
        inbox_prefix=inbox,
        error_cb=on_error,
        allow_reconnect=False,
    )


def tenant_settings(url: str, tenant: str) -> ClientSettings:
    return ClientSettings(nats_url=url, nats_user=tenant, nats_password=PASSWORDS[tenant], tenant=tenant)


def identity_request(request_id: str, value: float = 1.0) -> bytes:
    data = np.full((1, 4), value, np.float32)
    return encode_request(InferRequest(id=request_id, inputs=(Tensor.from_numpy("input", data),)))


async def settled(ops: NatsClient, model: str, *, bound_s: float = BOUND_S) -> None:
    """Wait until worker-<model> has nothing pending or unacknowledged, then flush `ops`."""
    js = ops.jetstream()
    for _ in range(int(bound_s / 0.05)):
        info = await js.consumer_info(INFER_STREAM, consumer_name(model))
        if not info.num_pending and not info.num_ack_pending:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"requests of {model} were not settled within {bound_s} s")
    await ops.flush()


async def dlq_entries(ops: NatsClient, model: str) -> list[dict[str, str]]:
    """The headers of every DLQ entry of `model`."""
    js = ops.jetstream()
    entries, seq = [], 0
    while True:
        try:
            stored = await js.get_msg(DLQ_STREAM, seq=seq + 1, subject=f"dlq.{model}", next=True)
        except NotFoundError:
            return entries
        assert stored.seq is not None
        seq = stored.seq
        entries.append(dict(stored.headers or {}))


async def stored_on(ops: NatsClient, stream: str, subject: str) -> int:
    """Messages `stream` holds on `subject` (a filter)."""
    info = await ops.jetstream().stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values()) if info.state else 0


@dataclass
class Tenancy:
    """A worker serving `model` as user `worker`, an ops observer and the two tenants' clients."""

    url: str
    model: str
    ops: NatsClient
    a: Client
    b: Client
    a_raw: NatsClient
    a_errors: list[str] = field(default_factory=list)


@pytest_asyncio.fixture
async def tenancy(shipped_server: EmbeddedNatsServer, model_repo: Any) -> AsyncIterator[Tenancy]:
    repo, model = model_repo("identity")
    url = shipped_server.url
    async with (
        running_worker(
            url,
            repo,
            [model],
            nats_user="worker",
            nats_password=PASSWORDS["worker"],
            nats_inbox_prefix=WORKER_INBOX,
        ),
        Client(settings=tenant_settings(url, "producer_a")) as a,
        Client(settings=tenant_settings(url, "producer_b")) as b,
    ):
        errors: list[str] = []
        ops = await raw(url, "ops")
        a_raw = await raw(url, "producer_a", errors)
        try:
            yield Tenancy(url, model, ops, a, b, a_raw, errors)
        finally:
            await a_raw.close()
            await ops.close()


async def attack(env: Tenancy, reply_to: str, request_id: str) -> Subscription:
    """producer_a publishes a valid request whose reply would go to `reply_to`; returns an ops
    subscription on `reply_to` opened before, read after the request is settled."""
    watch = await env.ops.subscribe(reply_to)
    await env.ops.flush()
    ack = await env.a_raw.jetstream().publish(
        infer_subject(env.model, "producer_a"),
        identity_request(request_id),
        headers=request_headers(request_id, reply_to),
    )
    assert ack.stream == INFER_STREAM
    await settled(env.ops, env.model)
    return watch


def replies_in(subscription: Subscription) -> list[Msg]:
    """What arrived on an attack's subscription that is a worker's reply (a DLQ record is not)."""
    arrived = []
    while subscription.pending_msgs:
        msg = subscription._pending_queue.get_nowait()
        if msg.headers and HEADER_STATUS in msg.headers:
            arrived.append(msg)
    return arrived


# -- each attack of the issue ----------------------------------------------------------------------------


def forbidden_subjects(model: str) -> dict[str, str]:
    """Where producer_a tried to send replies, by what it would have been."""
    return {
        "the reload signal": f"jetinfer.control.reload.{model}",
        "the DLQ": f"dlq.{model}",
        "INFER itself": f"infer.{model}",
        "another tenant's requests": f"infer.{model}.producer_b",
        "the JetStream API (delete a request)": f"$JS.API.STREAM.MSG.DELETE.{INFER_STREAM}",
        "the JetStream API (pull for the worker)": f"$JS.API.CONSUMER.MSG.NEXT.{INFER_STREAM}.worker-{model}",
        "an ack of another request": f"$JS.ACK.{INFER_STREAM}.worker-{model}.1.1.1.1700000000000000000.0",
        "the system account": "$SYS.REQ.SERVER.PING",
        "the worker's inbox": f"{WORKER_INBOX}.x.1",
        "the sidecar's inbox": "_INBOX.sidecar.x.1",
        "another tenant's inbox": "_INBOX.producer_b.x.1",
        "another tenant's job": "results.producer_b.job-1",
        "results without a tenant": "results.job-1",
        "an inbox without a tenant": "_INBOX.x.1",
    }


async def test_replies_to_subjects_outside_the_tenants_namespace_are_never_published(
    tenancy: Tenancy,
) -> None:
    env = tenancy
    data = np.arange(4, dtype=np.float32)[None]
    for target, reply_to in forbidden_subjects(env.model).items():
        request_id = env.a.new_request_id()
        watch = await attack(env, reply_to, request_id)

        assert replies_in(watch) == [], f"a reply reached {target}"
        # Answered nowhere, terminated, and in the DLQ once, with the reason (the worker's own record).
        mine = [e for e in await dlq_entries(env.ops, env.model) if e["Jetinfer-Request-Id"] == request_id]
        assert len(mine) == 1, f"{target}: {mine}"
        assert mine[0]["Jetinfer-Dlq-Reason"] == "invalid_input", target
        assert re.search("not a reply subject|own inbox", mine[0]["Jetinfer-Dlq-Message"]), target
        assert mine[0]["Jetinfer-Reply-To"] == reply_to, target
        # Nothing was stored where a reply would have been: no new request in INFER, no forged result.
        assert await stored_on(env.ops, INFER_STREAM, ">") == 0, target
        assert await stored_on(env.ops, RESULTS_STREAM, ">") == 0, target
        # And the other tenant is served as before.
        np.testing.assert_array_equal((await env.b.infer(env.model, data, timeout=30)).output(), data)
        await watch.unsubscribe()
    assert env.b.duplicates_dropped == 0
    assert len(await dlq_entries(env.ops, env.model)) == len(forbidden_subjects(env.model))


async def test_a_tenant_can_publish_neither_as_another_tenant_nor_without_a_tenant(tenancy: Tenancy) -> None:
    env = tenancy
    for subject in (infer_subject(env.model, "producer_b"), infer_subject(env.model)):
        with pytest.raises(nats.errors.TimeoutError):  # the server drops it: no PubAck comes
            await env.a_raw.jetstream().publish(subject, identity_request("spoof"), timeout=1)
    await env.a_raw.flush()
    for _ in range(int(BOUND_S / 0.05)):  # the -ERR of each arrives on its own
        if len(env.a_errors) >= 2:
            break
        await asyncio.sleep(0.05)
    assert f'permissions violation for publish to "infer.{env.model}.producer_b"' in env.a_errors[0]
    assert f'permissions violation for publish to "infer.{env.model}"' in env.a_errors[1]
    assert await stored_on(env.ops, INFER_STREAM, ">") == 0


async def test_another_tenants_inbox_receives_nothing_even_at_its_real_address(tenancy: Tenancy) -> None:
    env = tenancy
    b_raw = await raw(env.url, "producer_b")
    try:
        listening = await b_raw.subscribe("_INBOX.producer_b.>")
        await b_raw.flush()
        # producer_a even knows B's client inbox (it cannot learn it; assume the worst).
        target = f"{env.b._prefix}.1"
        await attack(env, target, env.a.new_request_id())
        await b_raw.flush()
        assert listening.pending_msgs == 0
        data = np.ones((1, 4), np.float32)
        np.testing.assert_array_equal((await env.b.infer(env.model, data, timeout=30)).output(), data)
        assert env.b.duplicates_dropped == 0  # no reply for an id B never sent
    finally:
        await b_raw.close()


async def test_another_tenants_job_gets_no_forged_result_and_no_frame_made_a_duplicate(
    shipped_server: EmbeddedNatsServer, model_repo: Any, cat_jpeg: bytes
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    url = shipped_server.url
    async with running_worker(
        url,
        repo,
        [model],
        nats_user="worker",
        nats_password=PASSWORDS["worker"],
        nats_inbox_prefix=WORKER_INBOX,
    ):
        ops = await raw(url, "ops")
        a_raw = await raw(url, "producer_a")
        try:
            async with Client(settings=tenant_settings(url, "producer_b")) as b:
                clip = [Frame(index=i, timestamp_s=None, image=cat_jpeg) for i in range(4)]
                first = [r async for r in video_job(b, model, clip, job="clip-1", in_flight=4)]
                assert all(r.reply is not None for r in first)
                # What every producer can see: subject names of other tenants' jobs (so job names are no
                # secret, and ids must not be derivable from them) ...
                seen = await a_raw.jetstream().stream_info(RESULTS_STREAM, subjects_filter=">")
                assert "results.producer_b.clip-1" in (seen.state.subjects or {})
                # ... and the duplicate window, which INFER shares between tenants (this is the attack):
                probe = a_raw.jetstream()
                body = identity_request("shared-window")
                await probe.publish(infer_subject(model, "producer_a"), body, headers={"Nats-Msg-Id": "x"})
                async with Client(settings=tenant_settings(url, "producer_b")) as b_probe:
                    dup = await b_probe.js.publish(
                        infer_subject(model, "producer_b"), body, headers={"Nats-Msg-Id": "x"}
                    )
                assert dup.duplicate  # a tenant CAN make a known id of another tenant a duplicate
                await settled(ops, model)

                # producer_a guesses the next job's name and publishes every id B used to use for its
                # frames (`<job>-<index>`), each also replying into B's results, ahead of B's job.
                for index in range(4):
                    guess = f"clip-2-{index:08d}"
                    await a_raw.jetstream().publish(
                        infer_subject(model, "producer_a"),
                        cat_jpeg,
                        headers={
                            **request_headers(guess, "results.producer_b.clip-2", content_type="image/jpeg"),
                        },
                    )
                await settled(ops, model)
                assert await stored_on(ops, RESULTS_STREAM, "results.producer_b.clip-2") == 0
                second = [r async for r in video_job(b, model, clip, job="clip-2", in_flight=4)]
                assert [r.index for r in second] == [0, 1, 2, 3]
                assert all(r.reply is not None and not r.resumed for r in second)
                tag = b.id_tag("clip-2")
                assert tag is not None
                assert [r.reply.id for r in second if r.reply] == [f"clip-2-{tag}-{i:08d}" for i in range(4)]
                np.testing.assert_array_equal(second[0].reply.output(), first[0].reply.output())  # type: ignore[union-attr]
        finally:
            await a_raw.close()
            await ops.close()


async def test_through_the_worker_a_tenant_writes_only_where_it_may_write_itself(tenancy: Tenancy) -> None:
    env = tenancy
    published: list[str] = []
    watch = await env.ops.subscribe("_INBOX.producer_a.>")
    results = await env.ops.subscribe("results.producer_a.>")
    data = np.ones((1, 4), np.float32)
    await env.a.infer(env.model, data, timeout=30)
    await env.a.publish(
        env.model, data, request_id=env.a.new_request_id(), reply_to="results.producer_a.job-9"
    )
    await settled(env.ops, env.model)
    for subscription in (watch, results):
        while subscription.pending_msgs:
            msg = subscription._pending_queue.get_nowait()
            if msg.headers and HEADER_STATUS in msg.headers:
                published.append(msg.subject)
    assert any(s.startswith("_INBOX.producer_a.") for s in published)
    assert "results.producer_a.job-9" in published
    for subject in published:  # producer_a may publish there itself: the worker gave it nothing more
        await env.a_raw.publish(subject, b"mine")
    await env.a_raw.flush()
    await env.ops.flush()
    assert env.a_errors == []


async def test_the_server_keeps_the_worker_out_of_its_own_and_the_sidecars_inbox(
    shipped_server: EmbeddedNatsServer,
) -> None:
    errors: list[str] = []
    worker = await raw(shipped_server.url, "worker", errors)
    sidecar = await raw(shipped_server.url, "sidecar")
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(b'{"status": "unchanged"}')

        await worker.subscribe("jetinfer.control.reload.m", cb=answer)
        await worker.flush()
        # Answering the sidecar's signal is a response (allow_responses) ...
        reply = await sidecar.request("jetinfer.control.reload.m", b"{}", timeout=BOUND_S)
        assert reply.data == b'{"status": "unchanged"}'
        # ... publishing into its inbox, or the worker's own, is not.
        for subject in ("_INBOX.sidecar.forged", f"{WORKER_INBOX}.forged"):
            await worker.publish(subject, b"forged")
        await worker.flush()
        for _ in range(int(BOUND_S / 0.05)):
            if len(errors) >= 2:
                break
            await asyncio.sleep(0.05)
        assert errors == [
            'nats: permissions violation for publish to "_inbox.sidecar.forged"',
            'nats: permissions violation for publish to "_inbox.worker.forged"',
        ]
    finally:
        await worker.close()
        await sidecar.close()


async def test_a_tenant_reads_all_of_a_large_job_result_set_through_flow_control(
    shipped_server: EmbeddedNatsServer,
) -> None:
    # Ordered consumers ask for flow-control answers ($JS.FC...) once megabytes are pending: accounts.conf
    # gives tenants allow_responses for them (without it delivery stalls after a few megabytes).
    ops = await raw(shipped_server.url, "ops")
    b_errors: list[str] = []
    b = await raw(shipped_server.url, "producer_b", b_errors)
    try:
        await ops.jetstream().add_stream(StreamConfig(name=RESULTS_STREAM, subjects=["results.>"]))
        count = 60
        for _ in range(count):
            await ops.jetstream().publish("results.producer_b.big", os.urandom(200_000))
        arrived = asyncio.Event()
        got: list[int] = []

        async def on_result(msg: Msg) -> None:
            got.append(len(msg.data))
            if len(got) == count:
                arrived.set()

        await b.jetstream().subscribe(
            "results.producer_b.big",
            stream=RESULTS_STREAM,
            config=ConsumerConfig(name="big-job"),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            cb=on_result,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), BOUND_S)
        assert len(got) == count
        assert b_errors == []
    finally:
        await b.close()
        await ops.close()


# -- stream and consumer set-up -------------------------------------------------------------------------


async def test_a_consumer_made_before_tenants_is_widened_and_any_other_filter_refused(
    nc: Any, unique: str
) -> None:
    js = nc.jetstream()
    settings = StreamSettings()
    model, other = f"old-{unique}", f"odd-{unique}"
    await register_model(js, model, settings)
    await register_model(js, other, settings)
    stream = await js.stream_info(INFER_STREAM)
    assert {*infer_subjects(model), *infer_subjects(other)} <= set(stream.config.subjects or [])
    config = dict(ack_policy=AckPolicy.EXPLICIT, max_deliver=5, ack_wait=30, max_ack_pending=4096)
    await js.add_consumer(
        INFER_STREAM,
        ConsumerConfig(durable_name=consumer_name(model), filter_subject=f"infer.{model}", **config),
    )
    await ensure_consumer(js, model, settings)
    widened = await js.consumer_info(INFER_STREAM, consumer_name(model))
    assert widened.config.filter_subjects == infer_subjects(model)
    await ensure_consumer(js, model, settings)  # idempotent
    await js.add_consumer(
        INFER_STREAM,
        ConsumerConfig(durable_name=consumer_name(other), filter_subject=f"infer.{other}.only-one", **config),
    )
    with pytest.raises(StreamMismatchError, match="filter_subjects"):
        await ensure_consumer(js, other, settings)


# -- no silent drop: a reply the server refuses is not an answer (the worker's settle stage) -------------


def refused_metric(worker: Any, model: str, reason: str) -> float | None:
    value: float | None = worker.registry.get_sample_value(
        "jetinfer_replies_refused_total", {"model": model, "version": "1", "status": reason}
    )
    return value


CARELESS = """
authorization {
  users = [
    { user = ops, password = ops }
    # A careless operator: the worker may reply only into _INBOX.app.>, but a client uses _INBOX.other.
    { user = worker, password = worker, permissions = {
        publish = { allow = ["$JS.>", "_INBOX.app.>", "results.>", "dlq.>"] }
        subscribe = { allow = ["_INBOX.worker.>", "jetinfer.control.reload.>", "$JS.EVENT.>"] } } }
    { user = client, password = client, permissions = {
        publish = { allow = ["infer.>", "$JS.API.INFO", "$JS.API.STREAM.INFO.INFER"] }
        subscribe = { allow = ["_INBOX.other.>"] } } }
  ]
}
"""


async def test_a_reply_the_server_refuses_is_settled_as_a_failure_with_a_dlq_entry(
    model_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    repo, model = model_repo("identity")
    with EmbeddedNatsServer(extra_config=CARELESS) as server:
        async with running_worker(
            server.url,
            repo,
            [model],
            nats_user="worker",
            nats_password="worker",
            nats_inbox_prefix=WORKER_INBOX,
        ) as worker:
            client = await nats.connect(
                server.url, user="client", password="client", inbox_prefix="_INBOX.other"
            )
            ops = await nats.connect(server.url, user="ops", password="ops")
            try:
                reply_to = "_INBOX.other.lost.1"
                with caplog.at_level(logging.WARNING):
                    await client.jetstream().publish(
                        infer_subject(model),
                        identity_request("lost-1"),
                        headers=request_headers("lost-1", reply_to),
                    )
                    await settled(ops, model, bound_s=10)
                [entry] = await dlq_entries(ops, model)
                assert entry["Jetinfer-Dlq-Reason"] == "reply_refused"
                assert entry["Jetinfer-Request-Id"] == "lost-1"
                assert refused_metric(worker, model, "reply_refused") == 1
                warnings = [
                    r for r in caplog.records if r.levelno == logging.WARNING and reply_to in r.getMessage()
                ]
                assert len(warnings) == 1
                assert worker.registry.get_sample_value(
                    "jetinfer_requests_total", {"model": model, "version": "1", "status": "ok"}
                ) in (None, 0.0)  # not counted as answered
            finally:
                await client.close()
                await ops.close()


MAX_PAYLOAD = 64 * 1024


async def oversized_reply_case(
    model_repo: Any, caplog: pytest.LogCaptureFixture, reply_body_bytes: int
) -> None:
    """A request whose identity reply body is `reply_body_bytes` long, on a server of MAX_PAYLOAD."""
    repo, model = model_repo("identity")
    with EmbeddedNatsServer(max_payload_bytes=MAX_PAYLOAD) as server:
        async with running_worker(server.url, repo, [model], ack_wait_s=2, max_deliver=2) as worker:
            client = await nats.connect(server.url)
            try:
                inbox = client.new_inbox()
                replies = await client.subscribe(inbox)

                def reply_size(values: int) -> int:
                    outputs = {"output": np.zeros((1, values), np.float32)}
                    timing = {"queue_ms": 1.5, "infer_ms": 1.5, "total_ms": 1.5}
                    return len(encode_outputs("big-1", model, "1", outputs, timing))

                values = (reply_body_bytes - reply_size(0)) // 4
                assert reply_size(values) <= reply_body_bytes < reply_size(values + 1)
                body = encode_request(
                    InferRequest(
                        id="big-1", inputs=(Tensor.from_numpy("input", np.zeros((1, values), np.float32)),)
                    )
                )
                headers = {"Nats-Msg-Id": "big-1", "Jetinfer-Reply-To": inbox}
                with caplog.at_level(logging.WARNING):
                    await client.jetstream().publish(infer_subject(model), body, headers=headers)
                    answer = await replies.next_msg(timeout=10)
                    await settled(client, model, bound_s=10)
                error = decode_reply(answer.data)
                assert getattr(error, "code", None) == "too_large"
                [entry] = await dlq_entries(client, model)
                assert entry["Jetinfer-Dlq-Reason"] == "too_large"
                assert refused_metric(worker, model, "too_large") == 1
                assert worker._nc.stats["reconnects"] == 0  # the worker kept its connection
                assert any(inbox in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
            finally:
                await client.close()


async def test_a_reply_over_max_payload_is_answered_too_large_with_a_dlq_entry(
    model_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The request fits (its headers are smaller than the reply's added fields), the reply does not.
    await oversized_reply_case(model_repo, caplog, MAX_PAYLOAD + 8)


async def test_a_reply_whose_headers_push_it_over_max_payload_costs_the_worker_no_connection(
    model_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # nats-py checks only the body against max_payload; the server counts headers too and closes the
    # connection of a client that sends more (verified: "maximum payload exceeded: 1048599 vs 1048576").
    await oversized_reply_case(model_repo, caplog, MAX_PAYLOAD - 8)


async def test_without_authentication_the_worker_still_replies_only_below_the_reply_prefixes(
    nats_server: Any, model_repo: Any
) -> None:
    # A single-tenant deployment without NATS permissions: the worker may publish anywhere, so its reply
    # policy is all that keeps replies off the reload signal, the DLQ, INFER and the JetStream API.
    repo, model = model_repo("identity")
    async with running_worker(nats_server.url, repo, [model]), Client(nats_server.url) as client:
        ops = await nats.connect(nats_server.url)
        try:
            targets = [
                f"jetinfer.control.reload.{model}",
                f"dlq.{model}",
                f"infer.{model}",
                f"$JS.API.STREAM.MSG.DELETE.{INFER_STREAM}",
                f"$JS.ACK.{INFER_STREAM}.{consumer_name(model)}.1.1.1.1700000000000000000.0",
            ]
            for reply_to in targets:
                watch = await ops.subscribe(reply_to)
                await ops.flush()
                request_id = client.new_request_id()
                await client.js.publish(
                    infer_subject(model),
                    identity_request(request_id),
                    headers=request_headers(request_id, reply_to),
                )
                await settled(ops, model)
                assert replies_in(watch) == [], reply_to
                mine = [e for e in await dlq_entries(ops, model) if e["Jetinfer-Request-Id"] == request_id]
                assert [e["Jetinfer-Dlq-Reason"] for e in mine] == ["invalid_input"], reply_to
                assert await stored_on(ops, INFER_STREAM, infer_subject(model)) == 0, reply_to
                await watch.unsubscribe()
            data = np.ones((1, 4), np.float32)
            np.testing.assert_array_equal((await client.infer(model, data, timeout=30)).output(), data)
        finally:
            await ops.close()


async def test_an_invalid_request_near_max_payload_is_dead_lettered_without_costing_the_worker_its_connection(
    model_repo: Any,
) -> None:
    # The DLQ copy is the request's body with more headers (reason, message up to 512 characters): for a
    # request near max_payload it is larger than the server takes, and the server closes the worker's
    # connection, which fails every request in flight. The copy must fit (e.g. without the body, saying so).
    repo, model = model_repo("identity")
    with EmbeddedNatsServer(max_payload_bytes=MAX_PAYLOAD) as server:
        async with running_worker(server.url, repo, [model], ack_wait_s=2, max_deliver=2) as worker:
            client = await nats.connect(server.url)
            try:
                inbox = client.new_inbox()
                replies = await client.subscribe(inbox)
                headers = {"Nats-Msg-Id": "near-1", "Jetinfer-Reply-To": inbox}
                header_bytes = len(b"NATS/1.0\r\n\r\n") + sum(
                    len(f"{k}: {v}\r\n") for k, v in headers.items()
                )

                def request(values: int) -> bytes:
                    wrong = Tensor.from_numpy(
                        "input", np.zeros((1, values), np.float64)
                    )  # the model takes FP32
                    return encode_request(InferRequest(id="near-1", inputs=(wrong,)))

                values = (MAX_PAYLOAD - header_bytes) // 8
                while len(request(values)) + header_bytes > MAX_PAYLOAD:
                    values -= 1
                body = request(values)
                assert MAX_PAYLOAD - 16 < len(body) + header_bytes <= MAX_PAYLOAD  # fits, by a few bytes
                await client.jetstream().publish(infer_subject(model), body, headers=headers)
                answer = await replies.next_msg(timeout=BOUND_S)
                assert getattr(decode_reply(answer.data), "code", None) == "invalid_input"
                await settled(client, model, bound_s=10)
                assert [e["Jetinfer-Dlq-Reason"] for e in await dlq_entries(client, model)] == [
                    "invalid_input"
                ]
                assert worker._nc.stats["reconnects"] == 0
            finally:
                await client.close()


# -- the client library's side ---------------------------------------------------------------------------


def test_a_tenant_picks_the_subjects_the_inbox_and_the_results_of_its_client() -> None:
    from jetinfer.errors import SettingsError
    from jetinfer.settings import load_settings

    settings = load_settings(ClientSettings, environ={"JETINFER_TENANT": "producer_a"})
    assert settings.tenant == "producer_a"
    assert settings.nats_inbox_prefix == "_INBOX.producer_a"
    client = Client(settings=settings)
    assert client.infer_subject("m") == "infer.m.producer_a"
    assert client.results_subject("job-1") == "results.producer_a.job-1"
    plain = Client(settings=ClientSettings())
    assert (plain.infer_subject("m"), plain.results_subject("job-1")) == ("infer.m", "results.job-1")
    assert plain.id_tag("job-1") is None  # without a tenant, ids stay exactly as they were
    assert ClientSettings(tenant="t", nats_inbox_prefix="_INBOX.t.app").nats_inbox_prefix == "_INBOX.t.app"
    for bad in ({"tenant": "Producer.A"}, {"tenant": "t", "nats_inbox_prefix": "_INBOX.other"}):
        with pytest.raises(SettingsError) as info:
            ClientSettings(**bad)  # type: ignore[arg-type]
        assert "JETINFER_" in str(info.value)


def test_ids_are_random_and_job_tags_need_the_tenants_credential(tmp_path: Path) -> None:
    from jetinfer.producer.ids import id_key, keyed_tag, new_request_id

    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)  # 128 random bits each
    seed = tmp_path / "user.nk"
    seed.write_bytes(b"SUAEXAMPLESEED")
    keys = {
        "a": id_key(ClientSettings(nats_user="a", nats_password="secret-a", tenant="a")),
        "a again": id_key(ClientSettings(nats_user="a", nats_password="secret-a", tenant="a")),
        "b": id_key(ClientSettings(nats_user="b", nats_password="secret-b", tenant="b")),
        "nkey": id_key(ClientSettings(nats_nkey_seed_file=seed, tenant="a")),
        "token": id_key(ClientSettings(nats_token="tok", tenant="a")),
    }
    assert keys["a"] == keys["a again"]  # stable: a re-run of a job finds its frames' ids again
    assert len({keys["a"], keys["b"], keys["nkey"], keys["token"]}) == 4
    assert id_key(ClientSettings(tenant="a")) == b""  # no credential, nothing to isolate
    tag = keyed_tag(keys["a"], "clip-1")
    assert tag == keyed_tag(keys["a"], "clip-1") != keyed_tag(keys["b"], "clip-1")
    assert len(tag) == 24  # 96 bits
