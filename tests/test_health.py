"""/healthz, /readyz and /metrics on one port (issue 6): readiness follows the model and the NATS
connection of a real worker; the server itself answers unknown paths and a failing readiness check.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter

from jetinfer.embedded import EmbeddedNatsServer, free_port
from jetinfer.producer.client import Client
from jetinfer.streams import reload_subject
from jetinfer.worker.health import HealthServer
from tests.conftest import running_worker
from tests.test_metrics import http_get


async def wait_for(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0, every_s: float = 0.1
) -> None:
    """Poll `check` until it is true; fail naming `what` if it never is."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(every_s)


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of /readyz."""
    status, content_type, body = await http_get(f"http://127.0.0.1:{port}/readyz")
    assert content_type == "application/json"
    return status, json.loads(body)


async def test_readyz_follows_the_model_and_the_nats_connection(
    own_nats: EmbeddedNatsServer, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    held = tmp_path / "held-version"
    (repo / model / "1").rename(held)  # config.json only: nothing to load yet
    port = free_port()
    nc = await nats.connect(own_nats.url)
    try:
        async with running_worker(own_nats.url, repo, [model], metrics_port=port, metrics_host="127.0.0.1"):
            base = f"http://127.0.0.1:{port}"
            # Before the model loads: alive, connected, not ready.
            assert await http_get(f"{base}/healthz") == (200, "text/plain", b"ok\n")
            status, body = await readyz(port)
            assert status == 503
            assert body["ready"] is False
            assert body["connected"] is True
            assert list(body["models"]) == [model]
            assert body["models"][model]["loaded"] is False
            status, _, text = await http_get(f"{base}/no-such-page")
            assert status == 404
            assert b"/metrics" in text
            status, content_type, metrics_text = await http_get(f"{base}/metrics?name[]=x")
            assert status == 200
            assert content_type.startswith("text/plain; version=0.0.4")  # the classic text format
            assert b"jetinfer_consumer_lag" in metrics_text

            # The version arrives and the sidecar signals: ready, and /readyz names the version.
            held.rename(repo / model / "1")
            answer = json.loads((await nc.request(reload_subject(model), b"", timeout=30)).data)
            assert answer["status"] == "loaded", answer
            status, body = await readyz(port)
            assert status == 200
            assert (body["ready"], body["connected"]) == (True, True)
            assert (
                body["models"][model] | {"loaded": True, "version": 1, "backend": "onnxruntime"}
                == body["models"][model]
            )

            # NATS goes away: not ready (and says why), yet alive, since the loop still runs.
            await nc.close()
            await asyncio.to_thread(own_nats.kill)

            async def disconnected() -> bool:
                status, body = await readyz(port)
                return status == 503 and body["connected"] is False

            await wait_for(disconnected, "/readyz answers 503 while NATS is down")
            assert (await http_get(f"{base}/healthz"))[0] == 200
            _, body = await readyz(port)
            assert body["models"][model]["loaded"] is True

            # NATS is back on the same port and store: ready again, and serving.
            await asyncio.to_thread(own_nats.restart)

            async def ready() -> bool:
                return (await readyz(port))[0] == 200

            await wait_for(ready, "/readyz answers 200 after NATS is back")
            async with Client(own_nats.url) as client:
                reply = await client.infer(model, np.arange(8, dtype=np.float32)[None], timeout=30)
            assert reply.outputs[0].to_numpy().tolist() == [list(range(8))]
    finally:
        await nc.close()


async def test_health_server_answers_every_path_and_survives_a_failing_check() -> None:
    registry = CollectorRegistry()
    Counter("jetinfer_probe_checks", "a metric of this test's own", registry=registry).inc(3)
    state: dict[str, Any] = {"ready": False}

    def readiness() -> tuple[bool, dict[str, Any]]:
        if state.get("broken"):
            raise RuntimeError("models table is being rebuilt")
        return state["ready"], {"models": {"m": {"loaded": state["ready"]}}}

    server = HealthServer(registry, readiness, host="127.0.0.1", port=0)
    async with server:
        assert server.port != 0
        base = f"http://127.0.0.1:{server.port}"
        assert (await http_get(f"{base}/healthz"))[0] == 200
        status, _, body = await http_get(f"{base}/readyz")
        assert (status, json.loads(body)) == (503, {"ready": False, "models": {"m": {"loaded": False}}})
        state["ready"] = True
        status, _, body = await http_get(f"{base}/readyz")
        assert (status, json.loads(body)) == (200, {"ready": True, "models": {"m": {"loaded": True}}})
        status, _, body = await http_get(f"{base}/metrics")
        assert status == 200
        assert b"jetinfer_probe_checks_total 3.0" in body
        # Prometheus asks for OpenMetrics, and gets it.
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        status, content_type, body = await http_get(f"{base}/metrics", {"Accept": accept})
        assert status == 200
        assert content_type.startswith("application/openmetrics-text")
        assert b"jetinfer_probe_checks_total 3.0" in body
        assert body.endswith(b"# EOF\n")
        assert (await http_get(f"{base}/"))[0] == 404
        assert (await http_get(f"{base}/metricsz"))[0] == 404
        # A readiness check that raises answers 503 with the reason, and the server keeps serving.
        state["broken"] = True
        status, _, body = await http_get(f"{base}/readyz")
        assert status == 503
        assert json.loads(body) == {"ready": False, "error": "RuntimeError: models table is being rebuilt"}
        assert (await http_get(f"{base}/healthz"))[0] == 200
        # A client that connects and sends nothing does not block the others.
        _, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert (await http_get(f"{base}/healthz"))[0] == 200
        idle_writer.close()
        await idle_writer.wait_closed()
    await server.close()  # closing twice is safe
    with pytest.raises(urllib.error.URLError):  # closed: nothing listens any more
        await http_get(f"{base}/healthz")
