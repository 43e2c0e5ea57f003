"""The builder: demo export (real pretrained model), `jetinfer build`, and the builder's CLI."""

from __future__ import annotations

import argparse
import importlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer import builder
from jetinfer.builder import cli as builder_cli
from jetinfer.builder.build import BuildOptions, build, load_config_file
from jetinfer.builder.demo_models import DEMO_MODELS, imagenet_labels, write_identity_onnx
from jetinfer.builder.export import export_demo
from jetinfer.errors import RepositoryError
from jetinfer.repository import ModelRepository, sha256_file

CAT_CLASSES = {281, 282, 283, 284, 285}


def tensorrt_usable() -> bool:
    """Whether the real TensorRT imports (tensorrt-stubs leaves an empty namespace package behind)."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


def run_builder_cli(*argv: str) -> int:
    """Run one of the builder's subcommands in this process (its own parser, so only builder.cli)."""
    parser = argparse.ArgumentParser(prog="jetinfer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    builder_cli.register(subparsers)
    args = parser.parse_args(list(argv))
    return int(args.handler(args))


@pytest.fixture
def identity_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "identity.onnx"
    write_identity_onnx(path)
    return path


def test_public_names_are_declared() -> None:
    for module_name in (
        "jetinfer.builder.build",
        "jetinfer.builder.cli",
        "jetinfer.builder.demo_models",
        "jetinfer.builder.export",
        "jetinfer.builder.models",
        "jetinfer.builder.onnx_tools",
        "jetinfer.builder.sidecar",
    ):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert hasattr(module, name), f"{module_name}.__all__ names missing {name}"
    for name in builder.__all__:
        assert getattr(builder, name) is not None, f"builder.__all__ names missing {name}"
    assert sorted(builder.__all__) == sorted(set(builder.__all__))


# -- export-demo ---------------------------------------------------------------------------------------


def test_exported_demo_models_load_with_the_repository(demo_repository: Path) -> None:
    repo = ModelRepository(demo_repository)
    lite0 = repo.load_version("efficientnet_lite0", repo.versions("efficientnet_lite0")[-1])
    assert lite0.backend == "onnxruntime"
    assert lite0.manifest.precision == "fp32"
    assert lite0.manifest.sha256 == sha256_file(lite0.model_file)
    assert {"torch", "onnx", "jetinfer"} <= set(lite0.manifest.producer)
    assert lite0.config.max_batch == 32
    assert lite0.config.preprocess is not None
    assert lite0.config.preprocess.mean == (127.0, 127.0, 127.0)
    assert lite0.config.preprocess.std == (128.0, 128.0, 128.0)
    assert len(lite0.config.labels) == 1000
    assert lite0.config.labels[285] == "Egyptian cat"
    identity = repo.load_version("identity", repo.versions("identity")[-1])
    assert identity.config.max_batch == 256
    assert identity.config.inputs[0].shape == (-1,)


def test_exported_classifier_finds_the_cat(demo_repository: Path) -> None:
    import onnxruntime as ort
    import skimage.data
    from PIL import Image

    repo = ModelRepository(demo_repository)
    version = repo.load_version("efficientnet_lite0", repo.versions("efficientnet_lite0")[-1])
    pre = version.config.preprocess
    assert pre is not None
    image = (
        Image.fromarray(skimage.data.chelsea()).convert("RGB").resize((pre.width, pre.height), Image.BILINEAR)
    )
    pixels = (np.asarray(image, dtype=np.float32) - np.array(pre.mean, np.float32)) / np.array(
        pre.std, np.float32
    )
    batch = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
    session = ort.InferenceSession(str(version.model_file), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": batch})
    top5 = set(np.argsort(logits[0])[::-1][:5].tolist())
    assert top5 & CAT_CLASSES, f"top-5 {top5} has no cat"


def test_export_demo_skips_a_valid_version_unless_forced(tmp_path: Path) -> None:
    out = io.StringIO()
    first = export_demo(tmp_path, ["identity"], progress=False, out=out)
    assert [(r.status, r.version) for r in first] == [("written", 1)]
    again = export_demo(tmp_path, ["identity"], progress=False, out=out)
    assert [(r.status, r.version) for r in again] == [("skipped", 1)]
    forced = export_demo(tmp_path, ["identity"], force=True, progress=False, out=out)
    assert [(r.status, r.version) for r in forced] == [("written", 2)]
    # A corrupted newest version is not "valid": the next export writes a new one.
    model_file = tmp_path / "identity" / "2" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes() + b"x")
    repaired = export_demo(tmp_path, ["identity"], progress=False, out=out)
    assert [(r.status, r.version) for r in repaired] == [("written", 3)]
    assert "identity: written" in out.getvalue()


def test_export_demo_resnet50_where_torchvision_is(tmp_path: Path) -> None:
    try:
        import torchvision  # noqa: F401

        has_torchvision = True
    except Exception:
        has_torchvision = False
    (result,) = export_demo(tmp_path, ["resnet50"], progress=False, out=io.StringIO())
    if has_torchvision:
        assert result.status == "written"
        version = ModelRepository(tmp_path).load_version("resnet50", 1)
        assert version.config.preprocess is not None
        assert version.config.preprocess.mean == (123.675, 116.28, 103.53)
    else:
        assert result.status == "unavailable"
        assert "torchvision" in result.message
        assert not (tmp_path / "resnet50").exists()


def test_export_demo_cli_reports_and_refuses_unknown_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run_builder_cli("export-demo", "--repository", str(tmp_path), "--models", "identity", "--no-progress")
        == 0
    )
    assert "1 written" in capsys.readouterr().out
    assert run_builder_cli("export-demo", "--repository", str(tmp_path), "--models", "nope") == 2
    assert "unknown demo model" in capsys.readouterr().err


