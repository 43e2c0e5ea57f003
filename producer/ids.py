"""Request and job ids another tenant cannot predict.

JetStream drops a publish whose `Nats-Msg-Id` it has seen within the duplicate window, and that
window is per stream: every tenant's requests share INFER's (and every durable reply shares
RESULTS's). A tenant who knew another's next request id could publish it first, and the real
request would be dropped as a duplicate. So ids are never derivable from anything another tenant can
see (subjects, job names and message counts are visible to every producer through stream info):

- a request id is 128 random bits (`new_request_id`);
- a video job's frames are `<job>-<tag>-<index>` when the client has a tenant, where `tag` is a keyed
  hash of the job name (`keyed_tag`) under a key only this client's credential gives (`id_key`):
  stable across runs of the same job (so a re-run still resumes and is deduplicated), unknown to
  anyone without the credential. Whoever has the credential can publish as the tenant anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from jetinfer.settings import ConnectionSettings

__all__ = ["TAG_HEX_DIGITS", "id_key", "keyed_tag", "new_request_id"]

#: Hex digits of a keyed tag: 96 bits.
TAG_HEX_DIGITS = 24


def new_request_id() -> str:
    """A fresh request id: 128 random bits as 32 hex digits."""
    return secrets.token_hex(16)


def id_key(settings: ConnectionSettings) -> bytes:
    """A key derived from the secrets this client connects with (password, token, nkey seed, creds
    file, TLS client key); empty without any (then nobody is authenticated and nothing is isolated)."""
    digest = hashlib.sha256(b"jetinfer id key v1\0")
    secret_values = [settings.nats_password, settings.nats_token]
    secret_files = [settings.nats_nkey_seed_file, settings.nats_creds_file, settings.nats_tls_key_file]
    found = False
    for value in secret_values:
        if value:
            digest.update(value.encode() + b"\0")
            found = True
    for path in secret_files:
        if path is not None:
            digest.update(Path(path).read_bytes() + b"\0")
            found = True
    return digest.digest() if found else b""


def keyed_tag(key: bytes, text: str) -> str:
    """HMAC-SHA256 of `text` under `key`, as `TAG_HEX_DIGITS` hex digits."""
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()[:TAG_HEX_DIGITS]
