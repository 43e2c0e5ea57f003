"""The event loop a worker process runs on: uvloop's where it is installed and chosen, else asyncio's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from jetinfer.errors import SettingsError

__all__ = ["event_loop_factory"]


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop for `uvloop` (and for `auto` where uvloop is installed), else None (asyncio's)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SettingsError("event_loop", "uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
