"""NATS security (issue 3): every credential kind through settings, per-role permissions, TLS.

Each test starts a real nats-server configured with that kind of authentication and connects
through `jetinfer.connection.connect` (what the worker, the clients and the sidecar use).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from pathlib import Path
from typing import Any

import nats
import nkeys
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jetinfer.connection import connect
from jetinfer.embedded import EmbeddedNatsServer
from jetinfer.errors import RequestTimeoutError
from jetinfer.producer.client import Client
from jetinfer.settings import ConnectionSettings, StreamSettings
from jetinfer.streams import ensure_consumer, ensure_streams, register_model
from tests.conftest import running_worker

# -- helpers -----------------------------------------------------------------------------------------


def new_seed(prefix: int) -> bytes:
    """A fresh nkey seed (user, account or operator, by `prefix`)."""
    return nkeys.encode_seed(os.urandom(32), prefix)


def public_key(seed: bytes) -> str:
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(issuer_seed: bytes, subject: str, name: str, nats_claims: dict[str, Any]) -> str:
    """A NATS JWT (ed25519-nkey) signed by `issuer_seed`, the way `nsc` writes them."""
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": public_key(issuer_seed),
        "name": name,
        "sub": subject,
        "nats": {**nats_claims, "version": 2},
    }
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    )
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = nkeys.from_seed(bytearray(issuer_seed)).sign(f"{header}.{payload}".encode())
    return f"{header}.{payload}.{_b64(signature)}"


def certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None, *, ca: bool
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def write_pem(
    folder: Path, name: str, cert: x509.Certificate, key: Any | None = None
) -> tuple[Path, Path | None]:
    cert_path = folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = folder / f"{name}-key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def pki(folder: Path, ca_name: str = "jetinfer-test-ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, signed by that CA."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate(ca_name, ca_key, None, ca=True)
    files: dict[str, Path] = {"ca": write_pem(folder, "ca", ca_cert)[0]}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert_path, key_path = write_pem(
            folder, role, certificate(role, key, (ca_cert, ca_key), ca=False), key
        )
        assert key_path is not None
        files[role], files[f"{role}_key"] = cert_path, key_path
    return files


async def round_trip(settings: ConnectionSettings) -> bytes:
    """Connect through jetinfer's connect(), publish to ourselves, return what came back."""
    nc = await connect(settings)
    try:
        sub = await nc.subscribe("auth.check")
        await nc.publish("auth.check", b"hello")
        msg = await sub.next_msg(timeout=5)
        return bytes(msg.data)
    finally:
        await nc.close()


async def refused(settings: ConnectionSettings) -> str:
    """The ConnectionError message of a connection that must fail (and fail promptly, not hang)."""
    with pytest.raises(ConnectionError) as info:
        await asyncio.wait_for(connect(settings), 15)
    return str(info.value)


# -- users and permissions --------------------------------------------------------------------------

PERMISSIONS = """{{
  publish = {{ allow = ["infer.>", "$JS.API.INFO", "$JS.API.STREAM.INFO.INFER"] }}
  subscribe = {{ allow = ["_INBOX.{name}.>"] }}
}}"""

USERS = f"""
authorization {{
  users = [
    {{ user = worker, password = worker-secret }}
    {{ user = producer_a, password = a-secret, permissions = {PERMISSIONS.format(name="producer_a")} }}
    {{ user = producer_b, password = b-secret, permissions = {PERMISSIONS.format(name="producer_b")} }}
  ]
}}
"""


def producer(url: str, name: str, password: str) -> ConnectionSettings:
    return ConnectionSettings(
        nats_url=url, nats_user=name, nats_password=password, nats_inbox_prefix=f"_INBOX.{name}"
    )


