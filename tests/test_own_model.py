"""Your own model on the GPU: `jetinfer build model.pt2 --config config.json` takes a user's torch.export
program the way it takes a user's ONNX file, checks it, and writes a version the torch backend serves
(issue 16, "Your own model on the GPU"). On the CPU here; on a CUDA device through the worker too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer.producer.client import Client
from jetinfer.repository import ModelRepository, sha256_file
from tests.conftest import NatsUnderTest, run_cli, running_worker

torch = pytest.importorskip("torch", reason="torch is not installed (the export extra)")

MAX_BATCH = 8
CONFIG = {
    "max_batch": MAX_BATCH,
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [3, 32, 32]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [4]}],
    "preprocess": {"input": "pixels", "width": 32, "height": 32, "layout": "NCHW", "datatype": "FP32",
                   "mean": [127.5, 127.5, 127.5], "std": [64.0, 64.0, 64.0]},
}  # fmt: skip


class Scorer(torch.nn.Module):  # type: ignore[misc]
    """A user's own small model: conv, pool, linear, softmax."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.head = torch.nn.Linear(6, 4)

    def forward(self, pixels: Any) -> Any:
        features = torch.relu(self.conv(pixels)).mean(dim=(2, 3))
        return torch.softmax(self.head(features), dim=-1)


def save_program(path: Path, *, batch: Any = "dynamic", inputs: int = 1) -> Scorer:
    """Export `Scorer` the way a user would: torch.export.export, then torch.export.save."""
    model = Scorer().eval()
    example = (torch.randn(2, 3, 32, 32),)
    shapes = None
    if batch == "dynamic":
        shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    elif batch != "static":
        shapes = ({0: batch},)
    program = torch.export.export(model, example, dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return model


@pytest.fixture
def photo() -> bytes:
    """A JPEG of a gradient (Pillow only: the GPU machine has no scikit-image)."""
    import io

    from PIL import Image

    ramp = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def program(tmp_path: Path) -> tuple[Path, Path, Scorer]:
    """A user's program.pt2 and its config.json."""
    pt2, config = tmp_path / "scorer.pt2", tmp_path / "config.json"
    model = save_program(pt2)
    config.write_text(json.dumps(CONFIG))
    return pt2, config, model


def build(pt2: Path, config: Path | None, repository: Path, *extra: str) -> Any:
    argv = ["build", str(pt2), "--name", "scorer", "--repository", str(repository), *extra]
    return run_cli(*argv, *(["--config", str(config)] if config else []))


def test_a_users_program_becomes_a_torch_version(program: tuple[Path, Path, Scorer], tmp_path: Path) -> None:
    pt2, config, _ = program
    repository = tmp_path / "repo"
    result = build(pt2, config, repository)  # no --backend: a .pt2 is for the torch backend
    assert result.returncode == 0, result.stderr
    assert "built scorer v1: torch fp32" in result.stdout
    version = ModelRepository(repository).load_version("scorer", 1)
    assert version.manifest.backend == "torch"
    assert version.model_file.name == "model.pt2"
    assert version.manifest.sha256 == sha256_file(version.model_file) == sha256_file(pt2)
    assert version.manifest.producer["torch"] == torch.__version__
    assert [s.name for s in version.manifest.inputs] == ["pixels"]
    assert version.config.preprocess is not None
    listed = run_cli("models", "--repository", str(repository))
    assert listed.returncode == 0, listed.stdout


@pytest.mark.parametrize(
    ("make", "extra", "expected"),
    [
        ("static", (), "has a fixed batch of 2"),
        ("small", (), "takes batches of 1 to 4, the worker sends 1 to max_batch 8"),
        ("dynamic", ("--backend", "onnxruntime"), "served by the torch backend"),
        ("dynamic", ("--no-config",), "a .pt2 program needs --config"),
        ("garbage", (), "cannot load it as a torch.export program"),
        ("dynamic", ("--max-batch", "16"), "the worker sends 1 to max_batch 16"),
    ],
)
def test_a_program_that_would_not_serve_is_refused_with_the_fix(
    tmp_path: Path, make: str, extra: tuple[str, ...], expected: str
) -> None:
    pt2, config = tmp_path / "scorer.pt2", tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    if make == "garbage":
        pt2.write_bytes(b"PK\x03\x04 not really a program")
    elif make == "small":
        save_program(pt2, batch=torch.export.Dim("batch", min=1, max=4))
    else:
        save_program(pt2, batch=make)
    no_config = "--no-config" in extra
    result = build(
        pt2, None if no_config else config, tmp_path / "repo", *(e for e in extra if e != "--no-config")
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert expected in line, line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "repo" / "scorer" / "1").exists()


def test_a_program_whose_outputs_differ_from_its_config_is_refused(
    program: tuple[Path, Path, Scorer], tmp_path: Path
) -> None:
    pt2, config, _ = program
    config.write_text(
        json.dumps({**CONFIG, "outputs": [{"name": "scores", "datatype": "FP32", "shape": [5]}]})
    )
    result = build(pt2, config, tmp_path / "repo")
    assert result.returncode == 2
    assert "output 'scores' has shape [1, 4] for a batch of 1; the config says [batch, 5]" in result.stderr


def _serve_and_compare(
    url: str, repository: Path, model: Scorer, photo: bytes, *, on_cuda: bool, atol: float
) -> None:
    import asyncio

    frames = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(frames)).numpy()

    async def run() -> None:
        async with running_worker(url, repository, ["scorer"]) as worker, Client(url) as client:
            backend = worker.slots["scorer"].current.backend
            assert backend.name == "torch"
            assert backend.on_cuda == on_cuda
            reply = await client.infer("scorer", frames, input_name="pixels", timeout=60)
            assert reply.model_version == "1"
            np.testing.assert_allclose(reply.output("scores"), expected, atol=atol)
            image = await client.infer("scorer", photo, timeout=60)  # through its preprocess section
            scores = image.output("scores")
            assert scores.shape == (1, 4)
            np.testing.assert_allclose(scores.sum(), 1.0, atol=1e-2)

    asyncio.run(run())


def test_the_built_version_serves_through_the_worker_on_the_cpu(
    nats_server: NatsUnderTest,
    program: tuple[Path, Path, Scorer],
    tmp_path: Path,
    photo: bytes,
    unique: str,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path; this machine has CUDA (the gpu test covers it)")
    pt2, config, model = program
    repository = tmp_path / f"repo-{unique}"
    assert build(pt2, config, repository).returncode == 0
    _serve_and_compare(nats_server.url, repository, model, photo, on_cuda=False, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: serves the built version on a GPU")
def test_the_built_version_serves_through_the_worker_on_the_gpu(
    nats_server: NatsUnderTest,
    program: tuple[Path, Path, Scorer],
    tmp_path: Path,
    photo: bytes,
    unique: str,
) -> None:
    pt2, config, model = program
    repository = tmp_path / f"repo-{unique}"
    result = build(pt2, config, repository, "--fp16")
    assert result.returncode == 0, result.stderr
    assert "torch fp16" in result.stdout
    # fp16 on the GPU (CUDA graphs per batch bucket), against the user's own module in fp32 on the CPU.
    _serve_and_compare(nats_server.url, repository, model, photo, on_cuda=True, atol=5e-3)
