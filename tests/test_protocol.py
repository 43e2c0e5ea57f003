"""Wire protocol v1 (jetinfer.protocol): round trips, replies, and every validation rule.

Every malformed body must become an InvalidInputError (`invalid_input`) or a TooLargeError
(`too_large`) before anything is allocated for it: never another exception, never a MemoryError.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jetinfer.errors import InvalidInputError, RequestError, TooLargeError
from jetinfer.protocol import (
    DATATYPES,
    HEADER_CONTENT_TYPE,
    HEADER_DEADLINE,
    HEADER_MSG_ID,
    HEADER_REPLY_TO,
    MAX_NDIM,
    ErrorReply,
    InferRequest,
    InferResponse,
    Limits,
    Tensor,
    check_model_name,
    datatype_of,
    decode_reply,
    decode_request,
    encode_error,
    encode_outputs,
    encode_request,
    encode_response,
    request_headers,
)

# No example database on disk: the tests leave nothing behind in the checkout.
PROPERTY = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def edge_values(datatype: str) -> np.ndarray[Any, Any]:
    """The awkward values of a datatype: its extremes, zero, and for floats NaN, ±inf, -0.0, subnormals."""
    dtype = DATATYPES[datatype]
    if dtype.kind == "b":
        return np.array([True, False, True], dtype=dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1], dtype=dtype)
    finfo = np.finfo(dtype)
    return np.array(
        [np.nan, np.inf, -np.inf, -0.0, 0.0, finfo.max, finfo.min, finfo.tiny, finfo.smallest_subnormal, 1.5],
        dtype=dtype,
    )


def random_array(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray[Any, Any]:
    """Random data of `datatype` over its whole bit range, with its edge values mixed in."""
    dtype = DATATYPES[datatype]
    count = math.prod(shape)
    if dtype.kind == "b":
        flat = rng.integers(0, 2, count).astype(dtype)
    else:
        flat = rng.integers(0, 256, count * dtype.itemsize, dtype=np.uint8).view(dtype).copy()
    edges = edge_values(datatype)
    flat[: min(count, edges.size)] = edges[: min(count, edges.size)]
    return flat.reshape(shape)


def tensor_map(**overrides: Any) -> dict[str, Any]:
    """A valid FP32 [1, 4] tensor map, with fields replaced or (value ...) removed."""
    tensor: dict[str, Any] = {
        "name": "input",
        "datatype": "FP32",
        "shape": [1, 4],
        "data": np.arange(4, dtype="<f4").tobytes(),
    }
    for key, value in overrides.items():
        if value is ...:
            tensor.pop(key)
        else:
            tensor[key] = value
    return tensor


def body(*tensors: dict[str, Any], **fields: Any) -> bytes:
    """A request body holding `tensors` (default: one valid tensor) and extra or replaced top-level fields."""
    obj: dict[Any, Any] = {"id": "req-1", "inputs": list(tensors) or [tensor_map()]}
    for key, value in fields.items():
        if value is ...:
            obj.pop(key)
        else:
            obj[key] = value
    return msgpack.packb(obj, use_bin_type=True)


def assert_same_tensor(got: Tensor, want: np.ndarray[Any, Any], name: str) -> None:
    assert got.name == name
    assert got.datatype == datatype_of(want.dtype)
    assert got.shape == want.shape
    array = got.to_numpy()
    assert array.dtype == DATATYPES[got.datatype]
    assert array.shape == want.shape
    assert array.tobytes() == want.astype(DATATYPES[got.datatype]).tobytes()  # bit-exact, NaN included


# -- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips_bit_exact_with_several_frames_and_inputs(datatype: str) -> None:
    rng = np.random.default_rng(sum(map(ord, datatype)))
    first = random_array(datatype, (3, 5), rng)  # three frames
    second = random_array(datatype, (3, 2, 2, 2), rng)
    request = InferRequest(
        id="round-trip",
        inputs=(Tensor.from_numpy("first", first), Tensor.from_numpy("second", second)),
        parameters={"threshold": 0.5, "top_k": 3, "label": "cat", "raw": True},
    )
    decoded = decode_request(encode_request(request))
    assert decoded.id == "round-trip"
    assert decoded.batch == 3
    assert dict(decoded.parameters) == {"threshold": 0.5, "top_k": 3, "label": "cat", "raw": True}
    assert_same_tensor(decoded.inputs[0], first, "first")
    assert_same_tensor(decoded.inputs[1], second, "second")
    assert decoded == request


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_the_wire_bytes_are_little_endian_c_order(datatype: str) -> None:
    dtype = DATATYPES[datatype]
    native = random_array(datatype, (2, 3), np.random.default_rng(7))
    big_endian_fortran = np.asfortranarray(native.astype(dtype.newbyteorder(">")))
    tensor = Tensor.from_numpy("x", big_endian_fortran)
    assert tensor.datatype == datatype
    assert bytes(tensor.data) == native.astype(dtype).tobytes(order="C")
    assert tensor.to_wire()["shape"] == [2, 3]


def test_a_strided_view_is_sent_as_its_values() -> None:
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    view = base[::2, 1::2]
    decoded = decode_request(encode_request(InferRequest(id="v", inputs=(Tensor.from_numpy("v", view),))))
    np.testing.assert_array_equal(decoded.inputs[0].to_numpy(), view)


def test_decoded_arrays_are_read_only_views() -> None:
    decoded = decode_request(body())
    array = decoded.inputs[0].to_numpy()
    assert not array.flags.writeable
    np.testing.assert_array_equal(array, [[0.0, 1.0, 2.0, 3.0]])


def test_datatype_names_and_sizes() -> None:
    sizes = {name: dt.itemsize for name, dt in DATATYPES.items()}
    assert sizes == {
        "BOOL": 1,
        "UINT8": 1,
        "UINT16": 2,
        "UINT32": 4,
        "UINT64": 8,
        "INT8": 1,
        "INT16": 2,
        "INT32": 4,
        "INT64": 8,
        "FP16": 2,
        "FP32": 4,
        "FP64": 8,
    }
    assert all(dt.str[0] in "<|" for dt in DATATYPES.values())  # little-endian (or single byte)
    for name, dt in DATATYPES.items():
        assert datatype_of(dt) == name
        assert datatype_of(dt.newbyteorder(">")) == name


@pytest.mark.parametrize("dtype", ["complex64", "U3", "object", "datetime64[s]", "V4"])
def test_dtypes_without_a_wire_name_are_refused(dtype: str) -> None:
    with pytest.raises(InvalidInputError, match="no wire equivalent"):
        datatype_of(dtype)


def test_request_without_parameters_omits_the_key_and_nil_parameters_read_as_none() -> None:
    request = InferRequest(id="p", inputs=(Tensor.from_numpy("input", np.zeros((1, 1), np.float32)),))
    raw = encode_request(request)
    assert "parameters" not in msgpack.unpackb(raw)
    assert decode_request(raw).parameters == {}
    assert decode_request(body(parameters=None)).parameters == {}


def test_unknown_keys_are_ignored_for_forward_compatibility() -> None:
    raw = body(tensor_map(future_field=[1, 2]), future_top_level={"x": 1})
    decoded = decode_request(raw)
    assert decoded.inputs[0].shape == (1, 4)


def test_request_headers() -> None:
    headers = request_headers("req-1", "_INBOX.abc.1", deadline_ms=1_700_000_000_123)
    assert headers == {
        HEADER_MSG_ID: "req-1",
        HEADER_REPLY_TO: "_INBOX.abc.1",
        HEADER_CONTENT_TYPE: "application/msgpack",
        HEADER_DEADLINE: "1700000000123",
    }
    assert HEADER_DEADLINE not in request_headers("req-1", "results.job", content_type="image/png")
    assert request_headers("r", "results.job", content_type="image/png")[HEADER_CONTENT_TYPE] == "image/png"


# -- replies -------------------------------------------------------------------------------------------


def test_success_reply_round_trips() -> None:
    logits = np.array([[0.25, -1.0, 3.5]], np.float32)
    labels = np.array([[2]], np.int64)
    response = InferResponse(
        id="req-9",
        model_name="resnet50",
        model_version="3",
        outputs=(Tensor.from_numpy("logits", logits), Tensor.from_numpy("top", labels)),
        timing={"queue_ms": 1.5, "infer_ms": 2.25, "total_ms": 4.0},
    )
    raw = encode_response(response)
    assert set(msgpack.unpackb(raw)) == {"id", "model_name", "model_version", "outputs", "timing"}
    decoded = decode_reply(raw)
    assert isinstance(decoded, InferResponse)
    assert decoded == response
    np.testing.assert_array_equal(decoded.output(), logits)
    np.testing.assert_array_equal(decoded.output("top"), labels)
    with pytest.raises(KeyError, match="no output named 'missing'"):
        decoded.output("missing")


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_encode_outputs_gives_the_bytes_of_encode_response(datatype: str) -> None:
    """The worker's fast reply encoder and the general one agree byte for byte, awkward layouts included."""
    base = np.resize(edge_values(datatype), (2, 3, 4))
    outputs = {
        "plain": base,
        "strided": base[:, ::2, :],  # not C-contiguous
        "transposed": base.transpose(0, 2, 1),
        "big_endian": base.astype(base.dtype.newbyteorder(">")),
        "scalar_frames": base.reshape(-1)[:2],
    }
    timing = {"queue_ms": 1.5, "infer_ms": 2.25, "total_ms": 4.0}
    slow = encode_response(
        InferResponse(
            id="req-7",
            model_name="m",
            model_version="2",
            outputs=tuple(Tensor.from_numpy(name, array) for name, array in outputs.items()),
            timing=timing,
        )
    )
    assert encode_outputs("req-7", "m", "2", outputs, timing) == slow


