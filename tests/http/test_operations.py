"""HTTP in operations: its traffic in the metrics, a client that hangs up, the drain on
stop and on SIGTERM (uvicorn must not take the server's signals), and the flags."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import openai
import pytest

from akidb_embed.api.http_api import ApiKeyError, load_api_keys
from akidb_embed.api.server import ServerConfig
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread
from tests.http.conftest import MODEL, http, openai_client
from tests.ops.conftest import ServerProcess, scrape, server_env, value

TEXTS = [f"document {i}: " + "words about vector search and embeddings " * 5 for i in range(200)]


def wait_for(condition: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.005)


@contextlib.contextmanager
def compute_held(server: ServerThread) -> Iterator[None]:
    """Keep the compute thread busy until the block ends: texts wait in the queue."""
    assert server.server is not None
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(120)

    future = server.server.scheduler.call(hold)
    assert held.wait(30)
    try:
        yield
    finally:
        release.set()
        future.result(30)


def tokenized_calls(server: ServerThread) -> float:
    """Embed calls tokenised so far: a call's texts are queued right after."""
    assert server.server is not None
    sample = server.server.metrics.registry.get_sample_value(
        "akidb_embed_tokenize_seconds_count", {"model": MODEL}
    )
    return sample or 0.0


def requests_of(samples: dict, route: str, status: str, method: str = "POST") -> float:  # type: ignore[type-arg]
    return value(samples, "http_requests_total", method=method, route=route, status=status)


def test_http_traffic_shows_in_the_metrics(
    http_server: ServerThread, client: openai.OpenAI
) -> None:
    before = scrape(http_server)
    first = client.embeddings.create(input=["one text", "and another one"], model=MODEL)
    second = client.embeddings.create(input=[[101, 7592, 102]], model=MODEL)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(input="x", model="nope")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(input=[], model=MODEL)
    client.models.list()
    assert http(http_server, "GET", "/health")[0] == 200
    assert http(http_server, "GET", "/wp-login.php")[0] == 404
    after = scrape(http_server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for route, status, method, count in (
        ("/v1/embeddings", "200", "POST", 2),
        ("/v1/embeddings", "404", "POST", 1),
        ("/v1/embeddings", "400", "POST", 1),
        ("/v1/models", "200", "GET", 1),
        ("/health", "200", "GET", 1),
        ("unmatched", "404", "GET", 1),
    ):
        got = requests_of(after, route, status, method) - requests_of(before, route, status, method)
        assert got == count, (route, status, got)
    seconds = {"method": "POST", "route": "/v1/embeddings"}
    assert delta("http_request_duration_seconds_count", **seconds) == 4
    assert value(after, "http_requests_in_flight") == 0
    # The domain counters count HTTP work: texts and token ids alike.
    assert delta("akidb_embed_texts_total", model=MODEL) == 3
    tokens = first.usage.total_tokens + second.usage.total_tokens
    assert delta("akidb_embed_tokens_total", model=MODEL) == tokens
    # gRPC's counters saw none of it.
    embed_rpc = {
        "grpc_type": "unary",
        "grpc_service": "akidb.embedding.v1.EmbeddingService",
        "grpc_method": "Embed",
    }
    assert delta("grpc_server_started_total", **embed_rpc) == 0


def test_http_and_grpc_requests_share_one_batch(
    http_server: ServerThread, client: openai.OpenAI
) -> None:
    """Queries from both transports wait in the same queue and go out in one batch."""
    before = scrape(http_server)
    calls = tokenized_calls(http_server)
    results: dict[str, np.ndarray] = {}

    def over_http(i: int) -> None:
        response = client.embeddings.create(input=f"query number {i}", model=MODEL)
        results[f"http-{i}"] = np.array(response.data[0].embedding, dtype=np.float32)

    def over_grpc(i: int) -> None:
        with EmbedClient(http_server.target, timeout=60) as grpc_client:
            results[f"grpc-{i}"] = grpc_client.embed([f"query number {i}"]).vectors[0]

    threads = [
        threading.Thread(target=fn, args=(i,)) for i in range(4) for fn in (over_http, over_grpc)
    ]
    with compute_held(http_server):
        for thread in threads:
            thread.start()
        wait_for(lambda: tokenized_calls(http_server) >= calls + 8, what="8 queued queries")
    for thread in threads:
        thread.join(60)
    after = scrape(http_server)
    batches = value(after, "akidb_embed_batch_size_count", model=MODEL) - value(
        before, "akidb_embed_batch_size_count", model=MODEL
    )
    rows = value(after, "akidb_embed_batch_size_sum", model=MODEL) - value(
        before, "akidb_embed_batch_size_sum", model=MODEL
    )
    assert (batches, rows) == (1, 8)
    for i in range(4):
        # Same text, same batch, another row: BLAS kernels may round a row's sums by its
        # position in the matrix (seen with OpenBLAS's Haswell kernels), so not bit-equal.
        np.testing.assert_allclose(results[f"http-{i}"], results[f"grpc-{i}"], atol=1e-6)


def test_a_client_that_hangs_up_costs_no_more_compute(http_server: ServerThread) -> None:
    assert http_server.server is not None and http_server.server.http is not None
    before = scrape(http_server)
    calls = tokenized_calls(http_server)
    body = json.dumps({"input": TEXTS, "model": MODEL}).encode()
    front = http_server.server.http.front
    with compute_held(http_server):
        with socket.create_connection(("127.0.0.1", http_server.server.http.port), 30) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            wait_for(lambda: tokenized_calls(http_server) > calls, what="the texts to be queued")
        wait_for(lambda: front.in_flight == 0, what="the request to end")
    after = scrape(http_server)
    hung_up = requests_of(after, "/v1/embeddings", "499") - requests_of(
        before, "/v1/embeddings", "499"
    )
    assert hung_up == 1
    embedded = value(after, "akidb_embed_texts_total", model=MODEL) - value(
        before, "akidb_embed_texts_total", model=MODEL
    )
    assert embedded == 0, "texts of a closed connection were computed"
    wait_for(lambda: http_server.server.scheduler.queued_tokens == 0, what="the queue to empty")  # type: ignore[union-attr]


def test_stop_drains_http(socket_dir: Path) -> None:
    """On stop: /health 503 and new requests 503 at once; the request in flight finishes."""
    thread = ServerThread(ServerConfig(socket_path=socket_dir / "embed.sock", http_port=0))
    thread.start()
    assert thread.server is not None and thread.server.http is not None
    port = thread.server.http.port
    result: dict[str, object] = {}

    def big_request() -> None:
        with openai_client(thread) as client:
            result["response"] = client.embeddings.create(input=TEXTS, model=MODEL)

    with openai_client(thread) as client:
        reference = client.embeddings.create(input=[TEXTS[0], TEXTS[-1]], model=MODEL)
        calls = tokenized_calls(thread)
        in_flight = threading.Thread(target=big_request, daemon=True)
        stopping = threading.Thread(target=thread.stop, kwargs={"grace": 120}, daemon=True)
        with compute_held(thread):
            in_flight.start()
            wait_for(lambda: tokenized_calls(thread) > calls, what="the big request to be queued")
            stopping.start()
            wait_for(lambda: http(thread, "GET", "/health")[0] == 503, what="/health to say 503")
            _, headers, body = http(thread, "GET", "/health")
            assert body == {"status": "draining"} and headers["connection"] == "close"
            with pytest.raises(openai.InternalServerError) as info:
                client.embeddings.create(input="a new request", model=MODEL)
            assert info.value.status_code == 503 and info.value.code == "unavailable"
            assert "shutting down" in info.value.message
            assert info.value.response.headers["retry-after"] == "1"
            assert http(thread, "GET", "/v1/models")[0] == 503
            assert in_flight.is_alive() and stopping.is_alive()
    in_flight.join(300)
    stopping.join(300)
    assert not stopping.is_alive()
    response = result["response"]
    assert isinstance(response, openai.types.CreateEmbeddingResponse), result
    vectors = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert vectors.shape == (len(TEXTS), 384)
    expected = np.array([item.embedding for item in reference.data], dtype=np.float32)
    np.testing.assert_allclose(vectors[[0, -1]], expected, atol=1e-5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), 5).close()


