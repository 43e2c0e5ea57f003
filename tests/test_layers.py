"""The layers hold: the core imports no leaf (its CLI entry point aside), the leaves import no other leaf,
no module circle exists, and the wheel installs only the `jetinfer` namespace."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

#: The installed names of the leaf packages and the measuring tools, and the folders they are built from.
LEAVES = {
    "jetinfer.worker": "worker",
    "jetinfer.producer": "producer",
    "jetinfer.builder": "builder",
    "jetinfer.bench": "bench",
}


def _module_name(path: Path) -> str:
    """The installed module name of a source file of the core or of a leaf folder."""
    relative = path.relative_to(REPO_ROOT)
    top = relative.parts[0]
    package = "jetinfer" if top == "jetinfer" else next(k for k, v in LEAVES.items() if v == top)
    parts = [*package.split("."), *relative.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    """Every product module (the device scripts and the peers under bench/ are not imported by any)."""
    found: dict[str, Path] = {}
    for folder in ("jetinfer", *LEAVES.values()):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            relative = path.relative_to(REPO_ROOT)
            if (
                relative.parts[0] == "jetinfer"
                and len(relative.parts) > 1
                and relative.parts[1]
                in (
                    "worker",
                    "producer",
                    "builder",
                    "bench",
                )
            ):
                continue  # the links to the leaf folders: read once, from the folders themselves
            if relative.parts[0] == "bench" and len(relative.parts) > 2:
                continue  # bench/gpu, bench/peers: scripts run where their own packages are
            found[_module_name(path)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """The modules `module` imports, anywhere in it (functions included), as absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


SOURCES = _sources()
GRAPH = {module: _imports(module, path) for module, path in SOURCES.items()}


def _leaf_of(module: str) -> str | None:
    return next((leaf for leaf in LEAVES if module == leaf or module.startswith(leaf + ".")), None)


def test_the_sources_are_found() -> None:
    for expected in (
        "jetinfer.protocol",
        "jetinfer.worker.pipeline",
        "jetinfer.producer.client",
        "jetinfer.bench.load",
    ):
        assert expected in SOURCES


def _is_cli(module: str) -> bool:
    return module == "jetinfer.cli" or module.startswith("jetinfer.cli.")


# The CLI entry point (jetinfer.cli) is the one core package that assembles the leaves.
@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _leaf_of(m) is None and not _is_cli(m)))
def test_the_core_imports_no_leaf(module: str) -> None:
    leaves = sorted(name for name in GRAPH[module] if _leaf_of(name) is not None)
    assert not leaves, f"{module} imports {leaves}"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _leaf_of(m) not in (None, "jetinfer.bench")))
def test_a_leaf_imports_no_other_leaf(module: str) -> None:
    own = _leaf_of(module)
    others = sorted(name for name in GRAPH[module] if _leaf_of(name) not in (None, own))
    assert not others, f"{module} imports {others}"
    assert not any(name.split(".")[0] in ("worker", "producer", "builder") for name in GRAPH[module]), (
        f"{module} imports a top-level leaf package instead of jetinfer.*"
    )


def test_no_module_circle() -> None:
    edges = {m: {n for n in GRAPH[m] if n in SOURCES and n != m} for m in SOURCES}
    # A package's __init__ re-exports its modules; an edge into a package from inside it is not a circle.
    for module, targets in edges.items():
        edges[module] = {t for t in targets if not module.startswith(t + ".")}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> None:
        if module in done:
            return
        assert module not in visiting, "import circle: " + " -> ".join(
            [*visiting[visiting.index(module) :], module]
        )
        visiting.append(module)
        for target in sorted(edges[module]):
            visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(edges):
        visit(module)


def test_video_depends_on_the_client_not_the_reverse() -> None:
    assert (
        "jetinfer.producer.client"
        in {n.rpartition(".")[0] for n in GRAPH["jetinfer.producer.video"]} | GRAPH["jetinfer.producer.video"]
    )
    assert not any(n.startswith("jetinfer.producer.video") for n in GRAPH["jetinfer.producer.client"])


@pytest.mark.slow
def test_the_wheel_installs_only_the_jetinfer_namespace(tmp_path: Path) -> None:
    # Built from a copy (links kept as links), so the build leaves nothing in the checkout.
    source = tmp_path / "src"
    shutil.copytree(
        REPO_ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".peers", ".carry", "build", "*.egg-info", "__pycache__"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=source,
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("jetinfer-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert tops == {"jetinfer", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for module in ("jetinfer/worker/pipeline.py", "jetinfer/producer/client.py", "jetinfer/builder/build.py"):
        assert module in names
