"""Delivery under faults, the long cases (issue 3; `make test-slow`): every request id counted.

Each test prints one `[delivery]` line (run with `-s`): sent, answered, errors, lost, duplicates
(replies received twice and dropped by the client) and the time to recover (the longest time
without an answer from the fault on). docs/operations.md "Delivery under faults" holds the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from jetinfer.embedded import EmbeddedNatsServer, free_port
from jetinfer.producer.client import Client
from jetinfer.settings import ConnectionSettings, StreamSettings
from jetinfer.streams import INFER_STREAM, consumer_name, ensure_consumer, ensure_streams, register_model
from tests import faults
from tests.conftest import running_worker

pytestmark = pytest.mark.slow


class Load:
    """Requests for the identity model, each answer stamped with the time it came back."""

    def __init__(self, client: Client, model: str, count: int, *, timeout_s: float = 120.0) -> None:
        self.client = client
        self.model = model
        self.markers = list(range(1, count + 1))
        self.timeout_s = timeout_s
        self.tasks: list[asyncio.Task[Any]] = []
        self.answered_at: list[float] = []

    async def _one(self, marker: int) -> Any:
        reply = await self.client.infer(self.model, faults.frames(marker), timeout=self.timeout_s)
        self.answered_at.append(time.monotonic())
        return reply

    async def send(self, *, per_wave: int = 100, pause_s: float = 0.02) -> None:
        """Start every request, `per_wave` at a time with a pause between waves (a steady load)."""
        for index, marker in enumerate(self.markers):
            self.tasks.append(asyncio.create_task(self._one(marker)))
            if (index + 1) % per_wave == 0:
                await asyncio.sleep(pause_s)

    async def wait_answered(self, count: int) -> None:
        """Wait until `count` requests are answered."""
        while len(self.answered_at) < count:  # noqa: ASYNC110 - counts kept by the request tasks
            await asyncio.sleep(0.01)

    async def results(self) -> list[Any]:
        """Every request's reply or exception, in marker order; then waits until the consumer is idle,
        so that duplicate replies (redeliveries, requests published again) are in and counted."""
        results = list(await asyncio.gather(*self.tasks, return_exceptions=True))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                info = await self.client.js.consumer_info(INFER_STREAM, consumer_name(self.model))
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
            except Exception:  # a cluster electing a leader: ask again
                pass
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)
        return results

    def recovery_s(self, fault_at: float) -> float | None:
        """The longest time without an answer from the fault on: how long the service was interrupted."""
        times = sorted([fault_at, *(t for t in self.answered_at if t >= fault_at)])
        return max((b - a for a, b in itertools.pairwise(times)), default=None)


def check(tally: faults.Tally, fault: str) -> None:
    print(tally.line(fault))
    assert not tally.lost, f"{fault}: {len(tally.lost)} requests lost, e.g. {tally.lost[:10]}"
    assert not tally.wrong, f"{fault}: wrong answers for {tally.wrong[:10]}"
    assert tally.answered == tally.sent, tally


async def ack_pending(client: Client, model: str) -> int:
    """Requests of `model` delivered to a worker and not yet acknowledged."""
    info = await client.js.consumer_info(INFER_STREAM, consumer_name(model))
    return int(info.num_ack_pending or 0)


async def register(url: str, model: str, settings: StreamSettings) -> None:
    """Create the streams and the consumer, as a worker would, so requests can queue before one runs."""
    nc = await nats.connect(servers=url.split(","))
    try:
        js = nc.jetstream()
        await ensure_streams(js, settings)
        await register_model(js, model, settings)
        await ensure_consumer(js, model, settings)
    finally:
        await nc.close()


# -- 1. kill -9 of a worker ------------------------------------------------------------------------


async def test_kill_9_of_a_worker_with_thousands_outstanding(
    own_nats: EmbeddedNatsServer, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    stream = {"ack_wait_s": 2}
    await register(own_nats.url, model, StreamSettings(**stream))
    settings = {**stream, "max_batch": 32, "fetch_batches": 8}
    victim = faults.WorkerProcess(own_nats.url, repo, model, tmp_path / "victim.log", settings)
    heir = faults.WorkerProcess(own_nats.url, repo, model, tmp_path / "heir.log", settings)
    with faults.worker_processes(victim, heir):
        async with Client(own_nats.url) as client:
            load = Load(client, model, 3000)
            await load.send(per_wave=500, pause_s=0)
            victim.start()
            await load.wait_answered(50)
            victim.kill()
            killed_at = time.monotonic()
            outstanding = len(load.markers) - len(load.answered_at)
            heir.start()
            results = await load.results()
    tally = faults.tally(load.markers, results, client.duplicates_dropped)
    tally.recover_s = load.recovery_s(killed_at)
    check(tally, f"kill -9 of a worker with {outstanding} requests outstanding")
    assert outstanding >= 2000


# -- 2. nats-server restart -----------------------------------------------------------------------


async def test_nats_server_restart_in_the_middle_of_a_load(model_repo: Any, tmp_path: Path) -> None:
    repo, model = model_repo("identity")
    with EmbeddedNatsServer(store_dir=tmp_path / "nats") as server:
        async with (
            running_worker(server.url, repo, [model], heartbeat_s=0.5) as worker,
            Client(server.url) as client,
        ):
            load = Load(client, model, 2000)
            sender = asyncio.create_task(load.send())
            await load.wait_answered(500)
            restarted_at = time.monotonic()
            await asyncio.to_thread(server.restart)
            await sender
            results = await load.results()
            renewals = worker.servers[model].intake.renewals
    tally = faults.tally(load.markers, results, client.duplicates_dropped)
    tally.recover_s = load.recovery_s(restarted_at)
    check(
        tally,
        f"nats-server restart (file storage) mid-load, resent={client.resent} "
        f"(acked without a reply: {client.lost_replies})",
    )
    print(f"[delivery] pull renewals after the restart: {renewals}")


# -- 3. three-node cluster, stream leader killed ----------------------------------------------------


@contextlib.contextmanager
def nats_cluster(root: Path, size: int = 3) -> Iterator[list[EmbeddedNatsServer]]:
    """`size` nats-servers clustered on loopback ports, each with its own store."""
    cluster_ports = [free_port() for _ in range(size)]
    servers = []
    for index in range(size):
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for i, p in enumerate(cluster_ports) if i != index)
        config = (
            f"server_name: n{index + 1}\n"
            f"cluster {{ name: jetinfer, listen: 127.0.0.1:{cluster_ports[index]}, routes: [{routes}] }}\n"
        )
        servers.append(EmbeddedNatsServer(store_dir=root / f"n{index + 1}", extra_config=config))
    try:
        # Each waits for JetStream, which needs a meta leader, which needs a quorum: start them together.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(size) as pool:
            list(pool.map(lambda s: s.start(), servers))
        yield servers
    finally:
        for server in servers:
            server.close()


@contextlib.asynccontextmanager
async def cluster_ready(url: str, model: str, settings: StreamSettings) -> AsyncIterator[None]:
    """Wait until the cluster's JetStream takes requests (stream created with 3 replicas)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await register(url, model, settings)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    yield