def test_sigterm_drains_http_and_exits_0(tmp_path: Path) -> None:
    """`serve --http-port 0 --api-key-file`: the server's own handler gets SIGTERM."""
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o700)
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nsk-proc-1\n\nsk-proc-2\n")
    keys.chmod(0o600)
    server = ServerProcess(
        socket_dir / "embed.sock",
        tmp_path / "server.log",
        "--http-port",
        "0",
        "--api-key-file",
        str(keys),
    )
    result: dict[str, object] = {}
    try:
        server.wait_serving()
        found = re.search(r"OpenAI-compatible HTTP on (http://127\.0\.0\.1:\d+/v1)", server.log())
        assert found, server.log()
        url = found.group(1)
        with openai.OpenAI(base_url=url, api_key="sk-proc-2", max_retries=0) as client:
            assert len(client.embeddings.create(input="hi", model=MODEL).data) == 1
        with (
            openai.OpenAI(base_url=url, api_key="sk-nope", max_retries=0) as client,
            pytest.raises(openai.AuthenticationError),
        ):
            client.embeddings.create(input="hi", model=MODEL)

        def big_request() -> None:
            with openai.OpenAI(base_url=url, api_key="sk-proc-1", max_retries=0) as client:
                result["response"] = client.embeddings.create(input=TEXTS, model=MODEL)

        in_flight = threading.Thread(target=big_request, daemon=True)
        in_flight.start()
        metrics = server.metrics_url
        wait_for(
            lambda: (
                "akidb_embed_queue_tokens" in (text := _get(metrics)) and _http_in_flight(text) >= 1
            ),
            what="the big request to arrive",
        )
        time.sleep(0.5)
        server.terminate()
        in_flight.join(300)
        exit_code = server.wait(120)
    finally:
        server.close()
    log = server.log()
    assert exit_code == 0, log
    assert log.rstrip().endswith("stopped"), log
    response = result.get("response")
    assert isinstance(response, openai.types.CreateEmbeddingResponse), (result, log)
    assert len(response.data) == len(TEXTS)
    assert "Uvicorn" not in log and "uvicorn" not in log


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _http_in_flight(metrics_text: str) -> float:
    found = re.search(r"^http_requests_in_flight (\S+)$", metrics_text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "akidb_embed", "serve", *args],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=120,
    )


