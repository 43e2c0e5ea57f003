"""Limits of the NATS server the worker met, checked against its settings at start.

nats-server refuses any message over its `max_payload` (sent in its INFO; the server's own default is
1 MB) before JetStream sees it, whatever the streams' `max_msg_size` allows. A worker configured for
8 MiB requests on a server that takes 1 MB says so once at start, naming both settings and the fix.
"""

from __future__ import annotations

import logging

from jetinfer.settings import StreamSettings, env_name, flag_name

__all__ = ["max_payload_problem", "warn_about_server_limits"]

logger = logging.getLogger(__name__)


def max_payload_problem(max_payload: int, settings: StreamSettings) -> str | None:
    """What is wrong when the server's `max_payload` is below the streams' `max_msg_size_bytes`, or None."""
    wanted = settings.max_msg_size_bytes
    if max_payload >= wanted:
        return None
    flag, env = flag_name("max_msg_size_bytes"), env_name("max_msg_size_bytes")
    return (
        f"the NATS server's max_payload is {max_payload} bytes, below the {wanted} bytes the INFER stream "
        f"accepts ({flag} / {env}): requests over {max_payload} bytes are refused before they reach the "
        "stream. Raise max_payload in the server's configuration (`max_payload: 8MB`, as deploy/nats "
        f"does), or lower {flag} to {max_payload}"
    )


def warn_about_server_limits(max_payload: int, settings: StreamSettings) -> None:
    """Log one WARNING if the server cannot carry the messages the streams are configured for."""
    problem = max_payload_problem(max_payload, settings)
    if problem is not None:
        logger.warning("%s", problem)
