"""docs/protocol.md says what the code does: its hex dumps, tables and limits are checked here.

The worked example's hex dumps (fenced blocks with the info string ``hex <name>``) must be what
jetinfer encodes and decodes, byte for byte, and the decoded maps (``diag <name>``, JSON with msgpack
bin written h'…') must be exactly what those bytes hold, key order and number types included. The
datatype, error-code, header and limit tables must match jetinfer's own definitions in both directions.
"""

from __future__ import annotations

import json
import re
import typing
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import jetinfer.errors
from jetinfer.errors import (
    InvalidInputError,
    PermanentError,
    RequestError,
    RetryableError,
    TooLargeError,
    error_for_code,
)
from jetinfer.protocol import (
    CONTENT_TYPE_JPEG,
    CONTENT_TYPE_MSGPACK,
    CONTENT_TYPE_PNG,
    DATATYPES,
    HEADER_CONTENT_TYPE,
    HEADER_DEADLINE,
    HEADER_DLQ_TRUNCATED,
    HEADER_MSG_ID,
    HEADER_REPLY_TO,
    HEADER_STATUS,
    MODEL_NAME_PATTERN,
    ErrorReply,
    InferRequest,
    InferResponse,
    Limits,
    Tensor,
    decode_reply,
    decode_request,
    encode_error,
    encode_request,
    encode_response,
)
from jetinfer.streams import dlq_subject, infer_subject, reload_subject, results_subject

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "protocol.md"
DEFAULT_LIMITS = Limits()
EXAMPLE_VALUES = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


@cache
def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


def fenced_blocks(info: str) -> dict[str, str]:
    """The bodies of fenced blocks whose info string is `info <name>`, by name."""
    blocks: dict[str, str] = {}
    for match in re.finditer(r"^```(\S+)[ \t]*(\S*)[ \t]*\n(.*?)^```[ \t]*$", doc_text(), re.M | re.S):
        kind, name, body = match.groups()
        if kind == info:
            assert name not in blocks, f"two ```{info} {name} blocks"
            blocks[name] = body
    return blocks


def parse_hexdump(dump: str) -> bytes:
    """Bytes of a `hexdump -C` listing, checking its offsets, its ASCII column and its final length line."""
    data = bytearray()
    lines = dump.strip("\n").splitlines()
    for line in lines[:-1]:
        match = re.fullmatch(r"([0-9a-f]{8})  ((?:[0-9a-f]{2} {1,2}){1,16})\s*\|(.*)\|", line)
        assert match, f"not a hexdump -C line: {line!r}"
        offset, hex_part, ascii_part = match.groups()
        assert int(offset, 16) == len(data), f"offset {offset} after {len(data)} bytes"
        chunk = bytes.fromhex(hex_part)
        assert len(chunk) == 16 or line is lines[-2], f"short line in the middle: {line!r}"
        assert ascii_part == "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk), line
        data += chunk
    assert re.fullmatch(r"[0-9a-f]{8}", lines[-1]), "the last line of hexdump -C is the length"
    assert int(lines[-1], 16) == len(data), "length line"
    return bytes(data)


def parse_diag(text: str) -> Any:
    """JSON with msgpack bin written h'hex' (CBOR diagnostic notation) -> Python values, bin as bytes."""
    as_json = re.sub(r"h'([0-9a-f ]*)'", lambda m: json.dumps({"$bin": m.group(1)}), text)

    def pairs(items: list[tuple[str, Any]]) -> Any:
        if len(items) == 1 and items[0][0] == "$bin":
            return bytes.fromhex(items[0][1])
        return dict(items)

    return json.loads(as_json, object_pairs_hook=pairs)


