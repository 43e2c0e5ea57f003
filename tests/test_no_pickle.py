"""No pickle anywhere (issue 3): nothing a client sends can make jetinfer unpickle it.

The payloads below carry a pickle whose loading would create a marker file (what an attacker's
`__reduce__` would do instead); every path that reads bytes from outside must refuse them without
creating it. A scan of the package sources keeps pickle-capable loaders out for good.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from jetinfer.errors import InvalidInputError, TooLargeError
from jetinfer.producer.client import encode_payload
from jetinfer.protocol import ErrorReply, decode_reply, decode_request, request_headers
from jetinfer.streams import infer_subject
from tests.conftest import REPO_ROOT, NatsUnderTest, running_worker

PACKAGES = ("jetinfer", "worker", "producer", "builder")
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


class Trap:
    """Unpickling this creates `path`: the side effect a malicious pickle would have."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.path,))


def trap_pickle(path: Path) -> bytes:
    return pickle.dumps(Trap(path))


def test_pickled_payloads_are_refused_by_the_decoder(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    array = np.array([Trap(marker)], dtype=object)
    payloads = {
        "a pickle as the body": trap_pickle(marker),
        "a pickled ndarray as the body": pickle.dumps(array),
        "a pickle as tensor data": msgpack.packb(
            {
                "id": "x",
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 1], "data": trap_pickle(marker)}
                ],
            },
            use_bin_type=True,
        ),
        "a pickle in an extension type": msgpack.packb(
            {"id": "x", "inputs": msgpack.ExtType(42, trap_pickle(marker))}
        ),
        "a pickle as a parameter": msgpack.packb(
            {"id": "x", "inputs": [], "parameters": {"p": trap_pickle(marker)}}, use_bin_type=True
        ),
    }
    for name, raw in payloads.items():
        with pytest.raises((InvalidInputError, TooLargeError)):
            decode_request(raw)
        assert not marker.exists(), f"{name} was unpickled"


@pytest.mark.parametrize(
    "ext",
    [b"\xd5\x00\x01\x02", b"\xd5\x2a\x01\x02", b"\xd5\x7f\x01\x02", b"\xd6\xff\x00\x00\x00\x00"],
    ids=["type-0", "type-42", "type-127", "timestamp"],
)
def test_msgpack_extension_types_are_refused(ext: bytes) -> None:
    raw = b"\x82\xa2id" + ext + b"\xa6inputs\x90"  # {"id": <ext>, "inputs": []}
    with pytest.raises(InvalidInputError):
        decode_request(raw)
    assert msgpack.unpackb(raw, ext_hook=lambda code, data: ("ext", code)) is not None  # well-formed msgpack


def test_an_object_npy_file_is_refused_not_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "evil.npy"
    np.save(path, np.array([Trap(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidInputError, match="never unpickled"):
        encode_payload("r1", path)
    assert not marker.exists()


async def test_a_pickle_sent_to_a_worker_gets_an_error_reply(
    nats_server: NatsUnderTest, nc: Any, model_repo: Any, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    repo, model = model_repo("identity")
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    async with running_worker(nats_server.url, repo, [model]) as worker:
        for index, content_type in enumerate(
            ("application/msgpack", "application/python-pickle", "image/png")
        ):
            headers = request_headers(f"pickled-{index}", inbox, content_type=content_type)
            await nc.jetstream().publish(infer_subject(model), trap_pickle(marker), headers=headers)
            reply = decode_reply((await sub.next_msg(timeout=30)).data)
            assert isinstance(reply, ErrorReply)
            assert reply.code == "invalid_input"
        assert worker.readiness()[0]
    assert not marker.exists()


def _python_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py"))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_the_sources_hold_no_pickle_capable_loader() -> None:
    """No pickle-family import; np.load always with allow_pickle=False; torch.load only weights_only=True;
    every msgpack decoder refuses extension types (ext_hook)."""
    problems: list[str] = []
    files = _python_files()
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(REPO_ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    if name.split(".")[0] in FORBIDDEN_MODULES:
                        problems.append(f"{where}:{node.lineno}: imports {name}")
            if not isinstance(node, ast.Call):
                continue
            callee = _dotted(node.func)
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{where}:{node.lineno}: allow_pickle is not False")
            if callee in ("np.load", "numpy.load") and allow is None:
                problems.append(f"{where}:{node.lineno}: {callee} without allow_pickle=False")
            weights_only = _keyword(node, "weights_only")
            if callee == "torch.load" and not (
                isinstance(weights_only, ast.Constant) and weights_only.value is True
            ):
                problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if (
                callee in ("msgpack.unpackb", "msgpack.Unpacker", "msgpack.loads")
                and _keyword(node, "ext_hook") is None
            ):
                problems.append(
                    f"{where}:{node.lineno}: {callee} without an ext_hook that refuses extension types"
                )
    assert not problems, "\n".join(problems)
