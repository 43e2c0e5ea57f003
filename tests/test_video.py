"""`jetinfer video` and `video_job`: every frame answered once, in order; a re-run resumes (issue 7)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from jetinfer.producer.client import Client
from jetinfer.producer.video import JobProgress, _frame_id, _Job, read_frames, video_job
from jetinfer.protocol import encode_outputs
from jetinfer.settings import StreamSettings
from jetinfer.streams import RESULTS_STREAM, ensure_streams
from tests.conftest import NatsUnderTest, run_cli, running_worker, wait_until_answered

FRAMES = 40


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, cat_jpeg: bytes) -> Path:
    """A real MJPG video of the cat photo panning, one frame a step."""
    import cv2

    cat = cv2.imdecode(np.frombuffer(cat_jpeg, np.uint8), cv2.IMREAD_COLOR)
    path = tmp_path_factory.mktemp("video") / "cat.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (224, 224))
    for step in range(FRAMES):
        writer.write(np.ascontiguousarray(cat[20 : 20 + 224, step * 4 : step * 4 + 224]))
    writer.release()
    return path


def answered(worker: Any, model: str) -> int:
    labels = {"model": model, "version": "1", "status": "ok"}
    return int(worker.registry.get_sample_value("jetinfer_requests_total", labels) or 0)


def test_read_frames_samples_a_video(clip: Path) -> None:
    frames = list(read_frames(clip))
    assert [f.index for f in frames] == list(range(FRAMES))
    assert frames[1].timestamp_s == pytest.approx(0.1)
    assert all(f.image[:3] == b"\xff\xd8\xff" for f in frames)
    every_third = list(read_frames(clip, every_n=3))
    assert len(every_third) == len(range(0, FRAMES, 3))
    two_per_second = list(read_frames(clip, fps=2.0))
    assert [f.timestamp_s for f in two_per_second] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])


async def test_job_in_order_and_a_rerun_sends_only_the_rest(
    nats_server: NatsUnderTest, model_repo: Any, clip: Path
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    frames = list(read_frames(clip))
    job = f"test-{model}"
    async with running_worker(nats_server.url, repo, [model]) as worker, Client(nats_server.url) as client:
        first = []
        async for result in video_job(client, model, frames, job=job, in_flight=8):
            first.append(result)
            if len(first) == FRAMES // 2:
                break  # the producer dies half way
        second = [r async for r in video_job(client, model, frames, job=job, in_flight=8)]
        await wait_until_answered(client.js, model)  # a request is counted after its reply and ack
        served = answered(worker, model)
    assert [r.index for r in first] == list(range(FRAMES // 2))
    assert [r.index for r in second] == list(range(FRAMES))
    assert all(r.reply is not None and r.error is None for r in second)
    assert sum(r.resumed for r in second) >= FRAMES // 2
    assert served == FRAMES, f"the worker ran {served} frames for {FRAMES}: frames were sent twice"


async def test_frames_several_to_a_message_are_answered_as_one_by_one(
    nats_server: NatsUnderTest, model_repo: Any, clip: Path
) -> None:
    repo, model = model_repo("efficientnet_lite0")
    frames = list(read_frames(clip))
    async with running_worker(nats_server.url, repo, [model]) as worker, Client(nats_server.url) as client:
        alone = [r async for r in video_job(client, model, frames, job=f"alone-{model}", in_flight=8)]
        await wait_until_answered(client.js, model)  # a request is counted after its reply and ack
        before = answered(worker, model)
        grouped = [
            r
            async for r in video_job(
                client, model, frames, job=f"grouped-{model}", in_flight=16, frames_per_message=8
            )
        ]
        await wait_until_answered(client.js, model)
        messages = answered(worker, model) - before
    assert [r.index for r in grouped] == list(range(FRAMES))
    assert messages == FRAMES // 8, f"{FRAMES} frames in {messages} messages"
    for one, several in zip(alone, grouped, strict=True):
        assert one.reply is not None
        assert several.reply is not None
        np.testing.assert_allclose(several.reply.output(), one.reply.output(), rtol=1e-4, atol=1e-4)
        assert several.reply.output().shape == (1, 1000)


def test_cli_writes_one_line_per_frame_in_order(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes, tmp_path: Path
) -> None:

    from PIL import Image

    repo, model = model_repo("efficientnet_lite0")
    folder = tmp_path / "frames"
    folder.mkdir()
    cat = Image.open(io.BytesIO(cat_jpeg))
    for index in range(12):
        cat.rotate(index * 3).save(folder / f"frame{index:03d}.jpg")
    out = tmp_path / "results.jsonl"

    argv = [str(folder), "--model", model, "--out", str(out), "--nats-url", nats_server.url, "--no-progress"]
    result = video_with_worker(nats_server, repo, model, *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(12))
    assert all("cat" in " ".join(p["label"] for p in line["top_k"]).lower() for line in lines[:3])
    assert "12 frames" in result.stdout
    rerun = video_with_worker(nats_server, repo, model, *argv)
    assert "12 answered in an earlier run, 0 sent now" in rerun.stdout


# -- issue 16: no hang, one bad file is one line, frames stream, Ctrl-C says how to resume ---------------


def video_with_worker(nats: NatsUnderTest, repo: Path, model: str, *argv: str) -> Any:
    """`jetinfer video *argv` while a worker serves `model` from `repo`."""

    async def run() -> Any:
        async with running_worker(nats.url, repo, [model]):
            return await asyncio.to_thread(run_cli, "video", *argv)

    return asyncio.run(run())


def cat_folder(folder: Path, cat_jpeg: bytes, count: int) -> Path:
    from PIL import Image

    folder.mkdir()
    cat = Image.open(io.BytesIO(cat_jpeg))
    for index in range(count):
        cat.rotate(index * 3).save(folder / f"frame{index:03d}.jpg")
    return folder


async def register_only(url: str, model: str) -> None:
    """Register `model` on INFER as a worker that then went away would have left it."""
    import nats

    from jetinfer.settings import StreamSettings
    from jetinfer.streams import ensure_consumer, ensure_streams, register_model

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, StreamSettings())
        await register_model(js, model, StreamSettings())
        await ensure_consumer(js, model, StreamSettings())
    finally:
        await nc.drain()


def test_video_with_nobody_serving_ends_within_its_timeout_and_a_rerun_resumes(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes, tmp_path: Path
) -> None:

    repo, model = model_repo("efficientnet_lite0")
    asyncio.run(register_only(nats_server.url, model))
    folder = cat_folder(tmp_path / "frames", cat_jpeg, 10)
    out = tmp_path / "results.jsonl"
    argv = [str(folder), "--model", model, "--out", str(out), "--nats-url", nats_server.url]
    stalled = run_cli("video", *argv, "--timeout-s", "2", "--in-flight", "4", timeout=120)
    assert stalled.returncode == 3, stalled.stderr[-2000:]
    (line,) = stalled.stderr.strip().splitlines()
    assert "no reply for 2 s while waiting for the replies to frames 0-3" in line
    assert f"is a worker serving {model}?" in line
    assert "Re-run the same command to resume" in line
    assert not out.exists()

    resumed = video_with_worker(nats_server, repo, model, *argv)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == list(range(10))


@pytest.mark.parametrize("per_message", [1, 4])
def test_one_bad_file_is_one_error_line_naming_it_and_the_job_goes_on(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes, tmp_path: Path, per_message: int
) -> None:

    repo, model = model_repo("efficientnet_lite0")
    folder = cat_folder(tmp_path / "frames", cat_jpeg, 5)
    not_an_image = folder / "frame002.jpg"
    not_an_image.write_text("hello, I am a text file")
    truncated = folder / "frame003.jpg"
    truncated.write_bytes(cat_jpeg[: len(cat_jpeg) // 3])
    (folder / "notes.txt").write_text("taken on a Tuesday")
    out = tmp_path / "results.jsonl"

    result = video_with_worker(
        nats_server,
        repo,
        model,
        str(folder),
        *("--model", model, "--out", str(out), "--nats-url", nats_server.url),
        *("--frames-per-message", str(per_message)),
    )
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if ": error " in line]
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith(f"jetinfer video: frame 2 ({not_an_image}): error invalid_input: ")
    assert "not a JPEG image" in errors[0]
    assert errors[1].startswith(f"jetinfer video: frame 3 ({truncated}): error invalid_input: ")
    assert "notes.txt" in result.stderr  # skipped, and said so
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(5))
    assert [line["file"] for line in lines] == [str(folder / f"frame{i:03d}.jpg") for i in range(5)]
    assert ["error" in line for line in lines] == [False, False, True, True, False]
    assert "5 frames" in result.stdout


async def test_frames_stream_from_the_source(nats_server: NatsUnderTest, model_repo: Any, clip: Path) -> None:
    """The first result comes while the source is still being read (no whole-input read first)."""
    import threading

    repo, model = model_repo("efficientnet_lite0")
    first_result = threading.Event()
    waited_in_vain: list[int] = []

    def source() -> Any:
        for frame in read_frames(clip):
            if frame.index == 4 and not first_result.wait(60):  # a bounded wait: never a hang
                waited_in_vain.append(frame.index)
            yield frame

    async with running_worker(nats_server.url, repo, [model]), Client(nats_server.url) as client:
        results = []
        async for result in video_job(client, model, source(), job=f"stream-{model}", in_flight=2):
            first_result.set()
            results.append(result)
    assert not waited_in_vain, "every frame was read before the first one was answered"
    assert [r.index for r in results] == list(range(FRAMES))


def test_ctrl_c_of_video_says_how_to_resume(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes, tmp_path: Path
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT

    _, model = model_repo("efficientnet_lite0")
    asyncio.run(register_only(nats_server.url, model))
    folder = cat_folder(tmp_path / "frames", cat_jpeg, 4)
    argv = ["video", str(folder), "--model", model, "--out", str(tmp_path / "o.jsonl")]
    video = subprocess.Popen(
        [sys.executable, "-m", "jetinfer.cli", "--log-level", "INFO", *argv, "--nats-url", nats_server.url],
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "JETINFER_TIMEOUT_S": "120"},
    )
    try:
        assert video.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the job has started once it read its earlier answers
            line = video.stderr.readline()
            if "frames answered before" in line or not line:
                break
        video.send_signal(signal.SIGINT)
        _, stderr = video.communicate(timeout=60)
    finally:
        if video.poll() is None:
            video.kill()
            video.wait()
    assert video.returncode == 130
    assert "interrupted" in stderr
    assert "Re-run the same command to resume" in stderr
    assert "Traceback" not in stderr


async def test_an_earlier_run_is_read_whole_when_its_messages_answer_several_frames(
    nats_server: NatsUnderTest, model_repo: Any
) -> None:
    """Resuming counts the messages RESULTS holds, not frames: the first message's 8 frames are not all."""
    _, model = model_repo("identity")
    async with Client(nats_server.url) as client:
        await ensure_streams(client.js, StreamSettings())
        job = _Job(client, model, "resume-several", 64, JobProgress(), per_message=8)
        bodies = [
            encode_outputs(_frame_id(job.job, first, count=n), model, "1", {"y": np.zeros((n, 4))}, {})
            for first, n in ((0, 8), (8, 4))
        ]
        for body in bodies:
            await client.js.publish(job.subject, body, stream=RESULTS_STREAM)
        await job.on_result(SimpleNamespace(data=bodies[0]))
        reading = asyncio.create_task(job.read_earlier_answers(10.0))
        await asyncio.sleep(0.3)
        assert not reading.done(), "it stopped reading with one of the two stored answers unread"
        await job.on_result(SimpleNamespace(data=bodies[1]))
        await asyncio.wait_for(reading, 5)
    assert job.earlier == set(range(12))