async def test_producer_credentials_cannot_pull_or_read_another_inbox_and_a_bad_password_is_clear(
    model_repo: Any,
) -> None:
    repo, model = model_repo("identity")
    with EmbeddedNatsServer(extra_config=USERS) as server:
        worker_auth = {"nats_user": "worker", "nats_password": "worker-secret"}
        async with (
            running_worker(server.url, repo, [model], **worker_auth),
            Client(settings=producer(server.url, "producer_a", "a-secret")) as client_a,
            Client(settings=producer(server.url, "producer_b", "b-secret")) as client_b,
        ):
            # Both producers are served, each through its own inbox prefix.
            data = np.arange(4, dtype=np.float32)[None]
            for client in (client_a, client_b):
                np.testing.assert_array_equal((await client.infer(model, data, timeout=30)).output(), data)

            # producer_a, connected on its own, tries to pull from the worker consumer and to read B's inbox.
            violations: list[str] = []

            async def on_error(exc: Exception) -> None:
                violations.append(str(exc))

            spy = await nats.connect(
                server.url,
                user="producer_a",
                password="a-secret",
                inbox_prefix="_INBOX.producer_a",
                error_cb=on_error,
                allow_reconnect=False,
            )
            try:
                stolen: list[Any] = []

                async def steal(msg: Any) -> None:
                    stolen.append(msg)

                await spy.subscribe("_INBOX.producer_b.>", cb=steal)
                inbox = spy.new_inbox()
                pulled = await spy.subscribe(inbox)
                await spy.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.INFER.worker-{model}",
                    json.dumps({"batch": 1, "expires": 1_000_000_000}).encode(),
                    reply=inbox,
                )
                await spy.flush()
                await client_a.js.publish(f"infer.{model}", b"queued while nobody can pull it")
                # B keeps being served while A listens on B's inbox.
                np.testing.assert_array_equal((await client_b.infer(model, data, timeout=30)).output(), data)
                with pytest.raises(nats.errors.TimeoutError):
                    await pulled.next_msg(timeout=1.0)
            finally:
                await spy.close()
        violations = [v.lower() for v in violations]  # nats-py lowercases the server's -ERR
        assert stolen == [], "producer_a read producer_b's replies"
        assert any("for subscription" in v and "_inbox.producer_b" in v for v in violations), violations
        assert any("for publish" in v and "msg.next" in v for v in violations), violations

        message = await refused(producer(server.url, "producer_a", "wrong"))
        assert "refused the credentials" in message
        assert "--nats-password" in message
        message = await refused(ConnectionSettings(nats_url=server.url))
        assert "requires authentication" in message


