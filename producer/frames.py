"""The frames of a batch job, read one at a time from a video file (OpenCV) or a folder of images.

Nothing is read ahead: each frame is decoded (video) or read (folder) when the job asks for the next
one, so the first frame is on its way while the rest of the input is still on disk. A folder's file
that is not an image (empty, text, unreadable) is a frame with a `problem` naming the file, answered
as an error without being sent; files whose names are not images are skipped, and said so once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jetinfer.errors import InvalidInputError

from .files import IMAGE_SUFFIXES, image_problem

__all__ = ["Frame", "count_frames", "default_job_id", "read_frames"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its index in the job, its time in the source, its encoded image, and for a
    folder's frames the file it came from (and what is wrong with it, for a file that is no image)."""

    index: int
    timestamp_s: float | None
    image: bytes
    source: str | None = None
    problem: str | None = None


def default_job_id(source: Path, model: str, every_n: int, fps: float | None, *, key: bytes = b"") -> str:
    """A job id that is the same for the same input, model and sampling, so a re-run resumes.

    With `key` (`ids.id_key` of the client's settings, for a tenant) it is a keyed hash, so another
    tenant, who sees job names in the stream's subjects, cannot tell which file a job reads.
    """
    stat = source.stat()
    text = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{model}|{every_n}|{fps}"
    if key:
        return "job-" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:16]
    return "job-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _folder_files(source: Path) -> list[Path]:
    """The image files of a folder, sorted by name; other files are skipped with one warning."""
    images: list[Path] = []
    skipped: list[Path] = []
    for path in sorted(source.iterdir()):
        if path.name.startswith("."):
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else skipped).append(path)
    if skipped:
        shown = ", ".join(p.name for p in skipped[:5]) + (
            f" and {len(skipped) - 5} more" if skipped[5:] else ""
        )
        logger.warning("%s: skipping %d files that are not .jpg/.jpeg/.png: %s", source, len(skipped), shown)
    if not images:
        raise InvalidInputError(f"{source} holds no .jpg/.jpeg/.png images")
    return images


def count_frames(source: Path, *, every_n: int = 1, fps: float | None = None) -> int | None:
    """How many frames `read_frames` will give (a folder exactly, a video as its header says), or None."""
    if source.is_dir():
        files = [
            p for p in source.iterdir() if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        return math.ceil(len(files) / every_n)
    if fps is not None:
        return None
    try:
        import cv2
    except ImportError:
        return None
    capture = cv2.VideoCapture(str(source))
    try:
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    finally:
        capture.release()
    return math.ceil(total / every_n) if total > 0 else None


def _read_folder(source: Path, every_n: int) -> Iterator[Frame]:
    for index, path in enumerate(_folder_files(source)[::every_n]):
        try:
            data = path.read_bytes()
        except OSError as exc:
            yield Frame(index, None, b"", source=str(path), problem=f"cannot read it: {exc.strerror or exc}")
            continue
        problem = image_problem(data, IMAGE_SUFFIXES[path.suffix.lower()])
        yield Frame(index, None, data, source=str(path), problem=problem)


def _read_video(source: Path, every_n: int, fps: float | None, quality: int) -> Iterator[Frame]:
    try:
        import cv2
    except ImportError:
        raise InvalidInputError("reading video files needs OpenCV: pip install 'jetinfer[video]'") from None
    capture = cv2.VideoCapture(str(source))
    if not capture.isOpened():
        raise InvalidInputError(f"{source}: OpenCV cannot open it as a video")
    try:
        source_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        min_gap_s = 1.0 / fps if fps else 0.0
        last_kept = -1e18
        position = 0
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            timestamp = position / source_fps if source_fps > 0 else None
            keep = position % every_n == 0
            if keep and min_gap_s and timestamp is not None:
                keep = timestamp - last_kept >= min_gap_s - 1e-9
            if keep:
                encoded_ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
                if not encoded_ok:
                    raise InvalidInputError(f"{source}: cannot encode frame {position} as JPEG")
                yield Frame(index=index, timestamp_s=timestamp, image=buffer.tobytes())
                index += 1
                if timestamp is not None:
                    last_kept = timestamp
            position += 1
    finally:
        capture.release()


def read_frames(
    source: Path, *, every_n: int = 1, fps: float | None = None, quality: int = 90
) -> Iterator[Frame]:
    """Frames of a video file (OpenCV, re-encoded as JPEG) or of a folder of images (sorted by name),
    sampled, one at a time.

    `every_n` keeps every n-th frame; `fps` keeps frames at most that often (video files).
    """
    if every_n < 1:
        raise InvalidInputError("every_n must be at least 1")
    if source.is_dir():
        yield from _read_folder(source, every_n)
        return
    if not source.is_file():
        raise InvalidInputError(f"{source}: no such file or folder")
    yield from _read_video(source, every_n, fps, quality)
