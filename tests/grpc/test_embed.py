"""Round trips of every RPC against a real in-process server over its Unix socket."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from akidb_embed_client import AsyncEmbedClient, EmbedClient, EmbedClientError
from tests.conftest import ServerThread

TEXTS = [
    "The cat sat on the mat.",
    "Vector databases index embeddings for similarity search.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "短い日本語の文です。",
    "🙂 emoji and symbols ∑∫√",
]
LONG_TEXT = " ".join(f"word{i}" for i in range(600))


@pytest.fixture(scope="module")
def client(server: ServerThread) -> EmbedClient:
    return EmbedClient(server.target, timeout=60)


def expect_error(code: grpc.StatusCode, fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(EmbedClientError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert info.value.code == code, info.value
    assert info.value.message
    return info.value.message


def test_client_refuses_a_bare_string_and_unknown_options(client: EmbedClient) -> None:
    with pytest.raises(TypeError, match=r"embed\(\[text\]\)"):
        client.embed("hello")
    with pytest.raises(TypeError, match="dimension"):
        client.embed(["hello"], dimension=32)  # type: ignore[call-arg]
    assert client.timeout == 60


def test_embed_returns_one_unit_vector_per_text_in_order(client: EmbedClient) -> None:
    result = client.embed(TEXTS)
    assert result.vectors.shape == (len(TEXTS), 384)
    assert result.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-5)
    assert result.model == "all-minilm-l6-v2"
    assert result.space.dimensions == 384
    assert result.space.pooling == "mean"
    assert result.space.normalized
    assert len(result.space.fingerprint) == 16
    assert all(count > 2 for count in result.token_counts)
    # Order: the same texts reversed come back reversed.
    reverse = client.embed(TEXTS[::-1])
    np.testing.assert_allclose(reverse.vectors[::-1], result.vectors, atol=1e-5)
    # Distinct texts give distinct vectors.
    sims = result.vectors @ result.vectors.T
    assert (sims[~np.eye(len(TEXTS), dtype=bool)] < 0.99).all()


def test_vector_is_the_same_alone_or_in_a_batch(client: EmbedClient) -> None:
    batch = client.embed([*TEXTS, LONG_TEXT]).vectors
    for index, text in enumerate(TEXTS):
        alone = client.embed([text]).vectors[0]
        np.testing.assert_allclose(alone, batch[index], atol=1e-5)


def test_semantics_similar_texts_are_closer(client: EmbedClient) -> None:
    v = client.embed(["A man is eating food.", "A man eats a meal.", "The stock market fell."])
    sims = v.vectors @ v.vectors.T
    assert sims[0, 1] > sims[0, 2] + 0.3


def test_raw_request_total_tokens_and_wire_format(server: ServerThread) -> None:
    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        response = stub.Embed(pb.EmbedRequest(texts=["hello", "hello world"]), timeout=30)
    batch = response.embeddings
    assert batch.dimensions == 384
    assert len(batch.vectors) == 2 * 384 * 4  # both rows in one little-endian float32 buffer
    rows = np.frombuffer(batch.vectors, "<f4").reshape(2, 384)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert response.total_tokens == sum(batch.token_counts)
    assert list(batch.token_counts) == [3, 4]  # [CLS] ... [SEP]
    assert list(batch.truncated) == [False, False]


def test_truncation_policies(client: EmbedClient) -> None:
    end = client.embed([LONG_TEXT])
    assert end.truncated == [True]
    assert end.token_counts == [256]
    start = client.embed([LONG_TEXT], truncation="start")
    assert start.truncated == [True] and start.token_counts == [256]
    assert float(end.vectors[0] @ start.vectors[0]) < 0.999
    short = client.embed(["short"], truncation="error")
    assert short.truncated == [False]
    message = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, client.embed, ["ok", LONG_TEXT], truncation="error"
    )
    assert "texts[1]" in message and "256" in message


def test_dimensions(client: EmbedClient) -> None:
    assert client.embed(["x"], dimensions=384).vectors.shape == (1, 384)
    message = expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.embed, ["x"], dimensions=100)
    assert "dimensions=100" in message
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.embed, ["x"], dimensions=4096)


def test_normalize_false_keeps_the_raw_pooled_vector(client: EmbedClient) -> None:
    raw = client.embed(["hello there"], normalize=False).vectors[0]
    unit = client.embed(["hello there"]).vectors[0]
    assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3
    np.testing.assert_allclose(raw / np.linalg.norm(raw), unit, atol=1e-6)


def test_prompts(client: EmbedClient) -> None:
    plain = client.embed(["capital of France"]).vectors[0]
    prefixed = client.embed(["capital of France"], prompt="query: ").vectors[0]
    same = client.embed(["query: capital of France"]).vectors[0]
    np.testing.assert_allclose(prefixed, same, atol=1e-6)
    assert float(plain @ prefixed) < 0.9999
    message = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, client.embed, ["x"], prompt_name="query"
    )
    assert "no prompt named 'query'" in message
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.embed, ["x"], instruction="find docs")


def test_bad_requests_get_precise_statuses(client: EmbedClient) -> None:
    assert "unknown model" in expect_error(
        grpc.StatusCode.NOT_FOUND, client.embed, ["x"], model="no-such-model"
    )
    assert "empty" in expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.embed, [])
    assert "texts[1] is empty" in expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, client.embed, ["a", "", "b"]
    )
    # The server is still fine afterwards.
    assert client.embed(["still alive"]).vectors.shape == (1, 384)


def test_list_models(client: EmbedClient) -> None:
    models = {m.name: m for m in client.list_models()}
    minilm = models["all-minilm-l6-v2"]
    assert minilm.state == "loaded"
    assert minilm.is_default
    assert minilm.dimensions == 384
    assert minilm.max_tokens == 256
    assert minilm.pooling == "mean"
    assert minilm.architecture == "bert"
    assert minilm.dtype == "float32"
    assert minilm.memory_bytes > 80_000_000
    assert minilm.size_on_disk_bytes > minilm.memory_bytes
    assert minilm.revision


def test_health_rpcs(server: ServerThread, client: EmbedClient) -> None:
    health = client.health()
    assert health.status == "SERVING" and health.serving
    assert health.limits.max_texts_per_request == 1024
    assert health.limits.stream_window == 4096
    assert health.limits.max_message_bytes == 64 * 1024 * 1024
    assert health.version
    assert health.uptime_seconds > 0
    assert health.backend.startswith(("cpu", "gpu"))
    assert [(m.name, m.status) for m in health.models] == [("all-minilm-l6-v2", "SERVING")]
    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "akidb.embedding.v1.EmbeddingService", "all-minilm-l6-v2"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_does_not_walk_the_model_cache(
    server: ServerThread, client: EmbedClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe answers from memory: walking the cache took 1.5 ms of the event loop per
    call, which every query behind it waited for."""
    assert server.server is not None
    registry = server.server.service.registry

    def no_disk(*_: object, **__: object) -> None:
        raise AssertionError("Health touched the model cache")

    monkeypatch.setattr(registry, "locate", no_disk)
    monkeypatch.setattr(registry, "entries", no_disk)
    health = client.health()
    assert health.serving
    assert [(m.name, m.status) for m in health.models] == [("all-minilm-l6-v2", "SERVING")]


