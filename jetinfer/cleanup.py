"""Cleanup steps whose failure is logged, never swallowed and never raised over the reason for closing.

    await logged(logger, "unsubscribing from reload signals", sub.unsubscribe())

A failing step logs one WARNING naming what failed and why; the caller carries on closing the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

__all__ = ["logged"]


async def logged(log: logging.Logger, what: str, step: Awaitable[Any]) -> bool:
    """Await `step`; on an exception log `what` failed (WARNING) and return False, else True."""
    try:
        await step
    except Exception as exc:
        log.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
        return False
    return True
