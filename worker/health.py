"""One small HTTP server on the event loop: `/metrics`, `/healthz` (loop alive), `/readyz` (ready to serve).

Because it runs on the worker's own event loop, an answer from `/healthz` proves the loop is not
blocked; `/readyz` asks the worker (connected to NATS, every model loaded) and lists the versions.
`/metrics` answers in the format the scraper's Accept header asks for (OpenMetrics for Prometheus,
the classic text format otherwise), as prometheus-client's own server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from jetinfer.cleanup import logged
from jetinfer.errors import SettingsError

__all__ = ["HealthServer"]

logger = logging.getLogger(__name__)

_MAX_HEADER_LINES = 100


class HealthServer:
    """Serves /metrics, /healthz and /readyz on one port."""

    def __init__(
        self,
        registry: CollectorRegistry,
        readiness: Callable[[], tuple[bool, dict[str, Any]]],
        *,
        host: str = "0.0.0.0",
        port: int = 8080,
    ) -> None:
        self._registry = registry
        self._readiness = readiness
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen (port 0 picks a free port, readable from `.port` afterwards).

        A port already taken (another worker on this host) is a `SettingsError` naming
        `--metrics-port` and the fix, not an OSError's traceback.
        """
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise SettingsError(
                    "metrics_port", f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
                ) from exc
            raise SettingsError(
                "metrics_port",
                f"port {self.port} on {self.host} is in use (another worker on this host?): give each worker "
                "its own port, or 0 to serve no /metrics, /healthz and /readyz",
            ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("health and metrics on http://%s:%d (/metrics /healthz /readyz)", self.host, self.port)

    async def close(self) -> None:
        """Stop listening. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await logged(logger, "closing the metrics server", server.wait_closed())

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _ready(self) -> tuple[bool, dict[str, Any]]:
        """The readiness answer; a failing check answers not ready (and why), never a dropped probe."""
        try:
            return self._readiness()
        except Exception as exc:
            logger.exception("readiness check failed")
            return False, {"error": f"{type(exc).__name__}: {exc}"}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            headers: dict[str, str] = {}
            for _ in range(_MAX_HEADER_LINES):
                line = await asyncio.wait_for(reader.readline(), 5)
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            if path == "/metrics":
                # Prometheus asks for OpenMetrics in its Accept header; anything else gets the classic text.
                encoder, content_type = choose_encoder(headers.get("accept", ""))
                status, body = 200, encoder(self._registry)
            elif path == "/healthz":
                status, content_type, body = 200, "text/plain", b"ok\n"
            elif path == "/readyz":
                ready, detail = self._ready()
                status = 200 if ready else 503
                content_type, body = "application/json", json.dumps({"ready": ready, **detail}).encode()
            else:
                status, content_type, body = (
                    404,
                    "text/plain",
                    b"not found: try /metrics, /healthz, /readyz\n",
                )
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):  # slow, gone, or a line over 64 KiB
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):  # the client went away first
                await writer.wait_closed()