def test_error_reply_round_trips() -> None:
    raw = encode_error("req-2", "too_large", "request carries 300 frames; at most 256")
    assert msgpack.unpackb(raw) == {
        "id": "req-2",
        "error": {"code": "too_large", "message": "request carries 300 frames; at most 256"},
    }
    assert decode_reply(raw) == ErrorReply(
        id="req-2", code="too_large", message="request carries 300 frames; at most 256"
    )


def test_an_error_reply_without_a_code_reads_as_internal() -> None:
    reply = decode_reply(msgpack.packb({"id": "x", "error": {}}))
    assert reply == ErrorReply(id="x", code="internal", message="")


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        ([1, 2], "must be a msgpack map"),
        ({"id": "x", "error": "boom"}, "error must be a map"),
        ({"id": "x"}, "outputs must be a list"),
        ({"id": "x", "outputs": [], "timing": {"queue_ms": "fast"}}, "timing values must be numbers"),
        ({"id": "x", "outputs": [], "timing": {"queue_ms": [1]}}, "timing values must be numbers"),
        ({"id": "x", "outputs": [tensor_map(shape=[1, 5])]}, "needs 20 bytes"),
    ],
)
def test_malformed_replies_are_invalid_input(reply: object, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        decode_reply(msgpack.packb(reply, use_bin_type=True))


# -- validation: shapes and sizes -----------------------------------------------------------------------


DEFAULT_LIMITS = Limits()


def expect(
    error: type[RequestError], raw: bytes, match: str, limits: Limits = DEFAULT_LIMITS
) -> RequestError:
    with pytest.raises(error, match=match) as info:
        decode_request(raw, limits=limits)
    assert info.value.code == error.code
    return info.value


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([1, -4], "non-negative integers"),
        ([-1], "non-negative integers"),
        ([True, 4], "non-negative integers"),
        ([1, False], "non-negative integers"),
        ([1.0, 4], "non-negative integers"),
        (["1", 4], "non-negative integers"),
        ([1, None], "non-negative integers"),
        ([], "non-empty list"),
        ("1,4", "non-empty list"),
        (4, "non-empty list"),
    ],
)
def test_bad_dimensions_are_invalid_input(shape: object, match: str) -> None:
    expect(InvalidInputError, body(tensor_map(shape=shape)), match)


