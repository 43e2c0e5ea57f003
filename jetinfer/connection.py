"""Connecting to NATS with the credentials and TLS from `ConnectionSettings`."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient

from jetinfer.settings import ConnectionSettings

__all__ = ["connect", "tls_context"]

logger = logging.getLogger(__name__)


def tls_context(settings: ConnectionSettings) -> ssl.SSLContext | None:
    """An SSL context for the settings' CA and client certificate, or None when TLS is not configured."""
    if settings.nats_tls_ca_file is None and settings.nats_tls_cert_file is None:
        return None
    context = ssl.create_default_context(
        cafile=str(settings.nats_tls_ca_file) if settings.nats_tls_ca_file else None
    )
    if settings.nats_tls_cert_file and settings.nats_tls_key_file:
        context.load_cert_chain(str(settings.nats_tls_cert_file), str(settings.nats_tls_key_file))
    return context


async def connect(
    settings: ConnectionSettings,
    *,
    name: str | None = None,
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
    disconnected_cb: Callable[[], Awaitable[None]] | None = None,
) -> NatsClient:
    """Connect to NATS; reconnects forever afterwards. Raises ConnectionError naming the fix."""

    async def on_error(exc: Exception) -> None:
        logger.warning("nats: %s: %s", type(exc).__name__, exc)

    async def on_disconnect() -> None:
        logger.warning("nats: disconnected")
        if disconnected_cb is not None:
            await disconnected_cb()

    async def on_reconnect() -> None:
        logger.info("nats: reconnected")
        if reconnected_cb is not None:
            await reconnected_cb()

    options: dict[str, object] = {
        "servers": settings.servers,
        "name": name or settings.nats_name,
        "connect_timeout": settings.nats_connect_timeout_s,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "pending_size": 64 * 1024 * 1024,
    }
    if settings.nats_user is not None:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    if settings.nats_token is not None:
        options["token"] = settings.nats_token
    if settings.nats_nkey_seed_file is not None:
        options["nkeys_seed"] = str(settings.nats_nkey_seed_file)
    if settings.nats_creds_file is not None:
        options["user_credentials"] = str(settings.nats_creds_file)
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    try:
        return await nats.connect(**options)  # type: ignore[arg-type]
    except Exception as exc:
        raise ConnectionError(
            f"cannot connect to NATS at {settings.nats_url}: "
            f"{type(exc).__name__}: {exc or 'no answer'}; "
            "check --nats-url (JETINFER_NATS_URL) and the credential settings"
        ) from exc
