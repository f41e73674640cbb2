"""Bad input, fuzzed over the real gRPC API: every answer is OK or a precise status with a
message (never INTERNAL or UNKNOWN), and the server stays SERVING."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc
from tests.conftest import ServerThread
from tests.ops.conftest import PRECISE

MODEL = "all-minilm-l6-v2"
DIM = 384
MAX_TOKENS = 256
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Any unicode scalar value: control characters, astral planes, unassigned code points.
# (Lone surrogates cannot travel: protobuf strings are UTF-8.)
CHARS = st.characters(codec="utf-8")
TEXT = st.text(CHARS, max_size=48) | st.sampled_from(
    ["\x00", "\x00\x01\x1f\x7f", "\u200b" * 5, "\ufeff", " ", "\n\t", "𝕳𝖊𝖑𝖑𝖔 🧪", "\U0010ffff"]
)
UINT32 = st.integers(0, 2**32 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
MODEL_NAME = st.sampled_from(["", MODEL, "nope", "../../etc/passwd", "/tmp", "org/name@main"]) | (
    st.text(CHARS, max_size=20)
)


# Per encoding: the buffer's dtype and its values per row of D dimensions.
ROWS = {
    pb.ENCODING_FLOAT32: ("<f4", lambda d: d),
    pb.ENCODING_FLOAT16: ("<f2", lambda d: d),
    pb.ENCODING_INT8: ("i1", lambda d: d),
    pb.ENCODING_UINT8: ("u1", lambda d: d),
    pb.ENCODING_BINARY: ("i1", lambda d: (d + 7) // 8),
    pb.ENCODING_UBINARY: ("u1", lambda d: (d + 7) // 8),
}


@st.composite
def options(draw: st.DrawFn) -> pb.EmbedOptions:
    out = pb.EmbedOptions(
        dimensions=draw(st.sampled_from([0, DIM, 128, 2**32 - 1]) | UINT32),
        # Open enum: any int32 travels, known or not.
        truncation=draw(st.sampled_from([0, 1, 2, 3, -1, 4, 5, 2**31 - 1]) | INT32),
        encoding=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, -1]) | INT32),
        chunk_tokens=draw(st.sampled_from([0, 0, 8, 2**32 - 1]) | UINT32),
        chunk_overlap_tokens=draw(st.sampled_from([0, 0, 2, 2**32 - 1]) | UINT32),
    )
    normalize = draw(st.none() | st.booleans())
    if normalize is not None:
        out.normalize = normalize
    prompt = draw(st.sampled_from([None, "prompt_name", "prompt", "instruction"]))
    if prompt is not None:
        setattr(out, prompt, draw(TEXT))
    return out


@pytest.fixture(scope="module")
def stub(ops_server: ServerThread) -> Iterator[pb_grpc.EmbeddingServiceStub]:
    with grpc.insecure_channel(f"unix:{ops_server.target}") as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


@pytest.fixture(scope="module")
def channel(ops_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix:{ops_server.target}") as raw:
        yield raw


def assert_precise(error: grpc.RpcError) -> None:
    assert error.code() in PRECISE, (error.code(), error.details())
    assert error.details(), error.code()  # every status says what to change


def assert_embeddings(response: pb.EmbedResponse, texts: list[str], dims: int) -> None:
    batch = response.embeddings
    dtype, per_row = ROWS[batch.encoding]
    vectors = np.frombuffer(batch.vectors, dtype=dtype)
    rows = sum(batch.chunk_counts) if batch.chunk_counts else len(texts)
    assert batch.dimensions == dims and vectors.shape == (rows * per_row(dims),)
    assert len(batch.token_counts) == len(batch.truncated) == rows
    assert len(batch.chunk_counts) in (0, len(texts))
    assert np.isfinite(vectors.astype(np.float32)).all()
    assert all(2 <= count <= MAX_TOKENS for count in batch.token_counts)


@FUZZ
@given(
    texts=st.lists(TEXT, max_size=4),
    model=st.sampled_from(["", MODEL]) | MODEL_NAME,
    opts=options(),
)
@example(texts=["\x00"], model="", opts=pb.EmbedOptions())
@example(texts=["🧪" * 40], model=MODEL, opts=pb.EmbedOptions(truncation=99))
@example(texts=["x"], model="", opts=pb.EmbedOptions(dimensions=2**32 - 1))
@example(texts=["x"], model="", opts=pb.EmbedOptions(truncation=-5))
def test_embed_any_texts_and_options(
    stub: pb_grpc.EmbeddingServiceStub, texts: list[str], model: str, opts: pb.EmbedOptions
) -> None:
    request = pb.EmbedRequest(model=model, texts=texts, options=opts)
    try:
        response = stub.Embed(request, timeout=120)
    except grpc.RpcError as error:
        assert_precise(error)
        return
    assert_embeddings(response, texts, opts.dimensions or DIM)


@FUZZ
@given(
    items=st.lists(
        st.tuples(st.text(CHARS, max_size=8), TEXT, st.none() | MODEL_NAME, st.none() | options()),
        min_size=1,
        max_size=6,
    )
)
def test_stream_any_items(
    stub: pb_grpc.EmbeddingServiceStub,
    items: list[tuple[str, str, str | None, pb.EmbedOptions | None]],
) -> None:
    requests = []
    for index, (item_id, text, model, opts) in enumerate(items):
        # Items go one per message, or join the previous message when it sets nothing.
        if requests and model is None and opts is None and index % 2:
            requests[-1].ids.append(item_id)
            requests[-1].texts.append(text)
            continue
        request = pb.EmbedStreamRequest(ids=[item_id], texts=[text])
        if model is not None:
            request.model = model
        if opts is not None:
            request.options.CopyFrom(opts)
        requests.append(request)
    responses = list(stub.EmbedStream(iter(requests), timeout=120))
    # One answer per message, one result per item, in order: a vector or a precise error.
    assert [list(r.ids) for r in responses] == [list(r.ids) for r in requests]
    dims = 0
    for response in responses:
        failed = {e.index for e in response.errors}
        for error in response.errors:
            code = next(c for c in grpc.StatusCode if c.value[0] == error.code)
            assert code in PRECISE and code != grpc.StatusCode.OK, error
            assert error.message and error.index < len(response.ids)
        if response.HasField("space"):
            dims = response.space.dimensions
        batch = response.embeddings
        dtype, per_row = ROWS[batch.encoding]
        vectors = np.frombuffer(batch.vectors, dtype=dtype)
        ok = len(response.ids) - len(failed)
        assert len(batch.chunk_counts) in (0, ok)
        rows = sum(batch.chunk_counts) if batch.chunk_counts else ok
        assert vectors.shape == (rows * per_row(dims),)
        assert np.isfinite(vectors.astype(np.float32)).all()


VALID = pb.EmbedRequest(model=MODEL, texts=["a valid text"]).SerializeToString()


@FUZZ
@given(
    payload=st.binary(max_size=256)
    | st.builds(
        lambda i, b: VALID[:i] + bytes([b]) + VALID[i + 1 :],
        st.integers(0, len(VALID) - 1),
        st.integers(0, 255),
    )
    | st.builds(lambda n: VALID[:n], st.integers(0, len(VALID))),
    method=st.sampled_from(["Embed", "ListModels", "Health"]),
)
@example(payload=b"\x12\x02\xff\xfe", method="Embed")  # texts: invalid UTF-8
@example(payload=b"\x10\x05", method="Embed")  # texts (a string) sent as a varint
@example(payload=b"\xff\xff\xff\xff", method="Embed")
def test_raw_bytes_on_the_wire(channel: grpc.Channel, payload: bytes, method: str) -> None:
    # No serializers: the bytes go out exactly as drawn.
    call = channel.unary_unary(f"/akidb.embedding.v1.EmbeddingService/{method}")
    try:
        call(payload, timeout=120)
    except grpc.RpcError as error:
        assert_precise(error)


@FUZZ
@given(payloads=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_raw_bytes_in_a_stream(channel: grpc.Channel, payloads: list[bytes]) -> None:
    call = channel.stream_stream("/akidb.embedding.v1.EmbeddingService/EmbedStream")
    try:
        responses = list(call(iter(payloads), timeout=120))
    except grpc.RpcError as error:
        assert_precise(error)
        return
    assert len(responses) == len(payloads)  # every message parsed, every item answered


@pytest.mark.parametrize(
    "text", ["\x00", "\x01\x02\x1b[31m\x7f", "𝕳𝖊𝖑𝖑𝖔 🧪 \U0001f600", "\U0010ffff", " ", "\u200b"]
)
def test_control_and_astral_characters_are_embedded(
    stub: pb_grpc.EmbeddingServiceStub, text: str
) -> None:
    response = stub.Embed(pb.EmbedRequest(texts=[text]), timeout=120)
    assert_embeddings(response, [text], DIM)


def test_huge_inputs(stub: pb_grpc.EmbeddingServiceStub, channel: grpc.Channel) -> None:
    # The longest text allowed is embedded (truncated to the model's window)...
    response = stub.Embed(pb.EmbedRequest(texts=["word " * 40_000]), timeout=120)
    assert list(response.embeddings.truncated) == [True]
    assert list(response.embeddings.token_counts) == [MAX_TOKENS]
    # ...one character more is refused, and so is one text too many.
    for texts, says in (
        (["x" * 200_001], "200001 characters"),
        (["x"] * 1025, "1025 texts"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(texts=texts), timeout=120)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert says in (info.value.details() or "")
    # The most texts allowed in one call all come back.
    many = stub.Embed(pb.EmbedRequest(texts=["a"] * 1024), timeout=300)
    assert len(many.embeddings.token_counts) == 1024
    # A message over the server's size limit is refused before any work.
    raw = channel.unary_unary("/akidb.embedding.v1.EmbeddingService/Embed")
    huge = pb.EmbedRequest(texts=["y" * 1_000_000] * 70).SerializeToString()
    with pytest.raises(grpc.RpcError) as info:
        raw(huge, timeout=120)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()


def test_still_serving_after_the_fuzzing(ops_server: ServerThread) -> None:
    from akidb_embed_client import EmbedClient

    with EmbedClient(ops_server.target, timeout=60) as client:
        assert client.check() == "SERVING"
        assert client.health().serving
        assert client.embed(["after fuzzing"]).vectors.shape == (1, DIM)