async def test_stream_leader_killed_in_a_three_node_cluster(model_repo: Any, tmp_path: Path) -> None:
    repo, model = model_repo("identity")
    with nats_cluster(tmp_path) as servers:
        url = ",".join(s.url for s in servers)
        stream = StreamSettings(stream_replicas=3, ack_wait_s=5)
        async with cluster_ready(url, model, stream):
            pass
        async with (
            running_worker(url, repo, [model], stream_replicas=3, ack_wait_s=5, heartbeat_s=0.5),
            Client(settings=ConnectionSettings(nats_url=url)) as client,
        ):
            load = Load(client, model, 2000)
            sender = asyncio.create_task(load.send())
            await load.wait_answered(400)
            info = await client.js.stream_info(INFER_STREAM)
            assert info.cluster is not None
            leader = next(s for s in servers if f"n{servers.index(s) + 1}" == info.cluster.leader)
            leader.kill()
            killed_at = time.monotonic()
            await sender
            results = await load.results()
            after = await client.js.stream_info(INFER_STREAM)
    tally = faults.tally(load.markers, results, client.duplicates_dropped)
    tally.recover_s = load.recovery_s(killed_at)
    check(
        tally,
        f"stream leader {info.cluster.leader} killed (3 nodes, R3), resent={client.resent} "
        f"(acked without a reply: {client.lost_replies})",
    )
    assert after.cluster is not None
    assert after.cluster.leader != info.cluster.leader


