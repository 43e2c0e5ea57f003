"""A small synchronous wrapper for code that is not async: `with SyncClient(url) as c: c.infer(...)`.

It runs the async `Client` on an event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

from jetinfer.protocol import InferResponse
from jetinfer.settings import ConnectionSettings

from .client import Client, Payload

__all__ = ["SyncClient"]

T = TypeVar("T")


class SyncClient:
    """Blocking calls over the async client; safe to use from several threads."""

    def __init__(self, url: str | None = None, *, settings: ConnectionSettings | None = None) -> None:
        self._client = Client(url, settings=settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="jetinfer-sync-client", daemon=True
        )
        self._thread.start()
        self._closed = False
        try:
            self._call(self._client.connect())
        except BaseException:
            self.close()
            raise

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def infer(self, model: str, payload: Payload, *, timeout: float = 30.0, **kwargs: Any) -> InferResponse:
        """Send one request and wait for its reply (see `Client.infer`)."""
        return self._call(self._client.infer(model, payload, timeout=timeout, **kwargs))

    def close(self) -> None:
        """Close the client and stop its loop. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._client.close(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