def test_serve_refuses_bad_http_flags(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-1\n")
    alone = run_serve("--api-key-file", str(keys))
    assert alone.returncode == 1 and "--api-key-file needs --http-port" in alone.stderr
    empty = tmp_path / "empty"
    empty.write_text("# no key yet\n\n")
    no_key = run_serve("--http-port", "0", "--api-key-file", str(empty))
    assert no_key.returncode == 1 and "holds no key" in no_key.stderr
    missing = run_serve("--http-port", "0", "--api-key-file", str(tmp_path / "absent"))
    assert missing.returncode == 1 and "cannot read the API key file" in missing.stderr


def test_a_taken_http_port_fails_the_start(socket_dir: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = run_serve("--socket", str(socket_dir / "e.sock"), "--http-port", str(port))
    assert out.returncode == 1, out.stderr
    assert f"cannot listen for HTTP on 127.0.0.1:{port}" in out.stderr
    assert "choose another --http-port" in out.stderr
    assert not (socket_dir / "e.sock").exists()


def test_grpc_and_http_share_one_service(http_server: ServerThread) -> None:
    assert http_server.server is not None and http_server.server.http is not None
    assert http_server.server.http.front.service is http_server.server.service
    with EmbedClient(http_server.target, timeout=60) as grpc_client:
        assert grpc_client.embed(["still fine"]).vectors.shape == (1, 384)


def test_responses_do_not_wait_for_delayed_acks(http_server: ServerThread) -> None:
    """Head and body go out in two writes: without TCP_NODELAY on the connection each
    keep-alive response would stall about 40 ms on the client's delayed ACK."""
    assert http_server.server is not None and http_server.server.http is not None
    connection = HTTPConnection("127.0.0.1", http_server.server.http.port, timeout=30)
    seconds = []
    try:
        for _ in range(31):
            started = time.perf_counter()
            connection.request("GET", "/health")
            assert connection.getresponse().read() == b'{"status":"serving"}'
            seconds.append(time.perf_counter() - started)
    finally:
        connection.close()
    assert sorted(seconds)[15] < 0.02, f"median {sorted(seconds)[15] * 1000:.1f} ms"


def test_api_key_file_format(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = tmp_path / "keys"
    keys.write_text("  # old keys first, then the new one\n\n  sk-old  \nsk-new\n")
    keys.chmod(0o600)
    assert load_api_keys(keys) == ("sk-old", "sk-new")
    assert "open to other users" not in caplog.text
    keys.chmod(0o644)
    assert load_api_keys(keys) == ("sk-old", "sk-new")
    assert "open to other users (mode 644): chmod 600 it" in caplog.text
    keys.write_text("# none\n")
    with pytest.raises(ApiKeyError, match="holds no key"):
        load_api_keys(keys)


def test_a_server_bug_is_500_with_the_request_id(
    http_server: ServerThread, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert http_server.server is not None

    def broken() -> list[object]:
        raise RuntimeError("a bug in statuses")

    monkeypatch.setattr(http_server.server.service, "statuses", broken)
    status, headers, body = http(
        http_server, "GET", "/v1/models", headers={"x-request-id": "bug-report-1"}
    )
    assert status == 500 and headers["x-request-id"] == "bug-report-1"
    assert body["error"]["code"] == "internal" and body["error"]["type"] == "server_error"
    assert "request id bug-report-1" in body["error"]["message"]
    wait_for(lambda: "a bug in statuses" in caplog.text, what="the traceback in the log")


def test_one_access_line_per_request(
    http_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="akidb_embed.access")
    body = {"input": ["a first text", "a second"], "model": MODEL}
    status, _, answer = http(
        http_server, "POST", "/v1/embeddings", body, headers={"x-request-id": "access-1"}
    )
    assert status == 200
    http(http_server, "GET", "/health", headers={"x-request-id": "probe-1"})

    def line(request_id: str) -> logging.LogRecord:
        found = [r for r in caplog.records if getattr(r, "request_id", "") == request_id]
        assert len(found) == 1, [r.getMessage() for r in caplog.records]
        return found[0]

    wait_for(lambda: any(getattr(r, "request_id", "") == "probe-1" for r in caplog.records))
    embed = line("access-1")
    assert embed.levelno == logging.INFO
    assert (embed.method, embed.status, embed.items) == ("POST /v1/embeddings", "200", 2)  # type: ignore[attr-defined]
    assert embed.tokens == answer["usage"]["total_tokens"]  # type: ignore[attr-defined]
    assert line("probe-1").levelno == logging.DEBUG
