"""Faults: damaged model files, clients that cancel or vanish mid-stream, SIGTERM under load."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread
from tests.ops.conftest import ServerProcess, handled, scrape, server_env, value

MODEL = "all-minilm-l6-v2"
# What each kind of damage must say, besides naming the model.
DAMAGE_HINTS = {
    "broken-header": "damaged",
    "broken-truncated": "damaged",
    "broken-nan-weights": "non-finite",
    "pickled-only": "pickled",
}


@pytest.mark.parametrize("name", sorted(DAMAGE_HINTS))
def test_damaged_model_is_a_clear_failed_precondition_and_the_default_keeps_serving(
    ops_server: ServerThread, name: str
) -> None:
    with EmbedClient(ops_server.target, timeout=120) as client:
        before = scrape(ops_server)
        for _ in range(2):  # a retry fails the same way, it does not wedge anything
            with pytest.raises(EmbedClientError) as info:
                client.embed(["hello"], model=name)
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
            message = info.value.message
            assert name in message, message
            assert DAMAGE_HINTS[name] in message, message

        [item] = list(client.embed_stream([("only", "hello")], model=name))
        assert item.error is not None
        assert item.error.code == grpc.StatusCode.FAILED_PRECONDITION

        models = {m.name: m for m in client.list_models()}
        assert models[name].state == "failed"
        assert DAMAGE_HINTS[name] in models[name].state_reason
        assert models[MODEL].state == "loaded"

        assert client.check(name) == "NOT_SERVING"
        assert client.check() == "SERVING"
        assert client.check(MODEL) == "SERVING"
        assert client.health().serving
        vectors = client.embed(["the default model still works"]).vectors
        assert vectors.shape == (1, 384) and np.isfinite(vectors).all()
        after = scrape(ops_server)
    failed = value(after, "akidb_embed_model_loads_total", model=name, outcome="failed")
    assert failed - value(before, "akidb_embed_model_loads_total", model=name, outcome="failed")


def test_a_model_that_turns_out_to_give_nan_is_refused_and_no_nan_leaves(
    ops_server: ServerThread,
) -> None:
    with EmbedClient(ops_server.target, timeout=120) as client:
        ok = client.embed(["a text without the damaged token"], model="nan-row").vectors
        assert np.isfinite(ok).all()
        results = list(
            client.embed_stream([("fine", "a fine text"), ("nan", "a kazoo")], model="nan-row")
        )
        assert results[0].error is None and np.isfinite(results[0].vector).all()
        assert results[1].vector is None and results[1].error is not None
        assert results[1].error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "non-finite" in results[1].error.message
        assert "akidb-embed pull nan-row --force" in results[1].error.message
        # From now on the model is refused, and health says why.
        with pytest.raises(EmbedClientError) as info:
            client.embed(["a text without the damaged token"], model="nan-row")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        wait_for(lambda: client.check("nan-row") == "NOT_SERVING")
        models = {m.name: m for m in client.list_models()}
        assert models["nan-row"].state == "failed"
        assert "non-finite" in models["nan-row"].state_reason
        assert client.check() == "SERVING"
        assert np.isfinite(client.embed(["a kazoo"]).vectors).all()  # the default is fine


def endless_requests() -> Iterator[pb.EmbedStreamRequest]:
    for i in itertools.count():
        yield pb.EmbedStreamRequest(ids=[str(i)], texts=[f"item {i} of an endless stream"])


def wait_for(predicate: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def queue_drained(server: ServerThread) -> bool:
    return value(scrape(server), "akidb_embed_queue_items") == 0


def test_clients_that_cancel_or_time_out_mid_stream(ops_server: ServerThread) -> None:
    before = scrape(ops_server)
    with grpc.insecure_channel(f"unix:{ops_server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        call = stub.EmbedStream(endless_requests(), timeout=60)
        assert [list(next(call).ids) for _ in range(3)] == [["0"], ["1"], ["2"]]
        call.cancel()
        expired = stub.EmbedStream(endless_requests(), timeout=1.5)
        with pytest.raises(grpc.RpcError) as info:
            for _ in expired:
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: queue_drained(ops_server))
    after = scrape(ops_server)
    for code in ("CANCELLED", "DEADLINE_EXCEEDED"):
        assert handled(after, "EmbedStream", code) - handled(before, "EmbedStream", code) == 1
    with EmbedClient(ops_server.target, timeout=30) as client:
        assert client.check() == "SERVING"
        assert client.embed(["still fine"]).vectors.shape == (1, 384)


VANISHING_CLIENT = textwrap.dedent(
    """
    import itertools, sys, time
    import grpc
    from akidb.embedding.v1 import embedding_service_pb2 as pb
    from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

    def requests():
        for i in itertools.count():
            yield pb.EmbedStreamRequest(ids=[str(i)], texts=[f"item {i} of an endless stream"])

    channel = grpc.insecure_channel("unix:" + sys.argv[1])
    call = pb_grpc.EmbeddingServiceStub(channel).EmbedStream(requests())
    for _ in range(5):
        next(call)
    print("streaming", flush=True)
    time.sleep(600)
    """
)


def test_client_process_killed_mid_stream(ops_server: ServerThread) -> None:
    before = scrape(ops_server)
    client = subprocess.Popen(
        [sys.executable, "-c", VANISHING_CLIENT, ops_server.target],
        stdout=subprocess.PIPE,
        env=server_env(),
        text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "streaming"
        # Its stream is full of queued work now; it dies without closing anything.
        client.send_signal(signal.SIGKILL)
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
    # The server sees the connection drop, cancels the call and drops its queued texts.
    wait_for(
        lambda: (
            handled(scrape(ops_server), "EmbedStream", "CANCELLED")
            > handled(before, "EmbedStream", "CANCELLED")
        )
    )
    wait_for(lambda: queue_drained(ops_server))
    with EmbedClient(ops_server.target, timeout=30) as healthy:
        assert healthy.check() == "SERVING"
        assert healthy.embed(["after the client vanished"]).vectors.shape == (1, 384)


@dataclass
class DrainReport:
    stream_items_sent: int = 0
    stream_items_ok: int = 0
    unary_ok: int = 0
    codes: Counter[str] = field(default_factory=Counter)


MAX_AHEAD = 512
REFERENCE_TEXTS = [f"sentence number {i} about topic {i % 7}" for i in range(32)]


async def stream_until_told_to_stop(
    target: str, reference: np.ndarray, report: DrainReport, worker: int
) -> None:
    """Streams until an item comes back UNAVAILABLE, then half-closes and drains.

    Every item the server read must come back once, in order: a vector or UNAVAILABLE.
    Like a well-behaved client it keeps at most MAX_AHEAD items unanswered: HTTP/2 windows
    are in bytes, and megabytes of tiny items would otherwise sit in the transport."""
    async with grpc.aio.insecure_channel(f"unix:{target}") as channel:
        call = pb_grpc.EmbeddingServiceStub(channel).EmbedStream(timeout=120)
        sent: list[tuple[str, int]] = []
        stop = asyncio.Event()
        received = 0

        async def write() -> None:
            for n in itertools.count():
                while len(sent) - received >= MAX_AHEAD and not stop.is_set():
                    await asyncio.sleep(0.005)
                if stop.is_set():
                    break
                index = (n + worker) % len(REFERENCE_TEXTS)
                item_id = f"w{worker}-{n}"
                sent.append((item_id, index))  # before the write: its answer may come first
                await call.write(
                    pb.EmbedStreamRequest(ids=[item_id], texts=[REFERENCE_TEXTS[index]])
                )
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            async for response in call:
                item_id, index = sent[received]
                assert list(response.ids) == [item_id], (response.ids, item_id)
                received += 1
                if not response.errors:
                    vector = np.frombuffer(response.embeddings.vectors, dtype="<f4")
                    np.testing.assert_allclose(vector, reference[index], atol=1e-4)
                    report.stream_items_ok += 1
                else:
                    code = grpc.StatusCode.UNAVAILABLE.value[0]
                    assert response.errors[0].code == code, response.errors
                    report.codes["item UNAVAILABLE"] += 1
                    stop.set()
        except grpc.aio.AioRpcError as error:
            # Only a stream that started after shutdown began may be refused, and then whole.
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert received == 0, (received, error)
            report.codes["stream refused"] += 1
            writer.cancel()
            return
        await writer
        assert received == len(sent), (received, len(sent))
        report.stream_items_sent += len(sent)
        report.codes["stream OK"] += 1


async def unary_until_refused(
    target: str, reference: np.ndarray, report: DrainReport, worker: int
) -> None:
    async with grpc.aio.insecure_channel(f"unix:{target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        for n in itertools.count():
            indices = [(n + worker + k) % len(REFERENCE_TEXTS) for k in range(4)]
            request = pb.EmbedRequest(texts=[REFERENCE_TEXTS[i] for i in indices])
            try:
                response = await stub.Embed(request, timeout=120)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                report.codes["unary UNAVAILABLE"] += 1
                return
            vectors = np.frombuffer(response.embeddings.vectors, "<f4")
            np.testing.assert_allclose(vectors.reshape(4, -1), reference[indices], atol=1e-4)
            report.unary_ok += 1


@pytest.mark.slow
async def test_sigterm_under_load_answers_every_accepted_item_and_exits_0(
    tmp_path: Path,
) -> None:
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o700)
    server = ServerProcess(
        socket_dir / "embed.sock", tmp_path / "server.log", "--grace", "60", "--log-format", "json"
    )
    try:
        await asyncio.to_thread(server.wait_serving)
        # A second server on the same socket refuses to start and leaves the first alone.
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "akidb_embed", "serve", "--socket", server.target],
            capture_output=True,
            text=True,
            env=server_env(),
            timeout=120,
        )
        assert second.returncode == 1, second.stderr
        assert "already listening" in second.stderr
        with EmbedClient(server.target, timeout=60) as client:
            reference = client.embed(REFERENCE_TEXTS).vectors
        report = DrainReport()
        clients = [
            *(stream_until_told_to_stop(server.target, reference, report, w) for w in range(4)),
            *(unary_until_refused(server.target, reference, report, w) for w in range(4)),
        ]
        tasks = [asyncio.create_task(c) for c in clients]
        await asyncio.sleep(4)
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        signalled = time.monotonic()
        server.terminate()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        exit_code = await asyncio.to_thread(server.wait, 120)
        drained = time.monotonic() - signalled
    finally:
        server.close()
    log = server.log()
    assert exit_code == 0, log
    # --log-format json: every line is one JSON object.
    lines = [json.loads(line) for line in log.splitlines()]
    assert lines[-1]["message"] == "stopped"
    assert any(line["message"].startswith("shutting down") for line in lines)
    assert not server.socket_path.exists()
    assert report.codes["stream OK"] + report.codes["stream refused"] == 4
    assert report.codes["unary UNAVAILABLE"] == 4
    assert report.stream_items_ok > 0 and report.unary_ok > 0
    print(
        f"\nSIGTERM under load: {report.stream_items_sent} stream items sent, "
        f"{report.stream_items_ok} embedded, the rest UNAVAILABLE; "
        f"{report.unary_ok} unary calls OK; {dict(report.codes)}; exit 0 {drained:.1f}s after"
    )


def test_restart_while_the_old_server_drains_keeps_the_new_socket(tmp_path: Path) -> None:
    """`serve` B starts on the path while A drains after SIGTERM: A's exit leaves B's socket."""
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o700)
    path = socket_dir / "embed.sock"
    old = ServerProcess(path, tmp_path / "a.log", "--grace", "30", "--workers", "0")
    new: ServerProcess | None = None
    channel = grpc.insecure_channel(f"unix:{path}")
    try:
        old.wait_serving()
        # An open Watch keeps A draining after SIGTERM until it ends.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        old.terminate()
        wait_for(lambda: "shutting down" in old.log())
        assert old.proc.poll() is None, old.log()
        new = ServerProcess(path, tmp_path / "b.log", "--workers", "0").wait_serving()
        watch.cancel()
        assert old.wait(60) == 0, old.log()
        assert path.exists(), "the old server deleted the new server's socket"
        with EmbedClient(str(path), timeout=30) as client:
            assert client.check() == "SERVING"
            assert client.embed(["reachable after the restart"]).vectors.shape == (1, 384)
        new.terminate()
        assert new.wait(60) == 0, new.log()
        assert not path.exists()  # its own socket, it does remove
    finally:
        channel.close()
        old.close()
        if new is not None:
            new.close()


def test_serve_refuses_a_socket_directory_inside_a_world_writable_parent(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "private").mkdir(mode=0o700)
    result = subprocess.run(
        [sys.executable, "-m", "akidb_embed", "serve", "--socket", str(shared / "private" / "s")],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=60,  # accepted, it would serve until killed
    )
    assert result.returncode == 1, result.stderr
    assert f"{shared}, above the socket directory" in result.stderr
    assert "world-writable without the sticky bit" in result.stderr
