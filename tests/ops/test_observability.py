"""Metrics count what happened, per server; request ids reach the client and every log line."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from akidb_embed.api.server import ServerConfig
from akidb_embed.observability.logs import REQUEST_ID, JsonFormatter, RequestIdFilter
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread
from tests.ops.conftest import handled, scrape, value

MODEL = "all-minilm-l6-v2"


@pytest.fixture()
def channel(ops_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix:{ops_server.target}") as opened:
        yield opened


def delta(after: dict, before: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_count_calls_by_code_texts_and_tokens(
    ops_server: ServerThread, channel: grpc.Channel
) -> None:
    stub = pb_grpc.EmbeddingServiceStub(channel)
    before = scrape(ops_server)

    ok = stub.Embed(pb.EmbedRequest(texts=["one text", "and another one"]), timeout=60)
    for request, code in (
        (pb.EmbedRequest(texts=[]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EmbedRequest(texts=["x"], model="nope"), grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(request, timeout=60)
        assert info.value.code() == code
    with pytest.raises(grpc.RpcError):
        channel.unary_unary("/akidb.embedding.v1.EmbeddingService/Embed")(b"\xff\xff", timeout=60)
    items = [  # one message of two items (one bad), then one of one
        pb.EmbedStreamRequest(ids=["a", "b"], texts=["first", ""]),
        pb.EmbedStreamRequest(ids=["c"], texts=["x"]),
    ]
    streamed = list(stub.EmbedStream(iter(items), timeout=60))
    with pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="nope"), timeout=60
        )

    after = scrape(ops_server)
    for method, code, count in (
        ("Embed", "OK", 1),
        ("Embed", "INVALID_ARGUMENT", 2),  # the empty list and the bytes that do not parse
        ("Embed", "NOT_FOUND", 1),
        ("EmbedStream", "OK", 1),
        ("Check", "NOT_FOUND", 1),
    ):
        assert handled(after, method, code) - handled(before, method, code) == count, method
    assert delta(after, before, "akidb_embed_stream_items_total", code="OK") == 2
    assert delta(after, before, "akidb_embed_stream_items_total", code="INVALID_ARGUMENT") == 1

    # Tokens embedded = what the responses report; rate() of this counter is tokens/s.
    tokens = ok.total_tokens + sum(sum(r.embeddings.token_counts) for r in streamed)
    assert delta(after, before, "akidb_embed_tokens_total", model=MODEL) == tokens
    assert delta(after, before, "akidb_embed_texts_total", model=MODEL) == 4
    padded = delta(after, before, "akidb_embed_padded_tokens_total", model=MODEL)
    assert padded >= tokens
    # Tokenised once per call or stream message that got that far; batches timed on the
    # compute thread.
    assert delta(after, before, "akidb_embed_tokenize_seconds_count", model=MODEL) == 3
    batches = delta(after, before, "akidb_embed_compute_seconds_count", model=MODEL)
    assert batches >= 1
    assert delta(after, before, "akidb_embed_queue_seconds_count", model=MODEL) == batches
    assert delta(after, before, "akidb_embed_batch_size_sum", model=MODEL) == 4
    labels = ("unary", "akidb.embedding.v1.EmbeddingService", "Embed")
    latency = dict(zip(("grpc_type", "grpc_service", "grpc_method"), labels, strict=True))
    assert delta(after, before, "grpc_server_handling_seconds_count", **latency) == 4

    # State read at scrape time.
    with EmbedClient(ops_server.target, timeout=60) as client:
        memory = {m.name: m.memory_bytes for m in client.list_models() if m.memory_bytes}
    assert memory[MODEL] > 0
    assert value(after, "akidb_embed_model_memory_bytes", model=MODEL) == memory[MODEL]
    assert value(after, "akidb_embed_models_loaded") == len(memory)
    assert value(after, "akidb_embed_model_load_seconds_count", model=MODEL) == 1
    assert value(after, "akidb_embed_model_loads_total", model=MODEL, outcome="ok") == 1
    assert value(after, "akidb_embed_queue_items") == 0
    assert value(after, "akidb_embed_queue_tokens") == 0
    assert value(after, "akidb_embed_serving") == 1
    assert value(after, "process_resident_memory_bytes") > 100 * 2**20
    build = [labels for (name, labels) in after if name == "akidb_embed_build_info"]
    assert build and dict(build[0])["version"]


def test_each_server_has_its_own_registry_and_a_loopback_endpoint(
    ops_server: ServerThread, server: ServerThread, tmp_path: Path
) -> None:
    assert server.server is not None and server.server.metrics_endpoint is None  # opt-in
    endpoint = ops_server.server.metrics_endpoint  # type: ignore[union-attr]
    assert endpoint is not None and endpoint.host == "127.0.0.1"
    socket_dir = tmp_path / "run"
    socket_dir.mkdir(mode=0o700)
    other = ServerThread(ServerConfig(socket_path=socket_dir / "embed.sock", metrics_port=0))
    other.start()
    try:
        with EmbedClient(other.target, timeout=60) as client:
            client.embed(["only on the second server"])
        mine = scrape(other)
        assert other.server is not None and other.server.metrics_endpoint is not None
        assert other.server.metrics_endpoint.port != endpoint.port
        assert handled(mine, "Embed", "OK") == 1  # counts start at zero in its registry
        assert value(mine, "akidb_embed_texts_total", model=MODEL) == 1
    finally:
        other.stop()


def echoed_id(call: grpc.Call) -> str:
    ids = [v for k, v in call.initial_metadata() or () if k == "x-request-id"]
    assert len(ids) == 1, call.initial_metadata()
    return str(ids[0])


def test_request_id_is_echoed_or_generated(channel: grpc.Channel) -> None:
    stub = pb_grpc.EmbeddingServiceStub(channel)
    request = pb.EmbedRequest(texts=["hi"])
    _, call = stub.Embed.with_call(request, metadata=[("x-request-id", "db-query-42")], timeout=60)
    assert echoed_id(call) == "db-query-42"
    generated = set()
    for metadata in ([], [("x-request-id", "has spaces")], [("x-request-id", "x" * 200)]):
        _, call = stub.Embed.with_call(request, metadata=metadata, timeout=60)
        generated.add(echoed_id(call))
    assert len(generated) == 3 and all(re.fullmatch("[0-9a-f]{16}", g) for g in generated)
    # Failed calls carry it too, so a client can quote it when it reports the error.
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(), metadata=[("x-request-id", "bad-1")], timeout=60)
    assert echoed_id(info.value) == "bad-1"  # type: ignore[arg-type]


def test_every_log_line_of_a_request_carries_its_id(
    ops_server: ServerThread, channel: grpc.Channel
) -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("akidb_embed")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        # Loading a model logs from the service; the access line comes from the interceptor.
        with pytest.raises(grpc.RpcError):
            stub.Embed(
                pb.EmbedRequest(texts=["x"], model="broken-truncated"),
                metadata=[("x-request-id", "trace-load-7")],
                timeout=60,
            )
        stub.Embed(pb.EmbedRequest(texts=["y"]), metadata=[("x-request-id", "other-8")])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    mine = [line for line in lines if line.get("request_id") == "trace-load-7"]
    loggers = {line["logger"] for line in mine}
    assert {"akidb_embed.service.service", "akidb_embed.access"} <= loggers, lines
    assert any("FAILED_PRECONDITION" in line["message"] for line in mine)
    for line in lines:
        if "broken-truncated" in line["message"]:
            assert line.get("request_id") == "trace-load-7", line
    assert any(line.get("request_id") == "other-8" for line in lines)


def test_json_formatter_fields_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info)
    record.model = "m"  # an `extra=` field
    token = REQUEST_ID.set("rid-9")
    try:
        out = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert out["message"] == "failed here"
    assert out["level"] == "ERROR" and out["logger"] == "t"
    assert out["request_id"] == "rid-9"
    assert out["model"] == "m"
    assert "ValueError: boom" in out["exc"]
    assert out["time"].endswith("+00:00")