def test_more_than_max_ndim_dimensions_are_too_large() -> None:
    nine = [1] * (MAX_NDIM + 1)
    expect(TooLargeError, body(tensor_map(shape=nine, data=b"\0" * 4)), "9 dimensions; at most 8")
    eight = [1] * MAX_NDIM
    assert decode_request(body(tensor_map(shape=eight, data=b"\0" * 4))).inputs[0].shape == tuple(eight)


@pytest.mark.parametrize("data_length", [0, 12, 15, 17, 20, 1024])
def test_byte_count_must_equal_elements_times_size(data_length: int) -> None:
    expect(InvalidInputError, body(tensor_map(data=b"\0" * data_length)), "needs 16 bytes, but data has")


@pytest.mark.parametrize(
    "shape",
    [[2**62], [2**63 - 1], [2**64 - 1], [1, 2**40, 2**40], [2**31] * 8, [1, 3, 4096, 4096, 4096]],
)
def test_huge_shapes_are_too_large_before_any_allocation(shape: list[int]) -> None:
    # The data is tiny: a decoder that trusted the shape would try to allocate exabytes.
    expect(TooLargeError, body(tensor_map(shape=shape, data=b"\0" * 16)), "bytes; at most")


def test_an_empty_tensor_cannot_carry_absurd_dimensions() -> None:
    expect(TooLargeError, body(tensor_map(shape=[0, 2**63], data=b"")), "has a dimension over")
    empty = decode_request(body(tensor_map(shape=[0, 4], data=b"")))
    assert empty.inputs[0].to_numpy().shape == (0, 4)


