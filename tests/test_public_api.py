"""Each package declares its public surface in `__all__`, and every name there exists and is documented."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

PACKAGES = [
    "jetinfer",
    "jetinfer.worker",
    "jetinfer.worker.backends",
    "jetinfer.producer",
    "jetinfer.builder",
    "jetinfer.bench",
    "jetinfer.cli",
]


def _modules() -> list[str]:
    names = []
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        for info in pkgutil.iter_modules(package.__path__, prefix=f"{package_name}."):
            if not info.ispkg and not info.name.endswith(".__main__"):  # running it is its job
                names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("module_name", _modules())
def test_all_names_exist_and_are_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__, f"{module_name} has no docstring"
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__"
    assert len(exported) == len(set(exported)), f"{module_name}.__all__ repeats names"
    for name in exported:
        assert hasattr(module, name), f"{module_name}.__all__ names {name!r}, which does not exist"
        value = getattr(module, name)
        if (
            callable(value)
            and not isinstance(value, type(module))
            and getattr(value, "__module__", "") == module_name
        ):
            assert value.__doc__, f"{module_name}.{name} has no docstring"


@pytest.mark.parametrize("package_name", PACKAGES)
def test_package_exports_are_sorted_and_public(package_name: str) -> None:
    exported = importlib.import_module(package_name).__all__
    assert all(not name.startswith("_") or name == "__version__" for name in exported)
    assert list(exported) == sorted(exported, key=lambda n: (n.startswith("_"), n))