async def test_a_producer_refused_the_consumer_info_is_told_once_and_never_asked_again(
    model_repo: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Without $JS.API.CONSUMER.INFO.INFER.* a client cannot look for replies lost in a dead server: it
    says so in one warning naming the permission, and asks no more (no violation after violation)."""
    _, model = model_repo("identity")
    with EmbeddedNatsServer(extra_config=USERS) as server:
        setup = await nats.connect(server.url, user="worker", password="worker-secret")
        try:
            await ensure_streams(setup.jetstream(), StreamSettings())
            await register_model(setup.jetstream(), model, StreamSettings())
            await ensure_consumer(setup.jetstream(), model, StreamSettings())
        finally:
            await setup.close()
        settings = producer(server.url, "producer_a", "a-secret")
        async with Client(settings=settings, resend_after_s=0.1, lost_reply_check_s=0.05) as client:
            with pytest.raises(RequestTimeoutError):  # no worker runs: the request waits
                await client.infer(model, np.zeros((1, 4), np.float32), timeout=3)
        log = server.log_file.read_text(errors="replace")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert f"consumer of model {model}" in warnings[0]
    assert "$JS.API.CONSUMER.INFO.INFER.*" in warnings[0]
    assert log.count(f"$JS.API.CONSUMER.INFO.INFER.worker-{model}") == 1, log[-2000:]


# -- other credential kinds ----------------------------------------------------------------------


async def test_token_authentication() -> None:
    with EmbeddedNatsServer(extra_config="authorization { token: s3cret-token }") as server:
        assert (
            await round_trip(ConnectionSettings(nats_url=server.url, nats_token="s3cret-token")) == b"hello"
        )
        message = await refused(ConnectionSettings(nats_url=server.url, nats_token="guess"))
        assert "--nats-token" in message


async def test_nkey_seed_file_authentication(tmp_path: Path) -> None:
    seed = new_seed(nkeys.PREFIX_BYTE_USER)
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    config = f"authorization {{ users = [ {{ nkey: {public_key(seed)} }} ] }}"
    with EmbeddedNatsServer(extra_config=config) as server:
        assert (
            await round_trip(ConnectionSettings(nats_url=server.url, nats_nkey_seed_file=seed_file))
            == b"hello"
        )
        other = tmp_path / "other.nk"
        other.write_bytes(new_seed(nkeys.PREFIX_BYTE_USER))
        message = await refused(ConnectionSettings(nats_url=server.url, nats_nkey_seed_file=other))
        assert "--nats-nkey-seed-file" in message


async def test_credentials_file_authentication(tmp_path: Path) -> None:
    operator = new_seed(nkeys.PREFIX_BYTE_OPERATOR)
    account = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_seed(nkeys.PREFIX_BYTE_USER)
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "conn": -1, "leaf": -1}
    operator_jwt = jwt(operator, public_key(operator), "jetinfer-op", {"type": "operator"})
    account_jwt = jwt(
        operator,
        public_key(account),
        "jetinfer",
        {"type": "account", "limits": {**limits, "wildcards": True}},
    )
    user_jwt = jwt(
        account,
        public_key(user),
        "worker",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    creds = tmp_path / "worker.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    # JetStream (which the embedded server runs) needs a system account in operator mode.
    system = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
    system_jwt = jwt(operator, public_key(system), "SYS", {"type": "account", "limits": limits})
    config = (
        f"operator: {operator_jwt}\n"
        f"system_account: {public_key(system)}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {public_key(account)}: {account_jwt}, {public_key(system)}: {system_jwt} }}\n"
    )
    with EmbeddedNatsServer(extra_config=config) as server:
        assert await round_trip(ConnectionSettings(nats_url=server.url, nats_creds_file=creds)) == b"hello"
        # A user signed by another account's key is refused.
        stranger = new_seed(nkeys.PREFIX_BYTE_ACCOUNT)
        forged = tmp_path / "forged.creds"
        forged.write_text(
            creds.read_text().replace(user_jwt, jwt(stranger, public_key(user), "x", {"type": "user"}))
        )
        message = await refused(ConnectionSettings(nats_url=server.url, nats_creds_file=forged))
        assert "--nats-creds-file" in message


# -- TLS --------------------------------------------------------------------------------------------


async def test_mutual_tls_with_a_generated_ca(tmp_path: Path, model_repo: Any) -> None:
    files = pki(tmp_path / "pki")
    config = (
        f'tls {{ cert_file: "{files["server"]}", key_file: "{files["server_key"]}", '
        f'ca_file: "{files["ca"]}", verify: true, timeout: 2 }}'
    )
    repo, model = model_repo("identity")
    with EmbeddedNatsServer(extra_config=config) as server:
        tls = {
            "nats_tls_ca_file": files["ca"],
            "nats_tls_cert_file": files["client"],
            "nats_tls_key_file": files["client_key"],
        }
        settings = ConnectionSettings(nats_url=server.url, **tls)
        assert await round_trip(settings) == b"hello"
        # The whole path over TLS: worker and client.
        async with running_worker(server.url, repo, [model], **tls), Client(settings=settings) as client:
            data = np.ones((1, 4), np.float32)
            np.testing.assert_array_equal((await client.infer(model, data, timeout=30)).output(), data)

        # A server certificate from another CA is not trusted, and the message says which setting to fix.
        other = pki(tmp_path / "other", ca_name="someone-else")
        untrusted = ConnectionSettings(
            nats_url=server.url,
            nats_tls_ca_file=other["ca"],
            nats_tls_cert_file=other["client"],
            nats_tls_key_file=other["client_key"],
        )
        message = await refused(untrusted)
        assert "TLS" in message
        assert "--nats-tls-ca-file" in message
        # Without a client certificate the server (verify: true) hangs up.
        message = await refused(ConnectionSettings(nats_url=server.url, nats_tls_ca_file=files["ca"]))
        assert "cannot connect to NATS" in message
