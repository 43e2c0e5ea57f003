"""The queue between the form and run stages: bounded, and a batch made ahead runs as soon as it is made.

On a GPU, batches queued behind a busy engine are made into the model's input ahead of their turn, in
lanes of unequal speed (a lane of decoding processes takes several times as long for a batch as a
lane decoding on the GPU). Taken in the order they were formed, a quick lane's finished batch would
wait behind a slow lane's, and the engine with it. So `get` returns the oldest entry that is ready: a
batch as formed, or one made ahead whose making has finished (or failed: the run stage makes it
then). Requests promise no order among batches; replies carry their request's id. An end marker
(None) is returned only once everything put before it has been taken.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

__all__ = ["ReadyQueue"]

T = TypeVar("T")


class ReadyQueue(Generic[T]):
    """At most `maxsize` entries, each a value or an asyncio future of one; `get` takes the oldest ready."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a ready queue holds at least one entry")
        self.maxsize = maxsize
        self._entries: list[T | asyncio.Future[T] | None] = []
        self._waiters: list[asyncio.Future[None]] = []

    def qsize(self) -> int:
        """Entries queued, ready or not."""
        return len(self._entries)

    def empty(self) -> bool:
        """Whether nothing is queued."""
        return not self._entries

    def full(self) -> bool:
        """Whether `put` would wait."""
        return len(self._entries) >= self.maxsize

    async def put(self, entry: T | asyncio.Future[T] | None) -> None:
        """Queue `entry` (a value, a future of one, or None: the end marker), waiting for room."""
        while self.full():
            await self._changed()
        self.put_nowait(entry)

    def put_nowait(self, entry: T | asyncio.Future[T] | None) -> None:
        """Queue `entry` now; asyncio.QueueFull where there is no room."""
        if self.full():
            raise asyncio.QueueFull
        self._entries.append(entry)
        if isinstance(entry, asyncio.Future) and not entry.done():
            entry.add_done_callback(lambda _: self._wake())
        self._wake()

    async def wait_for_entry(self) -> None:
        """Until something is queued (ready or not)."""
        while not self._entries:
            await self._changed()

    async def get(self) -> T | asyncio.Future[T] | None:
        """The oldest ready entry (a done future is returned as it is: await it for its value)."""
        while (index := self._first_ready()) is None:
            await self._changed()
        entry = self._entries.pop(index)
        self._wake()
        return entry

    def get_nowait(self) -> T | asyncio.Future[T] | None:
        """The oldest entry, ready or not; asyncio.QueueEmpty where there is none."""
        if not self._entries:
            raise asyncio.QueueEmpty
        entry = self._entries.pop(0)
        self._wake()
        return entry

    def _first_ready(self) -> int | None:
        for index, entry in enumerate(self._entries):
            if entry is None:
                return index if index == 0 else None  # the end marker goes last
            if not isinstance(entry, asyncio.Future) or entry.done():
                return index
        return None

    async def _changed(self) -> None:
        """Until an entry is put, taken or made."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
