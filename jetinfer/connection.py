"""Connecting to NATS with the credentials, TLS and inbox prefix from `ConnectionSettings`.

The first connection is bounded: it keeps trying while servers do not answer, for at most
`nats_connect_timeout_s`, and gives up at once on a refusal that retrying cannot fix (wrong
credentials, an untrusted certificate). Either way the caller gets one `ConnectionError` whose
message names the setting to fix, never a hang. Once connected, the client reconnects forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient

from jetinfer.cleanup import logged
from jetinfer.settings import ConnectionSettings, env_name, flag_name

__all__ = ["connect", "explain_connect_failure", "tls_context"]

logger = logging.getLogger(__name__)

_AUTH_MARKERS = ("authorization violation", "authentication", "authorization")
_TLS_MARKERS = ("certificate", "ssl", "tls")


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


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".lower()


def _is_auth_failure(exc: BaseException) -> bool:
    return any(marker in _describe(exc) for marker in _AUTH_MARKERS)


def _is_tls_failure(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLError) or any(marker in _describe(exc) for marker in _TLS_MARKERS)


def _flags(*names: str) -> str:
    return ", ".join(f"{flag_name(n)} ({env_name(n)})" for n in names)


def explain_connect_failure(settings: ConnectionSettings, cause: BaseException | None) -> str:
    """A one-line explanation of a failed first connection that names the setting to fix."""
    where = f"cannot connect to NATS at {settings.nats_url}"
    detail = f"{type(cause).__name__}: {cause}" if cause is not None and str(cause) else "no answer"
    if cause is not None and _is_auth_failure(cause):
        in_use = [
            names
            for names, value in (
                (("nats_user", "nats_password"), settings.nats_user),
                (("nats_token",), settings.nats_token),
                (("nats_nkey_seed_file",), settings.nats_nkey_seed_file),
                (("nats_creds_file",), settings.nats_creds_file),
            )
            if value is not None
        ]
        if in_use:
            return f"{where}: the server refused the credentials ({detail}); check {_flags(*in_use[0])}"
        return (
            f"{where}: the server requires authentication ({detail}); set "
            f"{_flags('nats_user', 'nats_password')}, or {_flags('nats_token')}, "
            f"or {_flags('nats_nkey_seed_file')}, or {_flags('nats_creds_file')}"
        )
    if cause is not None and _is_tls_failure(cause):
        return (
            f"{where}: TLS failed ({detail}); check {_flags('nats_tls_ca_file')} (the CA that signed the "
            f"server's certificate) and, for mutual TLS, {_flags('nats_tls_cert_file', 'nats_tls_key_file')}"
        )
    if isinstance(cause, ModuleNotFoundError):
        return f"{where}: {detail}; nkey and credentials-file authentication need `pip install nkeys`"
    return (
        f"{where} within {settings.nats_connect_timeout_s:g} s: {detail}; "
        f"check {_flags('nats_url')}, that nats-server runs, and the credential settings"
    )


async def connect(
    settings: ConnectionSettings,
    *,
    name: str | None = None,
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
    disconnected_cb: Callable[[], Awaitable[None]] | None = None,
    error_cb: Callable[[Exception], Awaitable[bool]] | None = None,
) -> NatsClient:
    """Connect to NATS; reconnects forever afterwards. Raises ConnectionError naming the fix.

    `error_cb` sees the server's asynchronous errors once connected (a refused publish, say); where it
    returns True it has dealt with the error, which is then not logged here.
    """
    connected = False
    failures: list[BaseException] = []
    refused = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if connected and error_cb is not None and await error_cb(exc):
            return
        if not connected:
            failures.append(exc)
            logger.debug("nats: connecting: %s: %s", type(exc).__name__, exc)
            if _is_auth_failure(exc) or _is_tls_failure(exc):
                refused.set()
            return
        logger.warning("nats: %s: %s", type(exc).__name__, exc)

    async def on_disconnect() -> None:
        if not connected:
            return
        if nc.is_closed or nc.is_draining:
            logger.debug("nats: connection closed")
        else:
            logger.warning("nats: disconnected; reconnecting")
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
        "inbox_prefix": settings.nats_inbox_prefix,
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
    try:
        context = tls_context(settings)
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionError(explain_connect_failure(settings, exc)) from exc
    if context is not None:
        options["tls"] = context

    nc = NatsClient()
    attempt = asyncio.create_task(nc.connect(**options), name="nats-connect")  # type: ignore[arg-type]
    refusal = asyncio.create_task(refused.wait(), name="nats-connect-refused")
    try:
        await asyncio.wait(
            {attempt, refusal}, timeout=settings.nats_connect_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        refusal.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await refusal
    if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
        connected = True
        return nc
    cause: BaseException | None = None
    if attempt.done() and not attempt.cancelled():
        cause = attempt.exception()
    else:
        attempt.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await attempt
    refusals = [f for f in failures if _is_auth_failure(f) or _is_tls_failure(f)]
    cause = (
        refusals[-1] if refusals else (cause if cause is not None else (failures[-1] if failures else None))
    )
    await logged(logger, "closing the failed connection", nc.close())
    raise ConnectionError(explain_connect_failure(settings, cause)) from cause