def test_stream_echoes_ids_in_order_with_per_item_errors(client: EmbedClient) -> None:
    items = [(f"id-{i}", f"document number {i}") for i in range(50)]
    items[10] = ("bad-empty", "")
    items[20] = ("bad-long", "x" * 300_000)
    results = list(client.embed_stream(items))
    assert [r.id for r in results] == [item_id for item_id, _ in items]
    assert results[10].error is not None
    assert results[10].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert results[20].error is not None and "characters" in results[20].error.message
    good = [r for r in results if r.error is None]
    assert len(good) == 48
    unary = client.embed([items[0][1], items[49][1]]).vectors
    assert results[0].vector is not None and results[49].vector is not None
    np.testing.assert_allclose(results[0].vector, unary[0], atol=1e-5)
    np.testing.assert_allclose(results[49].vector, unary[1], atol=1e-5)
    assert results[0].space is not None and results[0].space.dimensions == 384


def item(item_id: str, text: str, **fields: object) -> pb.EmbedStreamRequest:
    return pb.EmbedStreamRequest(ids=[item_id], texts=[text], **fields)  # type: ignore[arg-type]


def test_stream_unknown_model_and_sticky_options(server: ServerThread) -> None:
    requests = [
        item("a", "hello", model="nope"),
        item("b", "hello"),  # still "nope": model is sticky
        item("c", "hello", model="all-minilm-l6-v2", options=pb.EmbedOptions(dimensions=7)),
        item("d", "hello", options=pb.EmbedOptions(normalize=False)),
        item("e", "hello again"),  # same space as d: not sent again
        item("f", "hello", options=pb.EmbedOptions()),  # back to normalised: a new space
    ]
    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        responses = list(stub.EmbedStream(iter(requests), timeout=30))
    assert [list(r.ids) for r in responses] == [[x] for x in "abcdef"]
    codes = [[e.code for e in r.errors] for r in responses[:3]]
    assert codes == [[grpc.StatusCode.NOT_FOUND.value[0]]] * 2 + [
        [grpc.StatusCode.INVALID_ARGUMENT.value[0]]
    ]
    assert not any(r.HasField("space") for r in responses[:3])  # no vectors, no space
    assert responses[3].embeddings.dimensions == 384 and not responses[3].errors
    assert not responses[3].space.normalized
    assert not responses[4].HasField("space")
    assert responses[5].space.normalized
    assert responses[5].space.fingerprint != responses[3].space.fingerprint