def test_the_limit_is_the_decoders_max_bytes() -> None:
    limits = Limits(max_bytes=1024)
    at_limit = tensor_map(shape=[1, 256], data=b"\0" * 1024)
    assert decode_request(body(at_limit), limits=limits).inputs[0].shape == (1, 256)
    over = tensor_map(shape=[1, 257], data=b"\0" * 1028)
    expect(TooLargeError, body(over), "needs 1028 bytes; at most 1024", limits)


def test_inputs_together_over_the_limit_are_too_large() -> None:
    limits = Limits(max_bytes=1024)
    half = {"datatype": "UINT8", "shape": [1, 600], "data": b"\0" * 600}
    raw = body({"name": "a", **half}, {"name": "b", **half})
    expect(TooLargeError, raw, "inputs hold 1200 bytes; at most 1024", limits)


def test_a_message_over_the_limit_is_too_large_before_it_is_unpacked() -> None:
    limits = Limits(max_bytes=1024)
    # Not even msgpack: the size check comes first.
    expect(TooLargeError, b"\xc1" * (1024 + 64 * 1024 + 1), "over the limit", limits)


def test_too_many_inputs_are_too_large() -> None:
    tensors = [tensor_map(name=f"in{i}") for i in range(17)]
    expect(TooLargeError, body(*tensors), "17 inputs; at most 16")


def test_bool_data_must_be_zero_or_one() -> None:
    raw = body(tensor_map(datatype="BOOL", shape=[1, 3], data=b"\x01\x00\x02"))
    expect(InvalidInputError, raw, "BOOL data must hold only the bytes 0x00 and 0x01")
    good = decode_request(body(tensor_map(datatype="BOOL", shape=[1, 3], data=b"\x01\x00\x01")))
    np.testing.assert_array_equal(good.inputs[0].to_numpy(), [[True, False, True]])


# -- validation: structure --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        msgpack.packb([1, 2, 3]),
        msgpack.packb(None),
        msgpack.packb(42),
        msgpack.packb("a string"),
        msgpack.packb(b"binary", use_bin_type=True),
        msgpack.packb(1.5),
    ],
    ids=["array", "nil", "int", "str", "bin", "float"],
)
def test_a_body_that_is_not_a_map_is_invalid_input(raw: bytes) -> None:
    expect(InvalidInputError, raw, "must be a msgpack map")


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"\x00\x01garbage\xc1", body()[:-3], body() + b"\x00", b"\x82\xa2id"],
    ids=["empty", "never-used-byte", "garbage", "truncated", "trailing-bytes", "cut-map"],
)
def test_bytes_that_are_not_one_msgpack_value_are_invalid_input(raw: bytes) -> None:
    expect(InvalidInputError, raw, "not valid msgpack")


@pytest.mark.parametrize(
    "request_id",
    [..., "", "x" * 257, 17, None, ["a"], b"bin-id"],
    ids=["missing", "empty", "257-chars", "int", "nil", "list", "bin"],
)
def test_ids_must_be_non_empty_strings_of_at_most_256_characters(request_id: object) -> None:
    expect(InvalidInputError, body(id=request_id), "id must be a non-empty string")


def test_an_id_of_256_characters_is_accepted() -> None:
    assert decode_request(body(id="x" * 256)).id == "x" * 256