def exact(value: Any) -> Any:
    """A form of `value` whose equality also compares map key order and int/float/bool types."""
    if isinstance(value, dict):
        return ("map", [(key, exact(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("array", [exact(item) for item in value])
    return (type(value).__name__, value)


def table_rows(heading: str, first_header: str) -> list[list[str]]:
    """The body rows of the first table after `heading` whose first column is headed `first_header`."""
    text = doc_text()
    start = text.index(heading)
    lines = text[start:].splitlines()
    for index, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[index + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table headed {first_header!r} after {heading!r}")


def code_span(cell: str) -> str:
    match = re.match(r"`([^`]+)`", cell)
    assert match, f"cell {cell!r} does not start with a `code` span"
    return match.group(1)


def first_int(cell: str) -> int:
    match = re.search(r"\d+", cell)
    assert match, f"no number in {cell!r}"
    return int(match.group())


def documented_length(pattern: str) -> int:
    match = re.search(pattern, doc_text())
    assert match, f"the doc does not say {pattern!r}"
    return int(match.group(1))


# -- the worked example ----------------------------------------------------------------------------------


def test_the_worked_example_has_its_hex_dumps_and_decoded_maps() -> None:
    assert set(fenced_blocks("hex")) == {"request", "reply", "error-reply"}
    assert set(fenced_blocks("diag")) == {"request", "reply", "error-reply"}


@pytest.mark.parametrize("name", ["request", "reply", "error-reply"])
def test_each_decoded_map_is_exactly_what_its_bytes_hold(name: str) -> None:
    raw = parse_hexdump(fenced_blocks("hex")[name])
    documented = parse_diag(fenced_blocks("diag")[name])
    assert exact(msgpack.unpackb(raw, raw=False, strict_map_key=True)) == exact(documented)


def test_the_request_bytes_decode_to_the_documented_tensor_and_encode_back() -> None:
    raw = parse_hexdump(fenced_blocks("hex")["request"])
    expected = InferRequest(
        id="example-1",
        inputs=(Tensor(name="input", datatype="FP32", shape=(1, 4), data=EXAMPLE_VALUES.tobytes()),),
    )
    decoded = decode_request(raw)
    assert decoded == expected
    np.testing.assert_array_equal(decoded.inputs[0].to_numpy(), EXAMPLE_VALUES)
    assert encode_request(expected) == raw
    assert (
        encode_request(InferRequest(id="example-1", inputs=(Tensor.from_numpy("input", EXAMPLE_VALUES),)))
        == raw
    )
    assert len(raw) == documented_length(r"\*\*\(b\) The exact bytes\*\* \((\d+) bytes")


def test_the_reply_bytes_decode_to_the_documented_reply_and_encode_back() -> None:
    raw = parse_hexdump(fenced_blocks("hex")["reply"])
    documented = parse_diag(fenced_blocks("diag")["reply"])
    reply = decode_reply(raw)
    assert isinstance(reply, InferResponse)
    assert reply == InferResponse(
        id=documented["id"],
        model_name=documented["model_name"],
        model_version=documented["model_version"],
        outputs=tuple(
            Tensor(name=t["name"], datatype=t["datatype"], shape=tuple(t["shape"]), data=t["data"])
            for t in documented["outputs"]
        ),
        timing=documented["timing"],
    )
    assert reply.id == "example-1"
    assert reply.model_name == "identity"
    assert set(reply.timing) == {"queue_ms", "infer_ms", "total_ms"}
    np.testing.assert_array_equal(reply.output("output"), EXAMPLE_VALUES)
    assert encode_response(reply) == raw
    assert len(raw) == documented_length(r"\*\*\(d\) The reply\*\* \((\d+) bytes")


def test_the_error_reply_bytes_decode_to_the_documented_error_and_encode_back() -> None:
    raw = parse_hexdump(fenced_blocks("hex")["error-reply"])
    documented = parse_diag(fenced_blocks("diag")["error-reply"])
    reply = decode_reply(raw)
    assert reply == ErrorReply(
        id=documented["id"], code=documented["error"]["code"], message=documented["error"]["message"]
    )
    assert isinstance(error_for_code(reply.code, reply.message), InvalidInputError)
    assert encode_error(reply.id, reply.code, reply.message) == raw


def test_the_client_run_printed_the_documented_bytes() -> None:
    console = fenced_blocks("console")
    assert len(console) == 1, "one ```console block: the run of the JavaScript client"
    printed = next(iter(console.values()))
    requests = re.findall(r"^request: ([0-9a-f]+)$", printed, re.M)
    replies = re.findall(r"^reply: ([0-9a-f]+)$", printed, re.M)
    assert requests == [parse_hexdump(fenced_blocks("hex")["request"]).hex()]
    assert replies == [parse_hexdump(fenced_blocks("hex")["reply"]).hex()]


def test_the_clients_use_the_protocols_header_names_and_subjects() -> None:
    clients = fenced_blocks("js")
    assert set(clients) == {"infer.mjs", "client.mjs"}
    for code in clients.values():
        headers = re.findall(r'h\.set\("([^"]+)"', code)
        assert headers == [HEADER_REPLY_TO, HEADER_DEADLINE, HEADER_CONTENT_TYPE]
        assert f'"{CONTENT_TYPE_MSGPACK}"' in code
        assert "randomUUID()" in code  # ids nobody can guess
    example = clients["infer.mjs"]
    assert f'.publish("{infer_subject("identity")}"' in example
    assert "msgID: id" in example  # nats.js writes it as the Nats-Msg-Id header
    assert f'get("{HEADER_STATUS}")' in example
    client = clients["client.mjs"]  # tests/test_node_client.py runs it; here: the duties are written down
    assert "msgID: msgId" in client
    assert "`${entry.id}~r${entry.attempt}`" in client  # re-sends under <id>~r<n>
    assert r'replace(/~r[0-9]+$/, "")' in client  # replies deduplicated by request id
    assert 'status.type === "reconnect"' in client
    assert "`infer.${model}.${this.tenant}`" in client
    assert "`_INBOX.${tenant}`" in client


# -- tables ----------------------------------------------------------------------------------------------


def jetinfer_error_codes() -> dict[str, type[RequestError]]:
    """Every wire code a jetinfer.errors class carries, with the classes that carry it."""
    codes: dict[str, type[RequestError]] = {}
    for name in jetinfer.errors.__all__:
        cls = getattr(jetinfer.errors, name)
        if isinstance(cls, type) and issubclass(cls, RequestError):
            codes.setdefault(cls.code, cls)
    return codes


def test_the_error_code_table_is_exactly_jetinfers_codes() -> None:
    rows = table_rows("## Error codes", "code")
    documented = [code_span(row[0]) for row in rows]
    assert len(documented) == len(set(documented))
    assert set(documented) == set(jetinfer_error_codes())


def test_the_error_code_table_says_what_the_ack_policy_does() -> None:
    from jetinfer.worker.settle import AckAction, decide

    for code_cell, _meaning, who, retried, reply, dlq in table_rows("## Error codes", "code"):
        code = code_span(code_cell)
        error = error_for_code(code, "documented")
        assert error.code == code
        assert retried.startswith("yes") == isinstance(error, RetryableError), code
        assert retried.startswith("no") == isinstance(error, PermanentError), code
        if who.startswith("client"):
            assert dlq.startswith("no"), code
            assert not reply.startswith("yes"), code
            continue
        first = decide(error, deliveries=1, max_deliver=5, nak_delay_s=0.25)
        last = decide(error, deliveries=5, max_deliver=5, nak_delay_s=0.25)
        if retried.startswith("yes"):
            assert first.action is AckAction.NAK, code
            assert not first.reply_error, code
            assert not first.to_dlq, code
            assert "after the last allowed delivery" in reply, code
            assert "after the last allowed delivery" in dlq, code
        else:
            assert first.action is AckAction.TERM, code
            assert first.reply_error == reply.startswith("yes"), code
            assert first.to_dlq == dlq.startswith("yes"), code
        assert last.action is AckAction.TERM, code
        assert last.reply_error == (retried.startswith("yes") or reply.startswith("yes")), code
        assert last.to_dlq, code


def test_the_datatype_table_is_exactly_jetinfers_datatypes() -> None:
    rows = table_rows("## Datatypes", "wire name")
    documented = {code_span(row[0]): row for row in rows}
    assert len(documented) == len(rows)
    assert set(documented) == set(DATATYPES)
    for name, (_, size, numpy_cell, *_) in documented.items():
        assert int(size) == DATATYPES[name].itemsize, name
        assert np.dtype(code_span(numpy_cell)) == DATATYPES[name], name


def test_the_request_header_table_is_exactly_the_protocols_headers() -> None:
    rows = table_rows("## Request headers", "header")
    assert [code_span(row[0]) for row in rows] == [
        HEADER_MSG_ID,
        HEADER_REPLY_TO,
        HEADER_DEADLINE,
        HEADER_CONTENT_TYPE,
    ]
    content_type = next(row for row in rows if code_span(row[0]) == HEADER_CONTENT_TYPE)[1]
    assert re.findall(r"`([a-z]+/[a-z]+)`", content_type) == [
        CONTENT_TYPE_MSGPACK,
        CONTENT_TYPE_JPEG,
        CONTENT_TYPE_PNG,
    ]
    assert f"`{HEADER_STATUS}`" in doc_text()


def test_the_subjects_are_the_ones_jetinfer_uses() -> None:
    names = [code_span(row[0]) for row in table_rows("## Subjects and streams", "name")]
    for subject in (infer_subject("m"), results_subject("j"), dlq_subject("m"), reload_subject("m")):
        pattern = subject.replace(".m", ".<model>").replace(".j", ".<job>")
        assert pattern in names, pattern
    assert f"`{MODEL_NAME_PATTERN.pattern}`" in doc_text()


def test_the_dlq_headers_are_the_ones_the_worker_writes() -> None:
    from jetinfer.worker.settle import dlq_headers

    documented = {code_span(row[0]) for row in table_rows("## Dead-letter queue", "header")}
    written = dlq_headers({}, reason="internal", message="m", deliveries=5, request_id="r", copy_id="dlq-r-5")
    assert documented == set(written) | {HEADER_DLQ_TRUNCATED}


def test_the_reload_answer_statuses_are_the_workers() -> None:
    from jetinfer.worker.reload import ReloadResult

    rows = {row[0].strip("`"): row for row in table_rows("## Control subject", "field")}
    assert set(rows) == {"worker", "model", "status", "version", "message"}
    statuses = re.findall(r'`"([a-z]+)"`', rows["status"][1])
    assert statuses == list(typing.get_args(typing.get_type_hints(ReloadResult)["status"]))


# -- limits ----------------------------------------------------------------------------------------------


def tensor(**overrides: Any) -> dict[str, Any]:
    return {"name": "input", "datatype": "UINT8", "shape": [1, 4], "data": b"\0" * 4, **overrides}


def request_body(**overrides: Any) -> bytes:
    return msgpack.packb({"id": "limit", "inputs": [tensor()], **overrides}, use_bin_type=True)


def outcome(raw: bytes, limits: Limits = DEFAULT_LIMITS) -> str:
    """'ok' or the wire code of decoding `raw`."""
    try:
        decode_request(raw, limits=limits)
    except (InvalidInputError, TooLargeError) as exc:
        return exc.code
    return "ok"


def check_id(value: int, code: str) -> None:
    assert outcome(request_body(id="i" * value)) == "ok"
    assert outcome(request_body(id="i" * (value + 1))) == code


def check_name(value: int, code: str) -> None:
    assert outcome(request_body(inputs=[tensor(name="n" * value)])) == "ok"
    assert outcome(request_body(inputs=[tensor(name="n" * (value + 1))])) == code


def check_dims(value: int, code: str) -> None:
    assert outcome(request_body(inputs=[tensor(shape=[1] * value, data=b"\0")])) == "ok"
    assert outcome(request_body(inputs=[tensor(shape=[1] * (value + 1), data=b"\0")])) == code


def check_inputs(value: int, code: str) -> None:
    assert outcome(request_body(inputs=[tensor(name=f"i{n}") for n in range(value)])) == "ok"
    assert outcome(request_body(inputs=[tensor(name=f"i{n}") for n in range(value + 1)])) == code


def check_tensor_bytes(value: int, code: str) -> None:
    assert value == Limits().max_bytes
    # Shapes alone decide: no data of that size is ever needed to be refused.
    assert outcome(request_body(inputs=[tensor(shape=[1, value + 1], data=b"")])) == code
    half = value // 2 + 1
    pair = [
        tensor(name="a", shape=[1, half], data=b"\0" * half),
        tensor(name="b", shape=[1, half], data=b"\0" * half),
    ]
    assert outcome(request_body(inputs=pair)) == code


def check_message_bytes(value: int, code: str) -> None:
    limits = Limits(max_bytes=1024)
    assert outcome(b"\xc1" * (1024 + value), limits) == "invalid_input"  # unpacked, and found not msgpack
    assert outcome(b"\xc1" * (1024 + value + 1), limits) == code


def check_str(value: int, code: str) -> None:
    assert outcome(request_body(parameters={"s": "s" * value})) == "ok"
    assert outcome(request_body(parameters={"s": "s" * (value + 1)})) == code


def check_array(value: int, code: str) -> None:
    assert outcome(request_body(inputs=[tensor(shape=[1] * value)])) == "too_large"  # unpacked: 4096 dims
    assert outcome(request_body(inputs=[tensor(shape=[1] * (value + 1))])) == code


def check_map(value: int, code: str) -> None:
    assert outcome(request_body(parameters={f"p{n}": n for n in range(value)})) == "ok"
    assert outcome(request_body(parameters={f"p{n}": n for n in range(value + 1)})) == code


def check_pixels(value: int, code: str) -> None:
    from jetinfer.images import MAX_IMAGE_PIXELS

    assert value == MAX_IMAGE_PIXELS
    assert code == TooLargeError.code


LIMIT_CHECKS = {
    "`id` length": check_id,
    "tensor `name` length": check_name,
    "dimensions per tensor": check_dims,
    "inputs per request": check_inputs,
    "bytes of one tensor, and of all inputs together": check_tensor_bytes,
    "bytes of the whole message": check_message_bytes,
    "msgpack str length": check_str,
    "msgpack array length": check_array,
    "msgpack map size": check_map,
    "image pixels": check_pixels,
}


def test_every_documented_limit_is_checked() -> None:
    assert [row[0] for row in table_rows("The limits", "limit")] == list(LIMIT_CHECKS)


@pytest.mark.parametrize("limit", list(LIMIT_CHECKS))
def test_each_documented_limit_is_where_the_decoder_draws_it(limit: str) -> None:
    row = next(row for row in table_rows("The limits", "limit") if row[0] == limit)
    _, value, over = row
    value_number = first_int(value.split("+")[-1]) if "+" in value else first_int(value)
    LIMIT_CHECKS[limit](value_number, code_span(over))
