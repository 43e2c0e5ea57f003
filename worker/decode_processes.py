"""Image requests decoded in a pool of processes, into shared memory (`--decode-processes N`).

A worker process decodes on threads that share one GIL with its event loop: on the H100 machine that
capped `--gpu-normalise` at about 1.4k images/s per worker, and `--gpu-decode` spends the SMs the
model needs. Here each batch's encoded images go to N processes (spawned, so none inherits a CUDA
context); each decodes its share (Pillow: decode, centre-crop, resize) straight into the batch's
slot of one shared-memory block, as (H, W, 3) uint8. The worker then copies the slot to the GPU and
normalises it there (`GpuNormaliser.from_pixels`). The encoded images go the other way through the
same block (each slot has an area for them): the pipes carry only offsets and the errors back.

Why so: in a busy worker every thread that needs the GIL waits for the event loop to give it up
(up to 5 ms each time). A process pool's helper threads, and megabytes of JPEGs written to pipes
64 KB at a time, each needed it again and again per batch; this way the thread asking for a batch
needs it about twice per process. Batches of one or two images (a lone request at idle) are
decoded in the asking thread: the round trip would cost more than the decoding.

A slot is held from the decode until the copy to the GPU has finished (`with decoder.decode(...)`);
a few slots let the batch being decoded ahead and the batch being run each have one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import numpy.typing as npt

from jetinfer.errors import BackendError, InvalidInputError, RequestError
from jetinfer.images import decode_pixels
from jetinfer.repository import PreprocessConfig

__all__ = ["ProcessDecoder"]

logger = logging.getLogger(__name__)

_MIN_CHUNK = 4  # images per process: below this the pipe round trip costs more than the decoding
_INLINE_IMAGES = 2  # batches this small are decoded in the asking thread
_ARENA_BYTES_PER_FRAME = 64 * 1024  # room for encoded images in each slot; larger batches use the pipe
_START_TIMEOUT_S = 60.0

_Encoded = tuple[int, int] | bytes  # an image in the shared block (offset, length), or its bytes


class ProcessDecoder:
    """Decodes lists of encoded images into uint8 (N, H, W, 3) arrays in shared memory, on N processes."""

    def __init__(
        self,
        config: PreprocessConfig,
        *,
        processes: int,
        max_frames: int,
        slots: int = 3,
        timeout_s: float = 60.0,
    ) -> None:
        if processes < 1 or max_frames < 1 or slots < 1:
            raise ValueError("processes, max_frames and slots must be at least 1")
        self.processes = processes
        self.max_frames = max_frames
        self.timeout_s = timeout_s
        self._frame_shape = (config.height, config.width, 3)
        self._pixel_bytes = max_frames * math.prod(self._frame_shape)
        self._arena_bytes = max_frames * _ARENA_BYTES_PER_FRAME
        self._slot_bytes = self._pixel_bytes + self._arena_bytes  # pixels out, then encoded images in
        self._shm = SharedMemory(create=True, size=slots * self._slot_bytes)
        #: The whole shared block, for registering it with the GPU as pinned memory.
        self.buffer: npt.NDArray[np.uint8] = np.ndarray((slots * self._slot_bytes,), np.uint8, self._shm.buf)
        self._slots = slots
        self._free: queue.Queue[int] = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        self._pipes_lock = threading.Lock()  # one batch at a time on the pipes; slots keep their pixels apart
        self._children: list[tuple[BaseProcess, Connection]] = []
        self._start()

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process holding a CUDA context
        for _ in range(self.processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_serve, args=(child_end, self._shm.name), name="jetinfer-decode", daemon=True
            )
            process.start()
            child_end.close()
            self._children.append((process, parent_end))
        # Wait until every process is ready (spawning takes a second or so), not at the first request.
        for child, pipe in self._children:
            if not pipe.poll(_START_TIMEOUT_S) or pipe.recv() != "ready":
                self._stop_children()
                raise BackendError(f"decoding process {child.pid} did not start")

    def _stop_children(self) -> None:
        for process, pipe in self._children:
            with contextlib.suppress(OSError):
                pipe.close()
            process.kill()
        for process, _ in self._children:
            process.join(5)
        self._children = []

    def fits(self, frames: int, config: PreprocessConfig) -> bool:
        """Whether `frames` images decoded with `config` fit one slot."""
        return frames * config.height * config.width * 3 <= self._pixel_bytes

    @contextlib.contextmanager
    def decode(self, images: list[bytes], config: PreprocessConfig) -> Iterator[npt.NDArray[np.uint8]]:
        """Decode `images` with `config` into a shared slot, yielded as (N, H, W, 3) uint8.

        The array is valid only inside the `with`: the slot goes back to the pool on exit. Raises
        InvalidInputError (or TooLargeError) naming the first image that cannot be decoded;
        BackendError where the batch does not fit a slot, or a decoding process died or took over
        `timeout_s` (the processes are then started again).
        """
        frame_shape = (config.height, config.width, 3)
        frame_bytes = math.prod(frame_shape)
        if not self.fits(len(images), config):
            raise BackendError(
                f"{len(images)} images of {config.width}x{config.height} do not fit a decoding slot of "
                f"{self.max_frames} frames of {self._frame_shape[1]}x{self._frame_shape[0]}"
            )
        slot = self._free.get()
        try:
            base = slot * self._slot_bytes
            errors = self._run(images, config, base, frame_bytes)
            for index, error in enumerate(errors):
                if error is not None:
                    raise type(error)(f"image {index} of the batch: {error.message}")
            length = len(images) * frame_bytes
            yield self.buffer[base : base + length].reshape(len(images), *frame_shape)
        finally:
            self._free.put(slot)

    def _run(
        self, images: list[bytes], config: PreprocessConfig, base: int, frame_bytes: int
    ) -> list[RequestError | None]:
        if len(images) <= _INLINE_IMAGES:
            return _decode_into(self._shm, images, config, base)
        encoded = self._stage(images, base + self._pixel_bytes)
        size = max(_MIN_CHUNK, -(-len(images) // self.processes))
        starts = range(0, len(images), size)
        with self._pipes_lock:
            if not self._children:
                self._start()
            used = self._children[: len(starts)]
            try:
                for (_, pipe), start in zip(used, starts, strict=True):
                    pipe.send((encoded[start : start + size], config, base + start * frame_bytes))
                errors: list[RequestError | None] = []
                deadline = time.monotonic() + self.timeout_s
                for _, pipe in used:
                    if not pipe.poll(max(0.0, deadline - time.monotonic())):
                        raise TimeoutError(f"no answer within {self.timeout_s:g} s")
                    errors += pipe.recv()
                return errors
            except (OSError, EOFError, TimeoutError) as exc:
                logger.error("a decoding process failed (%s); starting %d again", exc, self.processes)
                self._stop_children()
                self._start()
                raise BackendError(
                    f"a decoding process died or hung ({exc}); they were started again"
                ) from exc

    def _stage(self, images: list[bytes], arena: int) -> list[_Encoded]:
        """Copy the images into the slot's arena: (offset, length) each; bytes for those past its end."""
        staged: list[_Encoded] = []
        offset, end = arena, arena + self._arena_bytes
        for image in images:
            if offset + len(image) <= end:
                self.buffer[offset : offset + len(image)] = np.frombuffer(image, np.uint8)
                staged.append((offset, len(image)))
                offset += len(image)
            else:
                staged.append(image)
        return staged

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the processes and free the shared memory (unregister it from the GPU first).

        Waits up to `timeout_s` for batches still decoding or copying to give their slots back;
        the block is left to the process's exit where one does not, never freed under a copy.
        """
        deadline = time.monotonic() + timeout_s
        try:
            for _ in range(self._slots):
                self._free.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            logger.warning("a batch still holds a decoding slot; the shared block is freed at exit")
            return
        with self._pipes_lock:
            self._stop_children()
        del self.buffer
        try:
            self._shm.close()
        except BufferError:  # a view of the block is still alive somewhere: freed at exit
            logger.warning("the decoding block is still in use; it is freed at exit")
            return
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()


# -- in the decoding processes ---------------------------------------------------------------------


def _serve(pipe: Connection, shared_name: str) -> None:
    """A decoding process: attach the shared block, then decode batches from `pipe` until it closes."""
    # Ctrl-C reaches the whole process group: the worker shuts down and closes the pipe, which ends this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Spawned children share the parent's resource tracker, which already tracks this block: the
    # parent unlinks it once, at close.
    shared = SharedMemory(name=shared_name)
    pipe.send("ready")
    while True:
        try:
            images, config, offset = pipe.recv()
        except (EOFError, OSError):
            break
        pipe.send(_decode_into(shared, images, config, offset))
    shared.close()


def _decode_into(
    shared: SharedMemory, images: Sequence[_Encoded], config: PreprocessConfig, offset: int
) -> list[RequestError | None]:
    """Decode `images` one after another into the shared block from `offset`; an error per image."""
    out: npt.NDArray[Any] = np.ndarray(
        (len(images), config.height, config.width, 3), np.uint8, shared.buf, offset=offset
    )
    view = shared.buf
    assert view is not None, "an open shared block has a buffer"
    errors: list[RequestError | None] = []
    for index, image in enumerate(images):
        try:
            if isinstance(image, bytes):
                data = image
            else:
                start, length = image
                data = bytes(view[start : start + length])
            out[index] = decode_pixels(data, config)[0]
            errors.append(None)
        except RequestError as exc:
            errors.append(exc.detached())
        except Exception as exc:  # whatever a decoder library raises, the image is what is wrong
            errors.append(InvalidInputError(f"cannot decode image: {type(exc).__name__}: {exc}"))
    del out, view  # release the exports of the shared buffer
    return errors