def test_stream_message_with_many_items_gets_one_response(server: ServerThread) -> None:
    texts = [f"grouped text {i}" for i in range(40)]
    texts[7] = ""
    request = pb.EmbedStreamRequest(ids=[f"g{i}" for i in range(40)], texts=texts)
    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        [response] = list(stub.EmbedStream(iter([request]), timeout=30))
        unary = stub.Embed(pb.EmbedRequest(texts=texts[:7] + texts[8:]), timeout=30)
    assert list(response.ids) == [f"g{i}" for i in range(40)]
    assert [(e.index, e.code) for e in response.errors] == [
        (7, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    ]
    rows = np.frombuffer(response.embeddings.vectors, "<f4").reshape(39, 384)
    expected = np.frombuffer(unary.embeddings.vectors, "<f4").reshape(39, 384)
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    assert list(response.embeddings.token_counts) == list(unary.embeddings.token_counts)


def test_a_burst_of_one_item_messages_gets_one_response_each(server: ServerThread) -> None:
    """The server coalesces a backlog of small messages into one engine group; each message
    still gets its own response with its own ids, errors indexed within it, and the space
    whenever it changes."""
    texts = [f"burst text number {i}" for i in range(240)]
    raw = pb.EmbedOptions(normalize=False)
    requests = []
    for i, text in enumerate(texts):
        if i % 17 == 5:
            text = ""
        fields: dict[str, object] = {}
        if i == 120:
            fields["options"] = raw
        if i == 180:
            fields["options"] = pb.EmbedOptions()
        requests.append(item(f"b{i}", text, **fields))
    requests.insert(60, pb.EmbedStreamRequest(ids=["two-a", "two-b"], texts=["", "pair text"]))
    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        responses = list(stub.EmbedStream(iter(requests), timeout=60))
        good = [t for i, t in enumerate(texts) if i % 17 != 5]
        unit = stub.Embed(pb.EmbedRequest(texts=good), timeout=60)
        pooled = stub.Embed(pb.EmbedRequest(texts=good, options=raw), timeout=60)
    assert [list(r.ids) for r in responses] == [list(r.ids) for r in requests]
    pair = responses.pop(60)
    assert [e.index for e in pair.errors] == [0]
    assert np.frombuffer(pair.embeddings.vectors, "<f4").shape == (384,)
    expected_unit = np.frombuffer(unit.embeddings.vectors, "<f4").reshape(-1, 384)
    expected_raw = np.frombuffer(pooled.embeddings.vectors, "<f4").reshape(-1, 384)
    row = 0
    spaces = []
    for i, response in enumerate(responses):
        if response.HasField("space"):
            spaces.append((i, response.space.normalized))
        if i % 17 == 5:
            assert [(e.index, e.code) for e in response.errors] == [
                (0, grpc.StatusCode.INVALID_ARGUMENT.value[0])
            ]
            assert not response.embeddings.vectors
            continue
        assert not response.errors
        vector = np.frombuffer(response.embeddings.vectors, "<f4")
        expected = expected_raw if 120 <= i < 180 else expected_unit
        np.testing.assert_allclose(vector, expected[row], atol=1e-5)
        assert list(response.embeddings.token_counts) == [unit.embeddings.token_counts[row]]
        row += 1
    assert row == len(good)
    assert spaces == [(0, True), (120, False), (180, True)]


def test_stream_message_with_mismatched_ids_fails_the_stream(server: ServerThread) -> None:
    request = pb.EmbedStreamRequest(ids=["a", "b"], texts=["only one"])
    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.EmbedStream(iter([request]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 ids and 1 texts" in (info.value.details() or "")


def test_client_cancelling_a_stream_leaves_the_server_healthy(
    server: ServerThread, client: EmbedClient
) -> None:
    def endless() -> object:
        i = 0
        while True:
            yield item(str(i), f"text {i} " * 20)
            i += 1

    with grpc.insecure_channel(f"unix:{server.target}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        call = stub.EmbedStream(endless(), timeout=60)
        received = [next(call) for _ in range(5)]
        call.cancel()
    assert [list(r.ids) for r in received] == [["0"], ["1"], ["2"], ["3"], ["4"]]
    assert client.health().serving
    assert client.embed(["after cancel"]).vectors.shape == (1, 384)


def test_deadline_exceeded(client: EmbedClient) -> None:
    expect_error(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        client.embed,
        [f"text {i} " * 100 for i in range(500)],
        timeout=0.05,
    )
    assert client.embed(["after deadline"]).vectors.shape == (1, 384)


async def test_async_client(server: ServerThread) -> None:
    async with AsyncEmbedClient(server.target, timeout=60) as client:
        result = await client.embed(TEXTS[:2])
        assert result.vectors.shape == (2, 384)

        async def items() -> object:
            for i in range(20):
                yield (f"x{i}", f"async item {i}")

        got = [r async for r in client.embed_stream(items())]  # type: ignore[arg-type]
        assert [r.id for r in got] == [f"x{i}" for i in range(20)]
        assert (await client.health()).status == "SERVING"
        assert await client.check() == "SERVING"
        assert any(m.name == "all-minilm-l6-v2" for m in await client.list_models())


def test_stream_client_bounds_items_in_flight(client: EmbedClient) -> None:
    produced = 0

    def items() -> object:
        nonlocal produced
        for i in range(40):
            produced += 1
            yield (str(i), f"bounded item {i}")

    stream = client.embed_stream(items(), max_in_flight=4)  # type: ignore[arg-type]
    first = next(stream)
    assert first.id == "0"
    # One answer received: at most 4 + 1 items can have been taken from the iterable.
    assert produced <= 5
    rest = list(stream)
    assert [r.id for r in rest] == [str(i) for i in range(1, 40)]
