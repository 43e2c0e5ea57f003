"""Make tensorrt-stubs usable by mypy (run by `make install` after installing them with --no-deps).

tensorrt-stubs 10.13 ships no `py.typed` marker (so mypy ignores it and checks nothing against the
TensorRT API) and has a few lines that are not valid Python: parameters named `in`, a required
parameter after defaulted ones, and an import of `tensorrt_libs`, a package that cannot be installed
here. This script fixes those lines in the installed copy, idempotently.
"""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path


def main() -> int:
    """Patch the installed stubs; returns 0, or 1 when they are not installed."""
    site = Path(sysconfig.get_paths()["purelib"])
    packages = [site / "tensorrt", site / "tensorrt_bindings"]
    if not all((p / "__init__.pyi").is_file() for p in packages):
        print("tensorrt-stubs not installed; nothing to patch")
        return 1
    for package in packages:
        (package / "py.typed").write_text("")
        for stub in package.glob("*.pyi"):
            text = stub.read_text()
            patched = text.replace("import tensorrt_libs as tensorrt_libs\n", "")
            patched = patched.replace("'tensorrt_libs', ", "")
            patched = re.sub(r"\bin: ", "in_: ", patched)
            patched = patched.replace(
                "power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)"
            )
            if patched != text:
                stub.write_text(patched)
                print(f"patched {stub}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