@pytest.mark.parametrize("inputs", [..., [], None, {"input": tensor_map()}, "input"])
def test_inputs_must_be_a_non_empty_list(inputs: object) -> None:
    expect(InvalidInputError, body(inputs=inputs), "inputs must be a non-empty list")


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        ("not a map", r"inputs\[0\] must be a map"),
        (tensor_map(name=...), "name must be a non-empty string"),
        (tensor_map(name=""), "name must be a non-empty string"),
        (tensor_map(name="n" * 129), "name must be a non-empty string"),
        (tensor_map(name=7), "name must be a non-empty string"),
        (tensor_map(datatype="FLOAT32"), "datatype 'FLOAT32' is not one of"),
        (tensor_map(datatype="fp32"), "datatype 'fp32' is not one of"),
        (tensor_map(datatype=...), "datatype None is not one of"),
        (tensor_map(shape=...), "non-empty list"),
        (tensor_map(data=...), "data must be binary"),
        (tensor_map(data="\0" * 16), "data must be binary"),
        (tensor_map(data=[0] * 16), "data must be binary"),
    ],
)
def test_malformed_tensors_are_invalid_input(tensor: object, match: str) -> None:
    expect(InvalidInputError, body(tensor), match)  # type: ignore[arg-type]


def test_a_tensor_name_of_128_characters_is_accepted() -> None:
    assert decode_request(body(tensor_map(name="n" * 128))).inputs[0].name == "n" * 128


def test_duplicate_input_names_are_invalid_input() -> None:
    expect(InvalidInputError, body(tensor_map(), tensor_map()), "input names repeat")


def test_inputs_must_agree_on_the_batch_dimension() -> None:
    two_frames = tensor_map(name="other", shape=[2, 4], data=b"\0" * 32)
    expect(
        InvalidInputError,
        body(tensor_map(), two_frames),
        r"disagree on the batch \(first\) dimension: \[1, 2\]",
    )
    same = tensor_map(name="other", shape=[1, 2], data=b"\0" * 8)
    assert decode_request(body(tensor_map(), same)).batch == 1


def test_msgpack_extension_types_are_rejected_wherever_they_are() -> None:
    ext = msgpack.ExtType(1, b"\x00")
    expect(InvalidInputError, body(inputs=ext), "not valid msgpack|extension type")
    expect(InvalidInputError, body(tensor_map(data=ext)), "not valid msgpack|extension type")
    expect(InvalidInputError, body(parameters={"when": ext}), "not valid msgpack|extension type")
    # A zero-length extension (ext 8, length 0, type 5) reaches the hook, which refuses it too.
    prefix = msgpack.packb({"id": "x"})
    zero_length = b"\x82" + prefix[1:] + msgpack.packb("inputs") + b"\xc7\x00\x05"
    expect(InvalidInputError, zero_length, "extension type 5 is not allowed")
    # The msgpack timestamp (ext -1) is an extension like any other: no datetime objects appear.
    timestamp = b"\x82" + prefix[1:] + msgpack.packb("inputs") + b"\xd6\xff" + struct.pack(">I", 1)
    expect(InvalidInputError, timestamp, "not valid msgpack")


def test_invalid_utf8_strings_are_invalid_input() -> None:
    # {"id": <str of bytes ff fe>}: a msgpack str must be UTF-8.
    expect(InvalidInputError, b"\x81\xa2id\xa2\xff\xfe", "not valid msgpack: UnicodeDecodeError")
    bad_name = b"\x81\xa3n\xffd\xa1x"  # a key that is not UTF-8
    expect(InvalidInputError, bad_name, "not valid msgpack: UnicodeDecodeError")


@pytest.mark.parametrize("key", [1, 1.5, True])
def test_map_keys_must_be_strings(key: object) -> None:
    raw = msgpack.packb({"id": "x", "inputs": [tensor_map()], key: 1}, use_bin_type=True)
    expect(InvalidInputError, raw, "not allowed for map key")


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({"classes": [1, 2]}, "parameter 'classes' must be a scalar, got list"),
        ({"crop": {"w": 1}}, "parameter 'crop' must be a scalar, got dict"),
        ({"none": None}, "parameter 'none' must be a scalar, got NoneType"),
        ({"blob": b"\x00"}, "parameter 'blob' must be a scalar, got bytes"),
        ({b"bin-key": 1}, "parameter names must be strings"),
        ([("a", 1)], "parameters must be a map"),
        ("a=1", "parameters must be a map"),
    ],
)
def test_parameters_must_be_a_map_of_string_to_scalar(parameters: object, match: str) -> None:
    expect(InvalidInputError, body(parameters=parameters), match)


