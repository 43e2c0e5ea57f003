"""`jetinfer video` and `video_job`: every frame answered once, in order; a re-run resumes (issue 7)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jetinfer.producer.client import Client
from jetinfer.producer.video import read_frames, video_job
from tests.conftest import NatsUnderTest, run_cli, running_worker

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
        served = answered(worker, model)
    assert [r.index for r in first] == list(range(FRAMES // 2))
    assert [r.index for r in second] == list(range(FRAMES))
    assert all(r.reply is not None and r.error is None for r in second)
    assert sum(r.resumed for r in second) >= FRAMES // 2
    assert served == FRAMES, f"the worker ran {served} frames for {FRAMES}: frames were sent twice"


def test_cli_writes_one_line_per_frame_in_order(
    nats_server: NatsUnderTest, model_repo: Any, cat_jpeg: bytes, tmp_path: Path
) -> None:
    import asyncio

    from PIL import Image

    repo, model = model_repo("efficientnet_lite0")
    folder = tmp_path / "frames"
    folder.mkdir()
    cat = Image.open(io.BytesIO(cat_jpeg))
    for index in range(12):
        cat.rotate(index * 3).save(folder / f"frame{index:03d}.jpg")
    out = tmp_path / "results.jsonl"

    async def run() -> Any:
        async with running_worker(nats_server.url, repo, [model]):
            return await asyncio.to_thread(
                run_cli,
                "video",
                str(folder),
                "--model",
                model,
                "--out",
                str(out),
                "--nats-url",
                nats_server.url,
                "--no-progress",
            )

    result = asyncio.run(run())
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["index"] for line in lines] == list(range(12))
    assert all("cat" in " ".join(p["label"] for p in line["top_k"]).lower() for line in lines[:3])
    assert "12 frames" in result.stdout
    rerun = asyncio.run(run())
    assert "12 answered in an earlier run, 0 sent now" in rerun.stdout
