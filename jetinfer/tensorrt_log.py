"""One TensorRT logger per process, shared by the builder and the worker's TensorRT backend.

TensorRT warns when runtimes and builders of one process get different loggers. This one forwards to
`logging` (logger `jetinfer.tensorrt`: errors as ERROR, warnings as WARNING, the rest as DEBUG) and
keeps TensorRT's latest error messages, so that a failed step can quote what TensorRT said
(`tensorrt_said()`). `tensorrt` is imported only when the logger is first asked for.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

__all__ = ["tensorrt_logger", "tensorrt_said"]

logger = logging.getLogger("jetinfer.tensorrt")

_errors: collections.deque[str] = collections.deque(maxlen=8)
_instance: Any = None
_lock = threading.Lock()


def tensorrt_logger() -> trt.ILogger:
    """The process's TensorRT logger (made on first use)."""
    global _instance
    import tensorrt as trt  # type: ignore[import-untyped, unused-ignore]

    with _lock:
        if _instance is None:
            severity = trt.ILogger.Severity

            class _Logger(trt.ILogger):  # type: ignore[misc, unused-ignore]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, level: trt.ILogger.Severity, msg: str) -> None:
                    if level in (severity.INTERNAL_ERROR, severity.ERROR):
                        _errors.append(msg)
                        logger.error("tensorrt: %s", msg)
                    elif level == severity.WARNING:
                        logger.warning("tensorrt: %s", msg)
                    else:
                        logger.debug("tensorrt: %s", msg)

            _instance = _Logger()
        result: trt.ILogger = _instance
        return result


def tensorrt_said() -> str:
    """TensorRT's errors since the last call, as ` (TensorRT said: ...)`, or "" if it said none."""
    with _lock:
        text = "; ".join(_errors)
        _errors.clear()
    return f" (TensorRT said: {text})" if text else ""