# -- 4. SIGTERM in the middle of a load -------------------------------------------------------------


@pytest.mark.parametrize("fronts", [0, 2], ids=["in-process", "two-fronts"])
async def test_sigterm_mid_load_drains_and_exits_0_within_the_grace_period(
    own_nats: EmbeddedNatsServer, model_repo: Any, tmp_path: Path, fronts: int
) -> None:
    repo, model = model_repo("identity")
    grace_s = 8.0
    stream = {"ack_wait_s": 300}  # a request left unacked would miss the clients' timeout: no silent loss
    await register(own_nats.url, model, StreamSettings(**stream))
    settings = {**stream, "max_batch": 8, "max_wait_ms": 0, "grace_period_s": grace_s}
    slow = {"sleep_s": 0.2}  # batches in flight at the signal
    first = faults.WorkerProcess(
        own_nats.url, repo, model, tmp_path / "first.log", {**settings, "fronts": fronts}, faults=slow
    )
    second = faults.WorkerProcess(own_nats.url, repo, model, tmp_path / "second.log", settings)
    with faults.worker_processes(first, second):
        first.start()
        await first.ready()
        # With fronts, they finish their batches in flight, give back the rest and exit with the worker.
        front_pids = await first.front_pids() if fronts else []
        async with Client(own_nats.url) as client:
            load = Load(client, model, 1000, timeout_s=90)
            await load.send(per_wave=200, pause_s=0)
            await load.wait_answered(40)
            signalled_at = time.monotonic()
            first.terminate()
            code = await first.wait(timeout_s=grace_s + 5)
            exit_s = time.monotonic() - signalled_at
            answered_by_first = len(load.answered_at)
            second.start()
            results = await load.results()
    tally = faults.tally(load.markers, results, client.duplicates_dropped)
    tally.recover_s = load.recovery_s(signalled_at + exit_s)
    check(tally, f"SIGTERM mid-load, fronts={fronts} (exit {code} after {exit_s:.1f} s, grace {grace_s:g} s)")
    assert code == 0, first.log()[-3000:]
    assert exit_s < grace_s, f"exit took {exit_s:.1f} s"
    assert answered_by_first < len(load.markers)
    assert all(faults.exited(pid) for pid in front_pids)
    assert "Traceback" not in first.log()
    assert "ERROR" not in first.log(), first.log()[-3000:]


async def test_batch_longer_than_the_grace_period_is_given_back_and_the_worker_still_exits_in_time(
    own_nats: EmbeddedNatsServer, model_repo: Any, tmp_path: Path
) -> None:
    repo, model = model_repo("identity")
    grace_s = 4.0
    stream = {"ack_wait_s": 300}
    await register(own_nats.url, model, StreamSettings(**stream))
    settings = {**stream, "max_batch": 4, "max_wait_ms": 0, "grace_period_s": grace_s}
    stuck = faults.WorkerProcess(
        own_nats.url, repo, model, tmp_path / "stuck.log", settings, faults={"sleep_s": 30}
    )
    second = faults.WorkerProcess(own_nats.url, repo, model, tmp_path / "second.log", settings)
    with faults.worker_processes(stuck, second):
        stuck.start()
        await stuck.ready()
        async with Client(own_nats.url) as client:
            load = Load(client, model, 40, timeout_s=90)
            await load.send(per_wave=40, pause_s=0)
            while await ack_pending(client, model) < 4:  # noqa: ASYNC110 - the server's count
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # its first batch is running (for 30 s)
            signalled_at = time.monotonic()
            stuck.terminate()
            code = await stuck.wait(timeout_s=grace_s + 10)
            exit_s = time.monotonic() - signalled_at
            second.start()
            results = await load.results()
    tally = faults.tally(load.markers, results, client.duplicates_dropped)
    tally.recover_s = load.recovery_s(signalled_at + exit_s)
    check(tally, f"SIGTERM during a 30 s batch (exit {code} after {exit_s:.1f} s, grace {grace_s:g} s)")
    assert code == 0, stuck.log()[-3000:]
    assert exit_s < grace_s, f"exit took {exit_s:.1f} s"
    assert "exiting without waiting" in stuck.log()
