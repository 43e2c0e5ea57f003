"""CPU time per image a serving system spends beyond the model: its process tree and nats-server, from /proc.

    python bench/cpu_cost.py run --name jetinfer --repository DIR --json out.json -- \\
        .venv/bin/jetinfer serve --nats-url {nats_url} --repository {repository} --model {model} \\
        --metrics-port 0
    python bench/cpu_cost.py run --name pytriton --protocol triton --repository DIR -- \\
        .peers/pytriton/bin/python bench/peers/pytriton_server.py --repository {repository} \\
        --http-port {http_port} --grpc-port {grpc_port} --metrics-port {metrics_port}

For a system under test (the command after `--`; `{nats_url}`, `{http_port}`, `{grpc_port}`,
`{metrics_port}`, `{repository}` and `{model}` in it are filled in), this:

1. starts ONNX Runtime alone in a process of its own (same model, same SessionOptions as jetinfer's
   backend: default intra-op threads, spinning off, all graph optimisations), a fresh nats-server with
   JetStream (protocol `nats`) on free loopback ports, and the command, each in a process group of its
   own, and waits until the system is ready (the durable consumer `worker-<model>` exists, or Triton's
   model is ready);
2. starts a load client as a separate process (its CPU is not counted) that sends the same 224x224 JPEG
   (scikit-image's `chelsea`, quality 90) with `--concurrency` requests in flight: nats-py JetStream
   publishes (waiting for the PubAck) to `infer.<model>` with the jetinfer headers, replies on a core NATS
   inbox; for Triton, HTTP/1.1 keep-alive POSTs with the binary tensor extension, the JPEG as one BYTES
   element that the server decodes;
3. measures in `--chunks` windows (`--requests` images in all; `--warmup` images before the first, twice
   the concurrency before each later one): utime+stime (+cutime+cstime of reaped children) of every
   process in the command's tree and of nats-server, read from /proc when the window's first and last
   replies arrive; after each window, with the load paused, the engine process runs the very batch sizes
   that window ran (replies of one batch share `timing.infer_ms`; Triton's statistics API counts them)
   on the same image, so "beyond the model" = (server tree + nats-server − engine) per image compares
   figures taken seconds apart (this machine drifts by more than the difference over minutes), with the
   chunks' spread as its standard error;
4. stops everything (SIGTERM to the process groups, SIGKILL after `--grace-s`), leaving no process behind,
   and times the engine alone at batch 1, 8, 32 and the system's typical batch (image-weighted median)
   for reference.

Prints one summary and writes it as JSON (`--json`); `table` prints a markdown table of such summaries.
Figures are CPU time, not wall time: steadier than throughput on a shared machine, though other processes
still disturb caches and scheduling, so the machine's other CPU use during the windows is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Outcome",
    "ProcessCpu",
    "Snapshot",
    "Tally",
    "cat_jpeg",
    "client_main",
    "engine_main",
    "free_port",
    "machine_busy_s",
    "main",
    "per_process",
    "read_processes",
    "run_main",
    "snapshot",
    "stop_group",
    "table",
    "table_main",
    "tree",
    "triton_batch_stats",
    "wait_for_quiet",
    "weighted_median",
]

_TICKS = os.sysconf("SC_CLK_TCK")
_ENGINE_BATCHES = (1, 8, 32)
#: A window counts as quiet when other processes used less than this many cores during it and its replay.
_QUIET_CORES = 0.25


# --------------------------------------------------------------------------------------------------
# The input and the model, shared by the client and the engine-only timing


def cat_jpeg(size: int = 224, quality: int = 90) -> bytes:
    """scikit-image's chelsea (the cat), resized to size x size, as a JPEG of the given quality."""
    import skimage.data
    from PIL import Image

    image = Image.fromarray(skimage.data.chelsea()).resize((size, size))  # type: ignore[no-untyped-call]
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# /proc


@dataclass(frozen=True)
class ProcessCpu:
    """One process's CPU seconds: its own (all threads) and its reaped children's."""

    pid: int
    ppid: int
    start: int  # start time in ticks since boot: a reused pid has another
    name: str
    own_s: float
    children_s: float


def read_processes() -> dict[int, ProcessCpu]:
    """Every readable process in /proc, by pid."""
    out: dict[int, ProcessCpu] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): ppid is field 4, utime..cstime 14..17, starttime 22.
        out[int(entry.name)] = ProcessCpu(
            pid=int(entry.name),
            ppid=int(fields[1]),
            start=int(fields[19]),
            name=name,
            own_s=(int(fields[11]) + int(fields[12])) / _TICKS,
            children_s=(int(fields[13]) + int(fields[14])) / _TICKS,
        )
    return out


def tree(processes: dict[int, ProcessCpu], root: int) -> list[ProcessCpu]:
    """`root` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for p in processes.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in processes:
            found.append(processes[pid])
            todo.extend(children.get(pid, []))
    return found


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; not idle, not iowait) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICKS


@dataclass
class Snapshot:
    """CPU of the system's tree, nats-server and the client at one moment."""

    when: float
    tree: list[ProcessCpu]
    nats_s: float
    client_s: float
    machine_s: float

    @property
    def tree_s(self) -> float:
        """The tree's CPU seconds: live processes' own time plus what their reaped children used."""
        return sum(p.own_s + p.children_s for p in self.tree)


