"""Fuzzing the worker (issue 3, slow): over 10,000 generated requests never hurt it.

Hypothesis generates the cases (payloads and headers: huge and negative shapes, byte counts that do
not match, wrong types, non-UTF-8 ids and header values, extension types, path-traversal model
names, random bytes); they are then published in batches to one worker process. Each case is either
refused at publish, or stored and answered (an error reply, or a result where the case happened to
be valid). The worker process stays up, its memory levels off (RSS after the last case against RSS
after the first 2,000), nothing is left in INFER, and a good request is answered at the end.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from jetinfer.protocol import ErrorReply, InferResponse, decode_reply, request_headers
from jetinfer.settings import StreamSettings
from jetinfer.streams import INFER_STREAM, consumer_name, ensure_consumer, ensure_streams, register_model
from tests import faults

pytestmark = pytest.mark.slow

CASES = 10_500
WARMUP_CASES = 2_000
CHUNK = 250
NON_UTF8_ID = b"\xa6\xff\xfe\xc3\x28\xa0\xa1"  # a msgpack str of 6 bytes that are not UTF-8

# -- strategies ---------------------------------------------------------------------------------------

ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
dims = st.one_of(
    st.integers(-5, 300),
    st.sampled_from([0, -1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**64 - 1),
)
ext = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20)
)
wrong = st.one_of(scalars, ext, st.binary(max_size=32), st.lists(ints, max_size=3), st.just({}))
datatypes = st.one_of(
    st.sampled_from(["FP32", "FP16", "UINT8", "INT64", "BOOL", "FP64", "fp32", "", "STRING", "BF16"]), wrong
)


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    """A tensor map, mostly plausible, with one or more fields wrong."""
    shape = draw(st.one_of(st.lists(dims, min_size=0, max_size=10), wrong))
    datatype = draw(datatypes)
    if (
        draw(st.booleans())
        and isinstance(shape, list)
        and all(isinstance(d, int) and 0 <= d < 64 for d in shape)
    ):
        size = int(np.prod(shape)) * 4 + draw(st.sampled_from([0, 0, 0, -4, 4, 1]))
        data: Any = bytes(max(0, size))
    else:
        data = draw(st.one_of(st.binary(max_size=64), wrong))
    tensor = {"name": draw(st.one_of(st.just("input"), st.text(max_size=8), wrong)), "datatype": datatype}
    tensor.update({"shape": shape, "data": data})
    for key in draw(st.lists(st.sampled_from(list(tensor)), max_size=2)):
        tensor.pop(key, None)
    return tensor


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["map", "map", "map", "bytes", "other-msgpack", "ext-top"]))
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    if kind == "other-msgpack":
        return msgpack.packb(draw(st.one_of(scalars, st.lists(scalars, max_size=4))), use_bin_type=True)
    if kind == "ext-top":
        return msgpack.packb(draw(ext))
    body: dict[Any, Any] = {
        "id": draw(st.one_of(st.text(min_size=1, max_size=40), st.just("__ID__"), wrong)),
        "inputs": draw(st.one_of(st.lists(tensors(), min_size=0, max_size=3), wrong)),
    }
    if draw(st.booleans()):
        body["parameters"] = draw(
            st.one_of(st.dictionaries(st.text(max_size=5), st.one_of(scalars, ext)), wrong)
        )
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.one_of(ints, st.binary(max_size=4)))] = 1  # keys that are not strings
    raw: bytes = msgpack.packb(body, use_bin_type=True)
    return raw.replace(b"\xa6__ID__", NON_UTF8_ID)  # same length: the map stays well formed


header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters=":"), max_size=40
)


@dataclass
class Case:
    """One generated request."""

    body: bytes
    content_type: str | None  # None: no Content-Type header
    deadline: str
    msg_id: str  # "": no id at all
    model: str  # a bad model name
    extra: dict[str, str] = field(default_factory=dict)

    # Hypothesis draws every field; the case number picks which of the rarer ones apply, so that most
    # cases reach the worker's decoder: a bad model name in 1 of 10, odd JetStream headers in 1 of 10,
    # a bad deadline in 1 of 10, an odd Content-Type in 1 of 10, a fuzzed Nats-Msg-Id in 1 of 10.
    def content_type_for(self, number: int) -> str | None:
        return self.content_type if number % 10 == 9 else "application/msgpack"

    def msg_id_for(self, number: int) -> str:
        return self.msg_id if number % 10 == 1 else f"fuzz-{number}"

    def model_for(self, number: int, served: str) -> str:
        return self.model if number % 10 == 3 else served

    def extra_for(self, number: int) -> dict[str, str]:
        return self.extra if number % 10 == 5 else {}

    def deadline_for(self, number: int) -> str | None:
        return self.deadline if number % 10 == 7 else None


traversal = st.one_of(
    st.sampled_from(
        ["../etc", "..", "a/../../b", "model/../../x", "%2e%2e%2f", "model name", "A-Upper", "x" * 65]
    ),
    st.text(max_size=20).filter(lambda t: t not in ("",)),
)

cases = st.builds(
    Case,
    body=bodies(),
    content_type=st.one_of(
        st.none(),
        st.sampled_from(["image/jpeg", "image/png", "text/plain", "application/msgpack"]),
        header_text,
    ),
    deadline=st.one_of(st.integers(-(2**70), 2**70).map(str), header_text, st.just(str(2**63 * 10))),
    msg_id=st.one_of(st.just(""), header_text),
    model=traversal,
    extra=st.dictionaries(
        st.sampled_from(["Nats-Expected-Stream", "Jetinfer-Foo", "Nats-Rollup", "Status"]),
        header_text,
        max_size=2,
    ),
)


def generate(count: int) -> list[Case]:
    """`count` cases from the strategies (generation only; the checks run on all of them at once)."""
    found: list[Case] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def collect(case: Case) -> None:
        found.append(case)

    collect()
    return found


# -- running them ---------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def raw_publish(url: str, subject: str, reply: str, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """An HPUB written by hand: header values that nats-py would never send (non-UTF-8 bytes)."""
    host, port = url.removeprefix("nats://").split(":")
    head = b"NATS/1.0\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"headers":true,"no_responders":true}\r\n')
        command = f"HPUB {subject} {reply} {len(head)} {len(head) + len(body)}\r\n".encode()
        sock.sendall(command + head + body + b"\r\nPING\r\n")
        answer = b""
        while b"PONG" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk


@dataclass
class Outcomes:
    refused_at_publish: int = 0
    duplicate_ids: int = 0
    stored: set[int] = field(default_factory=set)
    replies: dict[int, Any] = field(default_factory=dict)


async def publish_case(js: Any, model: str, inbox: str, number: int, case: Case, outcomes: Outcomes) -> None:
    headers = request_headers(f"fuzz-{number}", f"{inbox}.{number}")
    msg_id = case.msg_id_for(number)
    if msg_id:
        headers["Nats-Msg-Id"] = msg_id
    else:
        headers.pop("Nats-Msg-Id")
    content_type = case.content_type_for(number)
    if content_type is None:
        headers.pop("Content-Type")
    else:
        headers["Content-Type"] = content_type
    deadline = case.deadline_for(number)
    if deadline is not None:
        headers["Jetinfer-Deadline"] = deadline
    headers.update(case.extra_for(number))
    try:
        ack = await js.publish(
            f"infer.{case.model_for(number, model)}", case.body, headers=headers, timeout=10
        )
    except Exception:
        outcomes.refused_at_publish += 1
        return
    if ack.duplicate:
        outcomes.duplicate_ids += 1
    else:
        outcomes.stored.add(number)


async def test_ten_thousand_generated_requests_never_hurt_the_worker(
    own_nats: Any, model_repo: Any, tmp_path: Path
) -> None:
    generated_at = time.monotonic()
    generated = await asyncio.to_thread(generate, CASES)
    generate_s = time.monotonic() - generated_at
    assert len(generated) >= 10_000
    repo, model = model_repo("identity")
    stream = StreamSettings()
    nc = await nats.connect(own_nats.url, pending_size=256 * 1024 * 1024)
    worker = faults.WorkerProcess(own_nats.url, repo, model, tmp_path / "worker.log", {"max_batch": 64})
    with faults.worker_processes(worker):
        js = nc.jetstream()
        await ensure_streams(js, stream)
        await register_model(js, model, stream)
        await ensure_consumer(js, model, stream)
        worker.start()
        await worker.ready()
        assert worker.process is not None
        outcomes = Outcomes()
        all_answered = asyncio.Event()

        async def on_reply(msg: Any) -> None:
            number = int(msg.subject.rsplit(".", 1)[-1])
            outcomes.replies.setdefault(number, decode_reply(msg.data))
            if outcomes.stored <= outcomes.replies.keys():
                all_answered.set()

        inbox = nc.new_inbox()
        await nc.subscribe(f"{inbox}.*", cb=on_reply, pending_msgs_limit=-1)

        async def run(first: int, last: int) -> None:
            for start in range(first, last, CHUNK):
                numbers = range(start, min(start + CHUNK, last))
                await asyncio.gather(
                    *(publish_case(js, model, inbox, n, generated[n], outcomes) for n in numbers)
                )
            all_answered.clear()
            if not outcomes.stored <= outcomes.replies.keys():
                await asyncio.wait_for(all_answered.wait(), 120)

        await run(0, WARMUP_CASES)
        warm_rss = rss_bytes(worker.process.pid)
        await run(WARMUP_CASES, len(generated))
        # Non-UTF-8 header values, written by hand (nats-py cannot send them).
        raw_numbers = range(len(generated), len(generated) + 200)
        for number in raw_numbers:
            body = msgpack.packb({"id": f"raw-{number}", "inputs": []}, use_bin_type=True)
            await asyncio.to_thread(
                raw_publish,
                own_nats.url,
                f"infer.{model}",
                "_INBOX.nobody",
                [
                    (b"Nats-Msg-Id", b"raw-\xff\xfe" + str(number).encode()),
                    (b"Jetinfer-Reply-To", f"{inbox}.{number}".encode()),
                    (b"Jetinfer-Deadline", b"\xc3\x28\xa0\xa1"),
                    (b"Content-Type", b"application/msgpack\xff"),
                ],
                body,
            )
            outcomes.stored.add(number)
        all_answered.clear()
        if not outcomes.stored <= outcomes.replies.keys():
            await asyncio.wait_for(all_answered.wait(), 60)
        final_rss = rss_bytes(worker.process.pid)

        # A good request is answered at the end, by the same process.
        good = faults.frames(77)
        reply_sub = await nc.subscribe(f"{inbox}.good")
        tensor = {"name": "input", "datatype": "FP32", "shape": [1, 4], "data": good.tobytes()}
        await js.publish(
            f"infer.{model}",
            msgpack.packb({"id": "good", "inputs": [tensor]}, use_bin_type=True),
            headers=request_headers("good", f"{inbox}.good"),
        )
        good_reply = decode_reply((await reply_sub.next_msg(timeout=30)).data)
        info = await js.consumer_info(INFER_STREAM, consumer_name(model))
        alive = worker.process.poll() is None
        await nc.close()

    errors = [r for r in outcomes.replies.values() if isinstance(r, ErrorReply)]
    codes: dict[str, int] = {}
    for r in errors:
        codes[r.code] = codes.get(r.code, 0) + 1
    print(
        f"[fuzz] cases={len(generated) + len(raw_numbers)} (generated in {generate_s:.0f} s) "
        f"refused_at_publish={outcomes.refused_at_publish} duplicate_ids={outcomes.duplicate_ids} "
        f"stored={len(outcomes.stored)} error_replies={codes} "
        f"ok_replies={len(outcomes.replies) - len(errors)} rss_after_{WARMUP_CASES}={warm_rss >> 20} MiB "
        f"rss_end={final_rss >> 20} MiB"
    )
    assert alive, worker.log()[-3000:]
    assert "Traceback" not in worker.log()
    unanswered = outcomes.stored - outcomes.replies.keys()
    assert not unanswered, f"{len(unanswered)} stored cases got no reply, e.g. {sorted(unanswered)[:10]}"
    assert all(isinstance(r, ErrorReply | InferResponse) for r in outcomes.replies.values())
    assert len(errors) > len(outcomes.stored) * 0.9, "most generated cases are invalid and must be refused"
    assert all(r.code != "internal" for r in errors), [r.message for r in errors if r.code == "internal"][:5]
    assert isinstance(good_reply, InferResponse)
    np.testing.assert_array_equal(good_reply.output(), good)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert final_rss < warm_rss * 1.5, f"RSS grew from {warm_rss >> 20} to {final_rss >> 20} MiB"
