"""What a file given to `jetinfer infer` or `jetinfer video` holds, checked before anything is sent.

An empty file, a text file named `.png`, or a suffix the client cannot send is refused here with
the file's name, instead of after a round trip with a message about an in-memory buffer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from jetinfer.errors import InvalidInputError

__all__ = ["IMAGE_SUFFIXES", "check_request_file", "image_problem"]

#: Image file suffixes and the format their name promises.
IMAGE_SUFFIXES: Final = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}
_MAGIC: Final = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
_NPY_MAGIC: Final = b"\x93NUMPY"


def image_problem(data: bytes, promised: str = "JPEG or PNG") -> str | None:
    """Why `data` cannot be sent as an image (empty, or neither JPEG nor PNG), or None."""
    if not data:
        return "empty file"
    if not data.startswith(_MAGIC):
        return f"not a {promised} image (it starts with {data[:8]!r})"
    return None


def check_request_file(path: Path) -> None:
    """Raise `InvalidInputError` naming `path` if it cannot be sent as a request (reads its first bytes)."""
    suffix = path.suffix.lower()
    if suffix not in (*IMAGE_SUFFIXES, ".npy"):
        raise InvalidInputError(f"{path}: send .jpg, .jpeg, .png (images) or .npy (tensors) files")
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if suffix == ".npy":
        if not head:
            raise InvalidInputError(f"{path}: empty file")
        if not head.startswith(_NPY_MAGIC):
            raise InvalidInputError(f"{path}: not a .npy file (it starts with {head[:8]!r})")
        return
    problem = image_problem(head, IMAGE_SUFFIXES[suffix])
    if problem is not None:
        raise InvalidInputError(f"{path}: {problem}")