def snapshot(root: int, nats_pid: int | None, client_pid: int) -> Snapshot:
    """Read /proc once for all three."""
    processes = read_processes()
    nats = processes.get(nats_pid) if nats_pid else None
    client = processes.get(client_pid)
    return Snapshot(
        when=time.monotonic(),
        tree=tree(processes, root),
        nats_s=nats.own_s if nats else 0.0,
        client_s=client.own_s + client.children_s if client else 0.0,
        machine_s=machine_busy_s(),
    )


def per_process(first: Snapshot, last: Snapshot) -> list[dict[str, Any]]:
    """CPU seconds of each process of the tree over the window, largest first."""
    before = {(p.pid, p.start): p for p in first.tree}
    rows = []
    for p in last.tree:
        old = before.get((p.pid, p.start))
        used = p.own_s + p.children_s - (old.own_s + old.children_s if old else 0.0)
        try:
            command = (
                Path(f"/proc/{p.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            command = p.name
        rows.append({"pid": p.pid, "name": p.name, "cpu_s": round(used, 3), "command": command.strip()[:160]})
    return sorted(rows, key=lambda row: -row["cpu_s"])


# --------------------------------------------------------------------------------------------------
# The load client (a separate process: `cpu_cost.py client ...`)


@dataclass
class Tally:
    """What the client saw in one chunk: `warmup` completions, then the `requests` of the window."""

    warmup: int
    requests: int
    done: int = 0
    window_ok: int = 0
    window_errors: int = 0
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    top1: Counter[int] = field(default_factory=Counter)
    infer_ms: Counter[float] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, error: str | None, top1: int | None, infer_ms: float | None, latency_ms: float) -> None:
        """Count one completed request; announce the window's start and end on stdout at once."""
        in_window = self.started.is_set() and not self.ended.is_set()
        self.done += 1
        if error is not None:
            self.errors += 1
            self.error_kinds[error] += 1
        if in_window:
            if error is None:
                self.window_ok += 1
                self.latencies_ms.append(latency_ms)
                if top1 is not None:
                    self.top1[top1] += 1
                if infer_ms is not None:
                    self.infer_ms[infer_ms] += 1
            else:
                self.window_errors += 1
        if self.done == self.warmup:
            print("window-start", flush=True)
            self.started.set()
        elif self.done == self.warmup + self.requests:
            print("window-end", flush=True)
            self.ended.set()


#: One request: (error or None, top-1 class, the batch's infer_ms if the reply says).
Outcome = tuple[str | None, int | None, float | None]


def _argmax_fp32(data: bytes) -> int:
    return int(np.frombuffer(data, dtype="<f4").argmax())


async def _nats_sender(args: argparse.Namespace, jpeg: bytes) -> tuple[Any, Any]:
    """Wait for the worker's consumer; return (send one request, close)."""
    import msgpack
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(args.url, max_reconnect_attempts=-1)
    js = nc.jetstream()
    deadline = time.monotonic() + args.ready_timeout_s
    while True:  # the worker creates INFER and worker-<model>; publishing before would find no stream
        try:
            await js.consumer_info("INFER", f"worker-{args.model}")
            break
        except NotFoundError as exc:
            if time.monotonic() > deadline:
                message = f"consumer worker-{args.model} not there after {args.ready_timeout_s} s"
                raise TimeoutError(message) from exc
            await asyncio.sleep(0.2)
    inbox = nc.new_inbox()
    pending: dict[str, asyncio.Future[Any]] = {}

    async def on_reply(msg: Any) -> None:
        future = pending.pop(msg.subject, None)
        if future is not None and not future.done():
            future.set_result(msg)

    await nc.subscribe(f"{inbox}.*", cb=on_reply)
    run = uuid.uuid4().hex[:8]
    subject = f"infer.{args.model}"
    counter = 0

    async def send(timeout: float) -> Outcome:
        nonlocal counter
        counter += 1
        reply_to = f"{inbox}.{counter}"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending[reply_to] = future
        headers = {
            "Nats-Msg-Id": f"{run}-{counter}",
            "Jetinfer-Reply-To": reply_to,
            "Content-Type": "image/jpeg",
        }
        try:
            await js.publish(subject, jpeg, headers=headers, timeout=timeout)  # waits for the PubAck
            msg = await asyncio.wait_for(future, timeout)
        finally:
            pending.pop(reply_to, None)
        body = msgpack.unpackb(msg.data)
        status = (msg.headers or {}).get("Jetinfer-Status")
        if status != "ok" or "outputs" not in body:
            return f"status {status}: {body.get('error')}", None, None
        return None, _argmax_fp32(body["outputs"][0]["data"]), body.get("timing", {}).get("infer_ms")

    return send, nc.close


async def _http_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes
) -> tuple[int, dict[str, str], bytes]:
    writer.write(message)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("server closed the connection")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        data = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
            parts.append(await reader.readexactly(size))
            await reader.readline()
        await reader.readline()
        data = b"".join(parts)
    else:
        raise ConnectionError("response without a length")
    return status, headers, data


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def triton_batch_stats(base: str, model: str) -> dict[int, int]:
    """Executions per batch size so far (Triton's statistics API; empty if it cannot be read)."""
    try:
        with urllib.request.urlopen(f"{base}/v2/models/{model}/stats", timeout=5) as response:
            stats = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError) as exc:
        print(f"cannot read Triton's statistics: {exc}", file=sys.stderr)
        return {}
    out: dict[int, int] = {}
    for entry in stats["model_stats"][0].get("batch_stats", []):
        out[int(entry["batch_size"])] = int(entry["compute_infer"]["count"])
    return out


