"""The queue between forming and running: the oldest ready batch first, bounded, the end marker last."""

from __future__ import annotations

import asyncio

import pytest

from jetinfer.worker.ready_queue import ReadyQueue


async def test_a_batch_made_first_runs_first_and_formed_batches_keep_their_order() -> None:
    queue: ReadyQueue[str] = ReadyQueue(maxsize=4)
    loop = asyncio.get_running_loop()
    slow, quick = loop.create_future(), loop.create_future()
    await queue.put(slow)  # a lane of decoding processes, still at it
    await queue.put(quick)  # a GPU lane
    await queue.put("formed")
    quick.set_result("quick")
    assert await queue.get() is quick
    assert await queue.get() == "formed"
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()  # only the slow one is left, and it is not made yet
    slow.set_result("slow")
    assert await asyncio.wait_for(waiting, 1) is slow


async def test_a_failed_making_is_ready_too() -> None:
    queue: ReadyQueue[str] = ReadyQueue(maxsize=2)
    failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    failed.set_exception(RuntimeError("CUDA out of memory"))
    await queue.put(failed)
    taken = await asyncio.wait_for(queue.get(), 1)
    assert taken is failed
    with pytest.raises(RuntimeError):
        await taken


async def test_the_end_marker_comes_after_everything_put_before_it() -> None:
    queue: ReadyQueue[str] = ReadyQueue(maxsize=3)
    pending: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    await queue.put(pending)
    await queue.put(None)
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    assert not waiting.done()  # the marker is ready, but a batch before it is not
    pending.set_result("last batch")
    assert await asyncio.wait_for(waiting, 1) is pending
    assert await asyncio.wait_for(queue.get(), 1) is None


async def test_put_waits_for_room_and_a_cancelled_wait_leaves_the_queue_working() -> None:
    queue: ReadyQueue[str] = ReadyQueue(maxsize=1)
    await queue.put("a")
    assert queue.full()
    blocked = asyncio.ensure_future(queue.put("b"))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert await queue.get() == "a"
    await asyncio.wait_for(blocked, 1)
    assert await queue.get() == "b"
    cancelled = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    queue.put_nowait("c")
    assert await asyncio.wait_for(queue.get(), 1) == "c"
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()
    queue.put_nowait("d")
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait("e")
    waiting = asyncio.ensure_future(queue.wait_for_entry())
    await asyncio.sleep(0)
    assert waiting.done()  # "d" is queued
    with pytest.raises(ValueError, match="at least one"):
        ReadyQueue[str](maxsize=0)
