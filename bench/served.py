"""The real server, started as `akidb-embed serve --socket PATH`, measured through the Python
client over the Unix socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from akidb_embed_client import EmbedClient


class ServerProcess:
    """`python -m akidb_embed serve` in a child process; the context stops it."""

    def __init__(self, socket: Path, log: Path, args: Sequence[str], env: dict[str, str]) -> None:
        self.socket = socket
        self.log = log
        self.metrics_port = _free_port()
        command = [sys.executable, "-m", "akidb_embed", "serve", "--socket", str(socket)]
        command += ["--metrics-port", str(self.metrics_port)]
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*command, "--log-level", "WARNING", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_serving(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: see {self.log}:\n{self.log.read_text()}")
            if self.socket.exists():
                try:
                    with EmbedClient(str(self.socket), timeout=2) as client:
                        if client.check() == "SERVING":
                            return
                except Exception:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not report SERVING in {timeout:.0f}s: see {self.log}")

    def computed_tokens(self) -> float:
        """Real tokens the server's batches have computed so far (its /metrics)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("akidb_embed_tokens_total{")
        )

    def rss_bytes(self) -> int:
        """Resident memory of the server and its engine worker processes."""
        root = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def backend(self) -> str:
        with EmbedClient(str(self.socket), timeout=10) as client:
            return client.health().backend

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Throughput:
    texts_per_second: float
    tokens_per_second: float
    seconds: float
    embeddings: np.ndarray


def stream_bulk(target: str, texts: Sequence[str]) -> Throughput:
    """All texts through one EmbedStream."""
    with EmbedClient(target, timeout=3600) as client:
        started = time.perf_counter()
        results = list(client.embed_stream(texts))
        seconds = time.perf_counter() - started
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"{len(errors)} stream items failed, e.g. {errors[0]}")
    vectors = np.stack([r.vector for r in results if r.vector is not None])
    tokens = sum(r.token_count for r in results)
    return Throughput(len(texts) / seconds, tokens / seconds, seconds, vectors)


def embed_batches(target: str, texts: Sequence[str], batch: int = 64) -> Throughput:
    """Unary Embed calls of `batch` texts, one after another."""
    with EmbedClient(target, timeout=600) as client:
        started = time.perf_counter()
        results = [client.embed(texts[i : i + batch]) for i in range(0, len(texts), batch)]
        seconds = time.perf_counter() - started
    vectors = np.concatenate([r.vectors for r in results])
    tokens = sum(sum(r.token_counts) for r in results)
    return Throughput(len(texts) / seconds, tokens / seconds, seconds, vectors)


def concurrent_clients(
    target: str, texts: Sequence[str], clients: int = 8, batch: int = 64
) -> Throughput:
    """`clients` threads, each with its own channel, each embedding its share in batches."""
    shares = [list(texts[i::clients]) for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        runs = list(pool.map(lambda share: embed_batches(target, share, batch), shares))
        seconds = time.perf_counter() - started
    tokens = sum(r.tokens_per_second * r.seconds for r in runs)
    vectors = np.zeros((len(texts), runs[0].embeddings.shape[1]), np.float32)
    for i, run in enumerate(runs):
        vectors[i::clients] = run.embeddings
    return Throughput(len(texts) / seconds, tokens / seconds, seconds, vectors)


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    count: int


def query_latency(
    target: str, queries: Sequence[str], interval: float = 0.0, tokens: list[int] | None = None
) -> Latency:
    """Single-text Embed calls, one at a time: back to back, or one every `interval` s.
    Their token counts are appended to `tokens`, if given."""
    times = []
    with EmbedClient(target, timeout=60) as client:
        client.embed([queries[0]])
        next_at = time.perf_counter()
        for query in queries:
            if interval:
                next_at += interval
                time.sleep(max(0.0, next_at - time.perf_counter()))
            started = time.perf_counter()
            result = client.embed([query])
            times.append(time.perf_counter() - started)
            if tokens is not None:
                tokens.extend(result.token_counts)
    ms = np.array(times) * 1e3
    return Latency(float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(ms))


@dataclass(frozen=True)
class UnderLoad:
    latency: Latency
    # The bulk stream's rates just before the queries (`alone_seconds`) and while they ran.
    # Its texts differ in length from one second to the next: tokens/s is the fair ratio
    # (texts/s counts answers, which arrive a group at a time: a rough figure).
    texts_alone: float
    texts_during: float
    tokens_alone: float
    tokens_during: float


def query_latency_under_load(
    server: ServerProcess,
    queries: Sequence[str],
    bulk: Sequence[str],
    interval: float = 0.0,
    alone_seconds: float = 4.0,
) -> UnderLoad:
    """Query latency while EmbedStream re-embeds `bulk` in a loop, and the bulk stream's
    rates alone (for `alone_seconds`, same stream) and during the queries.

    Tokens/s are the server's computed tokens (its /metrics, the queries' own taken out):
    a stream's results arrive a group at a time, seconds apart, so counting them would
    measure where the groups' ends fall, not the rate."""
    target = str(server.socket)
    stop = threading.Event()
    done = [0]  # texts answered
    ready = threading.Event()

    def background() -> None:
        with EmbedClient(target, timeout=3600) as client:

            def items() -> object:
                while not stop.is_set():
                    yield from bulk

            for _ in client.embed_stream(items()):  # type: ignore[arg-type]
                done[0] += 1
                if done[0] == 256:
                    ready.set()
                if stop.is_set():
                    break

    query_tokens: list[int] = []

    def rates_over(run: Callable[[], object]) -> tuple[object, float, float]:
        texts, tokens, started = done[0], server.computed_tokens(), time.perf_counter()
        counted = len(query_tokens)
        out = run()
        seconds = time.perf_counter() - started
        bulk_tokens = server.computed_tokens() - tokens - sum(query_tokens[counted:])
        return out, (done[0] - texts) / seconds, bulk_tokens / seconds

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    ready.wait(120)
    _, texts_alone, tokens_alone = rates_over(lambda: time.sleep(alone_seconds))
    latency, texts_during, tokens_during = rates_over(
        lambda: query_latency(target, queries, interval, query_tokens)
    )
    stop.set()
    thread.join(120)
    assert isinstance(latency, Latency)
    return UnderLoad(latency, texts_alone, texts_during, tokens_alone, tokens_during)


def rss_over_stream(server: ServerProcess, texts: Sequence[str]) -> tuple[int, int, float]:
    """Server RSS before and after streaming `texts`, and the stream's texts/s."""
    target = str(server.socket)
    # One short stream first, so what the first batches allocate is in "before".
    stream_bulk(target, texts[: min(len(texts), 2000)])
    before = server.rss_bytes()
    run = stream_bulk(target, texts)
    return before, server.rss_bytes(), run.texts_per_second


def repo_env(repo: Path) -> dict[str, str]:
    """The environment for children: this checkout's packages first on the path."""
    env = dict(os.environ)
    paths = [str(repo / "server"), str(repo / "clients" / "python"), str(repo)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