async def _triton_sender(args: argparse.Namespace, jpeg: bytes) -> tuple[Any, str]:
    """Wait for Triton's model; return (a factory of per-lane senders on keep-alive connections, base URL)."""
    host, _, port = args.url.removeprefix("http://").partition(":")
    base = f"http://{host}:{port}"
    deadline = time.monotonic() + args.ready_timeout_s
    while not await asyncio.to_thread(_http_ok, f"{base}/v2/models/{args.model}/ready"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Triton model {args.model} not ready after {args.ready_timeout_s} s")
        await asyncio.sleep(0.2)
    tensor = {
        "name": "image",
        "shape": [1, 1],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": 4 + len(jpeg)},
    }
    output = {"name": args.output, "parameters": {"binary_data": True}}
    header = json.dumps({"inputs": [tensor], "outputs": [output]}).encode()
    body = header + struct.pack("<I", len(jpeg)) + jpeg  # a BYTES element: 4-byte length, then the bytes
    message = (
        f"POST /v2/models/{args.model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    def lane_sender() -> Any:
        connection: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def send(timeout: float) -> Outcome:
            if not connection:
                connection.append(await asyncio.open_connection(host, int(port)))
            reader, writer = connection[0]
            try:
                status, headers, data = await asyncio.wait_for(
                    _http_request(reader, writer, message), timeout
                )
            except BaseException:
                connection.clear()  # a fresh connection for the next request
                writer.close()
                raise
            if status != 200:
                return f"http {status}: {data[:200]!r}", None, None
            json_length = int(headers.get("inference-header-content-length", len(data)))
            return None, _argmax_fp32(data[json_length:]), None

        return send

    return lane_sender, base


def client_main(args: argparse.Namespace) -> int:
    """The load client: on each `go` line from stdin one chunk (warm-up, then the window), tallied as JSON."""

    async def run() -> None:
        jpeg = cat_jpeg()
        base = ""
        if args.protocol == "nats":
            send, close = await _nats_sender(args, jpeg)
            senders = [send] * args.concurrency
        else:
            factory, base = await _triton_sender(args, jpeg)
            senders = [factory() for _ in range(args.concurrency)]
            close = None
        print(f"ready {len(jpeg)}", flush=True)
        for chunk in range(args.chunks):
            if (await asyncio.to_thread(sys.stdin.readline)).strip() != "go":
                break
            tally = Tally(warmup=args.warmup if chunk == 0 else args.chunk_warmup, requests=args.requests)
            stats: dict[str, dict[int, int]] = {}

            async def watch(tally: Tally = tally, stats: dict[str, dict[int, int]] = stats) -> None:
                await tally.started.wait()
                stats["before"] = await asyncio.to_thread(triton_batch_stats, base, args.model)
                await tally.ended.wait()
                stats["after"] = await asyncio.to_thread(triton_batch_stats, base, args.model)

            async def lane(send: Any, tally: Tally = tally) -> None:
                while not tally.ended.is_set():  # the load stays at `concurrency` until the window ends
                    timeout = args.reply_timeout_s if tally.started.is_set() else args.ready_timeout_s
                    start = time.perf_counter()
                    try:
                        error, top1, infer_ms = await send(timeout)
                    except Exception as exc:  # a lost or failed request is counted, never fatal
                        error, top1, infer_ms = type(exc).__name__, None, None
                    tally.finish(error, top1, infer_ms, (time.perf_counter() - start) * 1000)

            watcher = [watch()] if args.protocol == "triton" else []
            await asyncio.gather(*watcher, *(lane(send) for send in senders))
            batches: Counter[int] = Counter()
            if args.protocol == "triton":  # executions per batch size over the window
                for size, count in stats.get("after", {}).items():
                    if count > stats["before"].get(size, 0):
                        batches[size] = count - stats["before"].get(size, 0)
            else:  # the replies of one batch share timing.infer_ms
                for frames in tally.infer_ms.values():
                    batches[frames] += 1
            latencies = sorted(tally.latencies_ms)
            result = {
                "ok": tally.window_ok,
                "errors": tally.window_errors,
                "errors_all": tally.errors,
                "error_kinds": dict(tally.error_kinds.most_common(5)),
                "top1": dict(tally.top1.most_common(3)),
                "batches": {str(size): count for size, count in sorted(batches.items())},
                "latency_p50_ms": latencies[len(latencies) // 2] if latencies else None,
                "latency_p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else None,
            }
            print("chunk " + json.dumps(result), flush=True)
        if close is not None:
            await close()

    asyncio.run(run())
    return 0


# --------------------------------------------------------------------------------------------------
# Engine only (a separate process: `cpu_cost.py engine ...`)


def engine_main(args: argparse.Namespace) -> int:
    """ONNX Runtime alone, as a server of the run: each stdin line `{"size": count, ...}` runs that many
    batches of each size (in a shuffled order) on the cat image and prints their CPU and wall time."""
    import random

    import onnxruntime as ort

    from jetinfer.bench.peers.onnx_peer import load_model, preprocess

    model = load_model(args.repository, args.model)
    session, pre, output = model.session, model.pre, model.output
    frame = preprocess(cat_jpeg(), pre)
    feeds: dict[int, dict[str, np.ndarray]] = {}
    shuffle = random.Random(0)
    print(json.dumps({"ready": True, "onnxruntime": ort.__version__}), flush=True)
    for line in sys.stdin:
        wanted = {int(size): int(count) for size, count in json.loads(line).items()}
        for size in wanted:
            if size not in feeds:  # the first run of a new shape plans its memory: not timed
                feeds[size] = {pre["input"]: np.stack([frame] * size)}
                session.run([output], feeds[size])
        order = [size for size, count in wanted.items() for _ in range(count)]
        shuffle.shuffle(order)
        busy, cpu, wall = machine_busy_s(), time.process_time(), time.perf_counter()  # every thread
        for size in order:
            session.run([output], feeds[size])
        cpu, wall, busy = time.process_time() - cpu, time.perf_counter() - wall, machine_busy_s() - busy
        row = {"images": sum(order), "batches": len(order), "cpu_s": cpu, "wall_s": wall, "machine_s": busy}
        print(json.dumps(row), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# The run


def wait_for_quiet(max_wait_s: float, cores: float = 0.3, sample_s: float = 3.0) -> float:
    """Wait (at most `max_wait_s`) until the machine's other work uses under `cores`; returns what it used."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_s()
        time.sleep(sample_s)
        busy = (machine_busy_s() - before) / sample_s
        if busy < cores or time.monotonic() > deadline:
            return busy
        print(
            f"  the machine is busy ({busy:.2f} cores used by others): waiting", file=sys.stderr, flush=True
        )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_nats(monitor: str, process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{monitor}/healthz?js-enabled-only=true", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError("nats-server not ready")


def stop_group(process: subprocess.Popen[Any], grace_s: float, known: list[ProcessCpu]) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`, then kill what is left of the tree."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            print(f"  {process.args!r:.60} did not exit in {grace_s} s: SIGKILL", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, if any
    if process.poll() is None:
        process.wait(5)
    live = read_processes()
    for p in known:  # descendants that left the group (setsid): only if the pid is still that process
        now = live.get(p.pid)
        if now is not None and now.start == p.start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


def weighted_median(batches: dict[str, int]) -> int | None:
    """The batch size that the median image ran in (batches: size -> how many batches of that size)."""
    images = sorted((int(size), int(size) * count) for size, count in batches.items())
    total = sum(n for _, n in images)
    seen = 0
    for size, n in images:
        seen += n
        if seen * 2 >= total:
            return size
    return None


class _Lines:
    """Lines of a child's stdout, read by a thread, so that waiting for one can time out."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._lines: list[str] = []
        self._ready = threading.Condition()
        self._process = process
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with self._ready:
                self._lines.append(line.rstrip("\n"))
                self._ready.notify_all()
        with self._ready:
            self._lines.append("")  # end of output
            self._ready.notify_all()

    def next(self, timeout_s: float, alive: subprocess.Popen[Any] | None = None) -> str:
        """The next line; "" at the end of output; TimeoutError after `timeout_s` or if `alive` exits."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while not self._lines:
                if time.monotonic() > deadline:
                    raise TimeoutError("no answer in time")
                if alive is not None and alive.poll() is not None:
                    raise TimeoutError(f"the system exited with {alive.returncode}")
                self._ready.wait(0.5)
            return self._lines.pop(0)


def _send(process: subprocess.Popen[str], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line + "\n")
    process.stdin.flush()


def run_main(args: argparse.Namespace) -> int:
    """Start nats-server, the engine and the system; per chunk drive the load, sample /proc, replay the
    chunk's batches on the engine; stop everything; summarise."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("give the system's command after --")
    repository = args.repository.resolve()
    from jetinfer.bench.peers.onnx_peer import model_config

    config, _ = model_config(repository, args.model)
    max_batch = int(config.get("max_batch", 32))
    tmp = Path(tempfile.mkdtemp(prefix="cpu-cost-"))
    log_dir = args.log_dir or tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    nats_port, monitor_port = free_port(), free_port()
    values = {"nats_url": f"nats://127.0.0.1:{nats_port}", "repository": str(repository), "model": args.model}
    values.update({name: str(free_port()) for name in ("http_port", "grpc_port", "metrics_port")})
    command = [part.format(**values) for part in command]
    processes: list[tuple[subprocess.Popen[Any], list[ProcessCpu]]] = []
    nats: subprocess.Popen[bytes] | None = None
    server: subprocess.Popen[bytes] | None = None
    hook: subprocess.Popen[bytes] | None = None
    known: list[ProcessCpu] = []
    chunks: list[dict[str, Any]] = []
    reference: dict[int, dict[str, Any]] = {}
    jpeg_bytes = 0
    signal.signal(signal.SIGTERM, _interrupt)
    busy_before = wait_for_quiet(args.quiet_wait_s) if args.quiet_wait_s > 0 else None
    started_at = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"== {args.name}: {' '.join(command)}", file=sys.stderr, flush=True)
    engine = subprocess.Popen(
        [sys.executable, __file__, "engine", "--repository", str(repository), "--model", args.model],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    processes.append((engine, []))
    engine_lines = _Lines(engine)
    try:
        engine_info = json.loads(engine_lines.next(120))
        if args.protocol == "nats":
            (tmp / "nats.conf").write_text(
                f"listen: 127.0.0.1:{nats_port}\nhttp: 127.0.0.1:{monitor_port}\nmax_payload: 16777216\n"
                f'jetstream {{ store_dir: "{tmp / "js"}", max_memory_store: 1GB, max_file_store: 20GB }}\n'
            )
            with open(log_dir / f"{args.name}.nats.log", "ab") as log:
                nats = subprocess.Popen(
                    [str(args.nats_server), "-c", str(tmp / "nats.conf")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            processes.append((nats, []))
            _wait_nats(f"http://127.0.0.1:{monitor_port}", nats)
        with open(log_dir / f"{args.name}.server.log", "ab") as log:
            server = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        processes.append((server, known))
        url = values["nats_url"] if args.protocol == "nats" else f"http://127.0.0.1:{values['http_port']}"
        client_command = [sys.executable, __file__, "client", "--protocol", args.protocol, "--url", url]
        client_command += ["--model", args.model, "--output", config["outputs"][0]["name"]]
        client_command += [
            "--chunks",
            str(args.chunks),
            "--requests",
            str(math.ceil(args.requests / args.chunks)),
        ]
        client_command += ["--warmup", str(args.warmup), "--chunk-warmup", str(2 * args.concurrency)]
        client_command += [
            "--concurrency",
            str(args.concurrency),
            "--ready-timeout-s",
            str(args.ready_timeout_s),
        ]
        client = subprocess.Popen(
            client_command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        processes.append((client, []))
        client_lines = _Lines(client)
        ready = client_lines.next(args.ready_timeout_s + 10, alive=server)
        if not ready.startswith("ready"):
            raise RuntimeError(f"the client said {ready!r}")
        jpeg_bytes = int(ready.split()[1])
        nats_pid = nats.pid if nats else None
        for number in range(args.chunks):
            if args.quiet_wait_s > 0 and number > 0:  # others' tests on this machine come and go
                wait_for_quiet(args.quiet_wait_s)
            _send(client, "go")
            first = last = None
            while True:
                line = client_lines.next(args.chunk_timeout_s, alive=server)
                if line == "window-start":
                    first = snapshot(server.pid, nats_pid, client.pid)
                    if args.hook and number == 0:  # e.g. a profiler attached to the server
                        hook_command = [
                            part.format(pid=server.pid, **values) for part in shlex.split(args.hook)
                        ]
                        hook = subprocess.Popen(
                            hook_command, stdin=subprocess.DEVNULL, start_new_session=True
                        )
                elif line == "window-end":
                    last = snapshot(server.pid, nats_pid, client.pid)
                    known.extend(last.tree)
                elif line.startswith("chunk "):
                    break
                elif line == "":
                    raise RuntimeError("the client exited")
            if first is None or last is None:
                raise RuntimeError("the client ended a chunk without a window")
            result = json.loads(line[len("chunk ") :])
            # The model alone, right away, on the very batch sizes this window ran.
            replay = {size: count for size, count in result["batches"].items() if 0 < int(size) <= max_batch}
            if not replay:  # no batch sizes seen (a reply without timing): the window's images at max_batch
                replay = {str(max_batch): max(1, result["ok"] // max_batch)}
            _send(engine, json.dumps(replay))
            eng = json.loads(engine_lines.next(args.chunk_timeout_s))
            chunks.append({"first": first, "last": last, "result": result, "engine": eng})
            c = _chunk_row(chunks[-1])
            print(
                f"  chunk {number + 1}/{args.chunks}: {result['ok']} images, {result['errors']} errors,"
                f" {c['img_s']:.1f} img/s; server+nats {c['system_ms']:.2f} ms/img, engine (same batches)"
                f" {c['engine_ms']:.2f} ms/img: beyond {c['beyond_ms']:.2f};"
                f" others {c['other_cores']:.2f} cores",
                file=sys.stderr,
                flush=True,
            )
        client.wait(30)  # it exits after its last chunk
    except (KeyboardInterrupt, TimeoutError, RuntimeError, ValueError, OSError) as exc:
        print(f"  {args.name}: stopped early: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if hook is not None:  # it ends by itself (a profiler's --duration); stopped if it does not
            with contextlib.suppress(subprocess.TimeoutExpired):
                hook.wait(args.grace_s)
            stop_group(hook, 5.0, [])
        if server is not None:  # whatever the tree holds now is stopped too
            known.extend(tree(read_processes(), server.pid))
        for process, seen in reversed(processes[1:]):
            stop_group(process, args.grace_s, seen)
        shutil.rmtree(tmp / "js", ignore_errors=True)
    try:  # reference figures of the engine alone, with the system stopped
        if chunks:
            batches: Counter[int] = Counter()
            for chunk in chunks:
                batches.update({int(s): n for s, n in chunk["result"]["batches"].items()})
            typical = min(weighted_median({str(s): n for s, n in batches.items()}) or max_batch, max_batch)
            for size in sorted({*_ENGINE_BATCHES, typical}):
                _send(engine, json.dumps({str(size): max(1, math.ceil(args.engine_images / size))}))
                row = json.loads(engine_lines.next(300))
                reference[size] = {
                    "cpu_ms_per_image": 1000 * row["cpu_s"] / row["images"],
                    "img_s": row["images"] / row["wall_s"],
                    "images": row["images"],
                }
    finally:
        stop_group(engine, 5.0, [])
    if not chunks:
        tail = (log_dir / f"{args.name}.server.log").read_text(errors="replace")[-3000:]
        print(f"{args.name}: no measured window; the server's log ends:\n{tail}", file=sys.stderr)
        return 1
    summary = _summarise(args, command, started_at, busy_before, chunks, reference, engine_info)
    summary["jpeg_bytes"] = jpeg_bytes
    print(_describe(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if len(chunks) == args.chunks else 1


def _chunk_row(chunk: dict[str, Any]) -> dict[str, float]:
    first, last, result, eng = chunk["first"], chunk["last"], chunk["result"], chunk["engine"]
    wall = last.when - first.when
    images = max(1, result["ok"])
    server_s, nats_s, client_s = (
        last.tree_s - first.tree_s,
        last.nats_s - first.nats_s,
        last.client_s - first.client_s,
    )
    system_ms = 1000 * (server_s + nats_s) / images
    engine_ms = 1000 * eng["cpu_s"] / eng["images"]
    return {
        "images": result["ok"],
        "wall_s": wall,
        "img_s": result["ok"] / wall,
        "server_s": server_s,
        "nats_s": nats_s,
        "client_s": client_s,
        "system_ms": system_ms,
        "engine_ms": engine_ms,
        "beyond_ms": system_ms - engine_ms,
        "other_cores": (last.machine_s - first.machine_s - server_s - nats_s - client_s) / wall,
        "engine_other_cores": (eng["machine_s"] - eng["cpu_s"]) / eng["wall_s"],
    }


def _summarise(
    args: argparse.Namespace,
    command: list[str],
    started_at: str,
    busy_before: float | None,
    chunks: list[dict[str, Any]],
    reference: dict[int, dict[str, Any]],
    engine_info: dict[str, Any],
) -> dict[str, Any]:
    rows = [_chunk_row(chunk) for chunk in chunks]
    images = sum(int(r["images"]) for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    server_s, nats_s = sum(r["server_s"] for r in rows), sum(r["nats_s"] for r in rows)
    engine_s = sum(c["engine"]["cpu_s"] for c in chunks)
    engine_images = sum(c["engine"]["images"] for c in chunks)
    batches: Counter[int] = Counter()
    top1: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for chunk in chunks:
        batches.update({int(s): n for s, n in chunk["result"]["batches"].items()})
        top1.update(chunk["result"]["top1"])
        kinds.update(chunk["result"]["error_kinds"])
    batch_map = {str(s): n for s, n in sorted(batches.items())}
    typical = weighted_median(batch_map)
    beyond = [r["beyond_ms"] for r in rows]
    processes: Counter[tuple[int, str]] = Counter()
    for chunk in chunks:
        for row in per_process(chunk["first"], chunk["last"]):
            processes[(row["pid"], row["name"])] += row["cpu_s"]
    summary: dict[str, Any] = {
        "system": args.name,
        "round": args.round,
        "command": command,
        "protocol": args.protocol,
        "date": started_at,
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "onnxruntime_engine": engine_info.get("onnxruntime"),
        "requests": args.requests,
        "chunks": len(chunks),
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "images": images,
        "errors": sum(int(c["result"]["errors"]) for c in chunks),
        "errors_all": sum(int(c["result"]["errors_all"]) for c in chunks),
        "error_kinds": dict(kinds),
        "wall_s": wall,
        "img_s": images / wall,
        "server_cpu_ms": 1000 * server_s / images,
        "nats_cpu_ms": 1000 * nats_s / images,
        "client_cpu_ms": 1000 * sum(r["client_s"] for r in rows) / images,
        "server_cores": server_s / wall,
        "engine_cpu_ms": 1000 * engine_s / engine_images,
        "engine_images": engine_images,
        "beyond_ms": 1000 * (server_s + nats_s) / images - 1000 * engine_s / engine_images,
        "beyond_ms_chunks": beyond,
        "beyond_ms_stderr": statistics.stdev(beyond) / math.sqrt(len(beyond))
        if len(beyond) > 1
        else math.nan,
        "other_cpu_cores": sum(r["other_cores"] * r["wall_s"] for r in rows) / wall,
        "engine_other_cores": statistics.fmean(r["engine_other_cores"] for r in rows),
        "busy_before_cores": busy_before,
        "batches": batch_map,
        "typical_batch": typical,
        "mean_batch": sum(s * n for s, n in batches.items()) / sum(batches.values()) if batches else None,
        "engine_reference": {str(size): row for size, row in reference.items()},
        "top1": dict(top1.most_common(3)),
        "latency_p50_ms": statistics.median(c["result"]["latency_p50_ms"] or 0 for c in chunks),
        "processes": [
            {"pid": pid, "name": name, "cpu_s": round(cpu, 2)}
            for (pid, name), cpu in processes.most_common(8)
        ],
    }
    summary["chunk_rows"] = [{k: round(v, 3) for k, v in row.items()} for row in rows]
    quiet = [r for r in rows if _is_quiet(r)]
    summary["quiet_chunks"] = len(quiet)
    if quiet:  # the windows where the rest of the machine stayed (nearly) idle, pooled
        summary["beyond_ms_quiet"] = _pooled_beyond(quiet)
    if typical is not None and typical in reference:
        summary["beyond_ms_at_typical_batch"] = (
            summary["server_cpu_ms"] + summary["nats_cpu_ms"] - reference[typical]["cpu_ms_per_image"]
        )
    return summary


def _describe(s: dict[str, Any]) -> str:
    reference = "  ".join(
        f"b{b}: {row['cpu_ms_per_image']:.2f} ms ({row['img_s']:.0f} img/s)"
        for b, row in s["engine_reference"].items()
    )
    chunks = ", ".join(f"{b:.2f}" for b in s["beyond_ms_chunks"])
    lines = [
        f"{s['system']}: {s['images']} images, {s['errors']} errors,"
        f" {s['wall_s']:.1f} s in {s['chunks']} chunks,"
        f" {s['img_s']:.1f} img/s; CPU time per image: server tree {s['server_cpu_ms']:.2f} ms"
        f" ({s['server_cores']:.2f} cores) + nats-server {s['nats_cpu_ms']:.2f} ms - engine alone on the same"
        f" batches {s['engine_cpu_ms']:.2f} ms = beyond the model {s['beyond_ms']:.2f} ms/img"
        f" (± {s['beyond_ms_stderr']:.2f} standard error over the chunks: {chunks})",
        f"  {s['nproc']} cores; other processes used {s['other_cpu_cores']:.2f} cores during the windows,"
        f" {s['engine_other_cores']:.2f} during the engine's;"
        f" client {s['client_cpu_ms']:.2f} ms/img (not counted)",
        f"  batches (size: count) {s['batches']}, image-weighted median {s['typical_batch']}, mean"
        f" {s['mean_batch'] or 0:.1f}; latency p50 {s['latency_p50_ms']:.1f} ms; top-1 {s['top1']}",
        f"  engine alone afterwards (ms CPU/img): {reference}; beyond at the typical batch"
        f" {s.get('beyond_ms_at_typical_batch', math.nan):.2f}",
        "  processes: "
        + ", ".join(f"{p['name']}[{p['pid']}] {p['cpu_s']:.1f} s" for p in s["processes"][:6]),
    ]
    return "\n".join(lines)


_COLUMNS = (
    ("system", "system", "{}"),
    ("round", "round", "{}"),
    ("images", "images", "{}"),
    ("errors", "errors", "{}"),
    ("img/s", "img_s", "{:.1f}"),
    ("server CPU ms/img", "server_cpu_ms", "{:.2f}"),
    ("nats CPU ms/img", "nats_cpu_ms", "{:.2f}"),
    ("engine CPU ms/img", "engine_cpu_ms", "{:.2f}"),
    ("beyond the model ms/img", "beyond_ms", "{:.2f}"),
    ("beyond, median window", "beyond_ms_chunks", "{:.2f}"),
    ("beyond, quiet windows only", "beyond_ms_quiet", "{:.2f}"),
    ("batch (median, mean)", "typical_batch", "{}"),
    ("others' cores", "other_cpu_cores", "{:.2f}"),
)


def _is_quiet(row: dict[str, float]) -> bool:
    return row["other_cores"] < _QUIET_CORES and row["engine_other_cores"] < _QUIET_CORES


def _pooled_beyond(rows: list[dict[str, float]]) -> float:
    """Server + nats-server minus engine CPU per image over several windows, weighted by their images."""
    images = sum(r["images"] for r in rows)
    return sum((r["system_ms"] - r["engine_ms"]) * r["images"] for r in rows) / images


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of run summaries, then one line per system with its median over rounds."""
    out = ["| " + " | ".join(title for title, _, _ in _COLUMNS) + " |", "|" + " --- |" * len(_COLUMNS)]
    for row in rows:
        cells = []
        for _, key, form in _COLUMNS:
            if key == "beyond_ms":
                cells.append(f"{row['beyond_ms']:.2f} ± {row['beyond_ms_stderr']:.2f}")
            elif key == "beyond_ms_chunks":
                cells.append(f"{statistics.median(row['beyond_ms_chunks']):.2f}")
            elif key == "beyond_ms_quiet":
                quiet = row.get("beyond_ms_quiet")
                chunks = f"{row.get('quiet_chunks', '?')}/{row.get('chunks', '?')}"
                cells.append(f"{quiet:.2f} ({chunks})" if quiet is not None else f"— ({chunks})")
            elif key == "typical_batch":
                cells.append(f"{row['typical_batch']}, {row['mean_batch'] or 0:.1f}")
            elif key == "nats_cpu_ms" and row.get("protocol") == "triton":
                cells.append("—")
            else:
                cells.append(form.format(row.get(key, "")))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for system in dict.fromkeys(row["system"] for row in rows):
        mine = [row for row in rows if row["system"] == system]
        beyond = sorted(row["beyond_ms"] for row in mine)
        cost = sorted(row["server_cpu_ms"] + row["nats_cpu_ms"] for row in mine)
        windows = [b for row in mine for b in row["beyond_ms_chunks"]]
        quiet = [c for row in mine for c in row.get("chunk_rows", []) if _is_quiet(c)]
        quiet_text = (
            f"; quiet windows pooled {_pooled_beyond(quiet):.2f} ms/img ({len(quiet)} windows)"
            if quiet
            else ""
        )
        out.append(
            f"- {system}: beyond the model {statistics.median(beyond):.2f} ms/img"
            f" (median of {len(mine)} runs,"
            f" range {beyond[0]:.2f} to {beyond[-1]:.2f}); server + nats-server {statistics.median(cost):.2f}"
            f" ms/img; median window {statistics.median(windows):.2f} ms/img ({len(windows)} windows);"
            f" {sum(r['images'] for r in mine)} images, {sum(r['errors'] for r in mine)} errors" + quiet_text
        )
    return "\n".join(out)


def table_main(args: argparse.Namespace) -> int:
    """Print the markdown table of the JSON summaries given, in the order given."""
    print(table([json.loads(Path(path).read_text()) for path in args.files]))
    return 0


def main() -> int:
    """Parse the command line and run one of `run`, `client`, `engine`, `table`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)

    run = sub.add_parser("run", help="measure one system (the command after --)")
    run.add_argument("--name", required=True, help="the system's name in the output")
    run.add_argument("--protocol", choices=["nats", "triton"], default="nats")
    run.add_argument("--repository", type=Path, required=True)
    run.add_argument("--model", default="efficientnet_lite0")
    run.add_argument("--requests", type=int, default=3000, help="images in the measured windows, in all")
    run.add_argument("--chunks", type=int, default=6, help="windows, each followed by the engine alone")
    run.add_argument("--warmup", type=int, default=300, help="images before the first window")
    run.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    run.add_argument("--engine-images", type=int, default=320, help="images per reference batch size")
    run.add_argument("--grace-s", type=float, default=20.0, help="SIGTERM to SIGKILL")
    run.add_argument("--ready-timeout-s", type=float, default=120.0)
    run.add_argument("--chunk-timeout-s", type=float, default=300.0)
    run.add_argument("--nats-server", type=Path, default=Path(sys.executable).parent / "nats-server")
    run.add_argument("--log-dir", type=Path, help="where the server's and nats-server's logs go")
    run.add_argument("--json", type=Path, help="write the summary here")
    run.add_argument("--round", type=int, default=1, help="the round's number, recorded in the summary")
    run.add_argument(
        "--quiet-wait-s",
        type=float,
        default=0.0,
        help="before the run and each window, wait up to this long for the machine to be idle",
    )
    run.add_argument(
        "--hook",
        help="a command started when the first window starts ({pid}: the server's pid), waited for at the"
        " end; its CPU is not counted (it is not in the server's tree)",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help="the system's command, after --")

    client = sub.add_parser("client", help="(internal) the load client")
    client.add_argument("--protocol", choices=["nats", "triton"], required=True)
    client.add_argument("--url", required=True)
    client.add_argument("--model", required=True)
    client.add_argument("--output", default="logits")
    client.add_argument("--chunks", type=int, required=True)
    client.add_argument("--requests", type=int, required=True, help="per chunk")
    client.add_argument("--warmup", type=int, required=True, help="before the first chunk's window")
    client.add_argument("--chunk-warmup", type=int, required=True, help="before each later chunk's window")
    client.add_argument("--concurrency", type=int, required=True)
    client.add_argument("--ready-timeout-s", type=float, default=120.0)
    client.add_argument("--reply-timeout-s", type=float, default=30.0)

    engine = sub.add_parser("engine", help="(internal) ONNX Runtime alone, batches given on stdin")
    engine.add_argument("--repository", type=Path, required=True)
    engine.add_argument("--model", required=True)

    tabulate = sub.add_parser("table", help="a markdown table of `run --json` summaries")
    tabulate.add_argument("files", nargs="+", type=Path)

    args = parser.parse_args()
    if args.what == "table":
        return table_main(args)
    if args.what == "client":
        return client_main(args)
    if args.what == "engine":
        return engine_main(args)
    return run_main(args)


if __name__ == "__main__":
    sys.exit(main())