def test_labels_are_the_imagenet_classes() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0].startswith("tench")
    assert "cat" in labels[281]


# -- build ---------------------------------------------------------------------------------------------


def test_build_from_onnx_derives_the_config(tmp_path: Path, identity_onnx: Path) -> None:
    result = build(identity_onnx, tmp_path / "repo", "tiny")
    assert result.version.version == 1
    loaded = ModelRepository(tmp_path / "repo").load_version("tiny", 1)
    assert [t.to_dict() for t in loaded.config.inputs] == [
        {"name": "input", "datatype": "FP32", "shape": [-1]}
    ]
    assert [t.name for t in loaded.config.outputs] == ["output"]
    assert loaded.config.max_batch == 32
    assert loaded.manifest.sha256 == sha256_file(identity_onnx)


def test_build_with_a_config_file(tmp_path: Path, identity_onnx: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps(
            {
                "max_batch": 8,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [256]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [256]}],
                "labels": "labels.txt",
            }
        )
    )
    config = load_config_file(config_file, "tiny")
    build(identity_onnx, tmp_path / "repo", "tiny", config=config, options=BuildOptions(max_batch=16))
    loaded = ModelRepository(tmp_path / "repo").load_version("tiny", 1)
    assert loaded.config.max_batch == 16
    assert loaded.config.labels == ("a", "b")
    assert loaded.config.inputs[0].shape == (256,)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1]}]},
            "graph inputs ['input'] differ",
        ),
        ({"inputs": [{"name": "input", "datatype": "FP16", "shape": [-1]}]}, "is FP32 in the graph, FP16"),
        ({"outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1]}]}, "are not graph outputs"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 4]}]}, "has shape [-1] in the graph"),
    ],
)
def test_build_refuses_a_config_that_does_not_match_the_graph(
    tmp_path: Path, identity_onnx: Path, change: dict[str, Any], expected: str
) -> None:
    base = {
        "name": "tiny",
        "max_batch": 4,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1]}],
    }
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({**base, **change}))
    config = load_config_file(config_file, "tiny")
    with pytest.raises(RepositoryError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        build(identity_onnx, tmp_path / "repo", "tiny", config=config)
    assert ModelRepository(tmp_path / "repo").versions("tiny") == []


def test_build_refuses_a_file_onnxruntime_cannot_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07 definitely not a protobuf graph")
    with pytest.raises(RepositoryError, match="onnxruntime cannot load it"):
        build(broken, tmp_path / "repo", "broken")
    assert not (tmp_path / "repo" / "broken").exists()


def test_build_keeps_the_last_k_versions(tmp_path: Path, identity_onnx: Path) -> None:
    repo = tmp_path / "repo"
    removed = []
    for _ in range(4):
        removed.append(build(identity_onnx, repo, "tiny", options=BuildOptions(keep=2)).removed)
    assert ModelRepository(repo).versions("tiny") == [3, 4]
    assert removed == [(), (), (1,), (2,)]
    assert sorted(p.name for p in (repo / "tiny").iterdir()) == ["3", "4", "config.json"]


def test_a_build_that_fails_midway_leaves_no_version(
    tmp_path: Path, identity_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jetinfer.repository as repository

    repo = tmp_path / "repo"
    build(identity_onnx, repo, "tiny")
    real = repository._write_synced

    def crash_on_manifest(path: Path, data: bytes) -> None:
        if path.name == "manifest.json":
            assert (path.parent / "model.onnx").stat().st_size > 0  # the model file is copied already
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(repository, "_write_synced", crash_on_manifest)
    with pytest.raises(OSError, match="No space left"):
        build(identity_onnx, repo, "tiny")
    monkeypatch.undo()
    assert ModelRepository(repo).versions("tiny") == [1]
    assert [p.name for p in (repo / "tiny").iterdir() if p.name.startswith(".")] == []
    assert ModelRepository(repo).load_version("tiny", 1).version == 1


def test_build_cli(tmp_path: Path, identity_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = str(tmp_path / "repo")
    assert (
        run_builder_cli(
            "build", str(identity_onnx), "--repository", repo, "--name", "tiny", "--max-batch", "8"
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "built tiny v1: onnxruntime fp32" in out
    assert run_builder_cli("build", "identity", "--repository", repo, "--keep", "1") == 0
    assert "built identity v1" in capsys.readouterr().out
    assert ModelRepository(repo).load_version("tiny", 1).config.max_batch == 8


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--backend", "torch"], "--backend torch takes a torch.export program (.pt2"),
        (["--fp16"], "--fp16 and --int8 need --backend tensorrt"),
        (["--backend", "tensorrt", "--int8"], "--int8 needs --calibration-dir"),
        (["--keep", "0"], "--keep must be at least 1"),
        (["--config", "/nonexistent/config.json"], "no such config file"),
    ],
)
def test_build_cli_errors_are_one_line(
    tmp_path: Path, identity_onnx: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    rc = run_builder_cli("build", str(identity_onnx), "--repository", str(tmp_path), "--name", "tiny", *argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_build_tensorrt_without_tensorrt_names_what_is_missing(
    tmp_path: Path, identity_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if tensorrt_usable():
        pytest.skip("tensorrt is importable here: the engine build is tested by the trt tests")
    rc = run_builder_cli(
        "build", str(identity_onnx), "--repository", str(tmp_path), "--name", "tiny", "--backend", "tensorrt"
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "tensorrt" in err.lower()  # names what is missing: the module, or TensorRT itself
    assert err.count("\n") == 1
    assert ModelRepository(tmp_path).versions("tiny") == []


def test_build_help_explains_every_option() -> None:
    parser = argparse.ArgumentParser(prog="jetinfer")
    subparsers = parser.add_subparsers(dest="command")
    builder_cli.register(subparsers)
    for command in ("export-demo", "build", "models", "sidecar"):
        sub = subparsers.choices[command]
        for action in sub._actions:
            assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    assert set(DEMO_MODELS) == {"efficientnet_lite0", "resnet50", "identity"}


def test_build_torch_backend_exports_a_demo_module(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="the torch backend's export needs torch (the export extra)")
    config_file = tmp_path / "config.json"
    config_file.write_text(
        json.dumps(
            {
                "max_batch": 8,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [16]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [16]}],
            }
        )
    )
    repo = tmp_path / "repo"
    rc = run_builder_cli(
        "build",
        "identity",
        "--backend",
        "torch",
        "--config",
        str(config_file),
        "--name",
        "ident",
        "--repository",
        str(repo),
    )
    assert rc == 0
    version = ModelRepository(repo).load_version("ident", 1)
    assert version.backend == "torch"
    assert version.model_file.name == "model.pt2"
    assert "torch" in version.manifest.producer
    program = torch.export.load(str(version.model_file))
    frames = torch.randn(3, 16)
    assert torch.equal(program.module()(frames), frames)