def test_msgpack_container_limits_are_invalid_input() -> None:
    expect(InvalidInputError, body(tensor_map(shape=[1] * 4097)), "not valid msgpack")
    expect(InvalidInputError, body(id="x" * (64 * 1024 + 1)), "not valid msgpack")
    expect(InvalidInputError, body(parameters={f"p{i}": i for i in range(257)}), "not valid msgpack")


# -- model names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["identity", "resnet50", "a", "x-y_z", "0", "m" * 64, "efficientnet_lite0"])
def test_valid_model_names(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "..",
        "a/b",
        "a\\b",
        "Resnet50",
        "RESNET",
        "",
        "m" * 65,
        "a.b",
        "a b",
        "*",
        ">",
        "a\n",
        "é",
        None,
        5,
    ],
)
def test_invalid_model_names(name: Any) -> None:
    with pytest.raises(InvalidInputError, match="invalid model name"):
        check_model_name(name)


# -- properties ------------------------------------------------------------------------------------------

_names = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=128)
_ids = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=256)
_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=32),
)


@st.composite
def requests(draw: st.DrawFn) -> InferRequest:
    """Valid requests: 1-4 inputs of any datatypes, 1-4 dims, one shared batch dimension."""
    batch = draw(st.integers(0, 3))
    names = draw(st.lists(_names, min_size=1, max_size=4, unique=True))
    tensors = []
    for name in names:
        datatype = draw(st.sampled_from(sorted(DATATYPES)))
        dims = draw(st.lists(st.integers(0, 4), max_size=3))
        shape = (batch, *dims)
        size = math.prod(shape) * DATATYPES[datatype].itemsize
        if datatype == "BOOL":
            data = bytes(draw(st.lists(st.integers(0, 1), min_size=size, max_size=size)))
        else:
            data = draw(st.binary(min_size=size, max_size=size))
        tensors.append(Tensor(name=name, datatype=datatype, shape=shape, data=data))
    parameters = draw(st.dictionaries(st.text(max_size=16), _scalars, max_size=4))
    return InferRequest(id=draw(_ids), inputs=tuple(tensors), parameters=parameters)


@PROPERTY
@given(requests())
def test_property_decode_inverts_encode(request: InferRequest) -> None:
    raw = encode_request(request)
    decoded = decode_request(raw)
    assert decoded == request
    assert encode_request(decoded) == raw


@PROPERTY
@given(
    hnp.arrays(
        st.sampled_from(sorted(set(DATATYPES.values()), key=str)), hnp.array_shapes(max_dims=4, max_side=5)
    )
)
def test_property_numpy_arrays_survive_the_wire(array: np.ndarray[Any, Any]) -> None:
    tensor = Tensor.from_numpy("x", array)
    decoded = decode_request(encode_request(InferRequest(id="p", inputs=(tensor,))))
    back = decoded.inputs[0].to_numpy()
    assert back.dtype == array.dtype
    assert back.shape == array.shape
    assert back.tobytes() == np.ascontiguousarray(array).tobytes()


def assert_decodes_or_refuses(raw: bytes) -> None:
    """`raw` decodes to a request that re-encodes and decodes the same, or is refused with a wire code."""
    error: Exception | None = None
    try:
        request = decode_request(raw)
    except Exception as exc:
        error = exc
    if error is not None:
        assert isinstance(error, InvalidInputError | TooLargeError), f"{type(error).__name__}: {error}"
        assert error.message
        return
    assert decode_request(encode_request(request)) == request
    for tensor in request.inputs:
        assert tensor.to_numpy().nbytes == len(tensor.data)


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@PROPERTY
@given(st.binary(max_size=256))
def test_property_arbitrary_bytes_never_escape_as_another_error(raw: bytes) -> None:
    assert_decodes_or_refuses(raw)


@PROPERTY
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "id": _msgpack_values,
            "inputs": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "name": _msgpack_values | _names,
                        "datatype": _msgpack_values | st.sampled_from(sorted(DATATYPES)),
                        "shape": _msgpack_values | st.lists(st.integers(-2, 2**64 - 1), max_size=9),
                        "data": _msgpack_values,
                    },
                ),
                max_size=3,
            )
            | _msgpack_values,
            "parameters": _msgpack_values,
        },
    )
)
def test_property_arbitrary_msgpack_maps_never_escape_as_another_error(obj: dict[str, Any]) -> None:
    assert_decodes_or_refuses(msgpack.packb(obj, use_bin_type=True))
