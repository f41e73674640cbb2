"""The OpenAI-compatible API through the official openai client: the same vectors as gRPC,
base64 and float encodings, token id input, dimensions, models, /info and /health."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import openai
from tokenizers import Tokenizer

from akidb_embed.host.device import gpu_backend
from akidb_embed.runtime.workers import default_batch_tokens
from akidb_embed.store.registry import bundled_minilm_dir
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread
from tests.http.conftest import MODEL, http

TEXTS = [
    "The cat sat on the mat.",
    "Vector databases index embeddings for similarity search.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "短い日本語の文です。",
    "🙂 emoji and symbols ∑∫√",
]
LONG_TEXT = " ".join(f"word{i}" for i in range(600))

DOCUMENTS = [
    *TEXTS,
    "AkiDB stores vectors next to the rows they describe.",
    "Retrieval-augmented generation looks passages up before it answers.",
    LONG_TEXT,  # truncated at 256 tokens, like over gRPC
]


def as_array(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    return np.array([item.embedding for item in response.data], dtype=np.float32)


def grpc_embed(server: ServerThread, texts: list[str], **options: Any) -> Any:
    with EmbedClient(server.target, timeout=120) as grpc_client:
        return grpc_client.embed(texts, **options)


def test_vectors_are_identical_to_grpc(http_server: ServerThread, client: openai.OpenAI) -> None:
    expected = grpc_embed(http_server, DOCUMENTS)
    # The SDK asks for base64 when no encoding_format is given, and decodes it to floats.
    default = client.embeddings.create(input=DOCUMENTS, model=MODEL)
    as_floats = client.embeddings.create(input=DOCUMENTS, model=MODEL, encoding_format="float")
    for response in (default, as_floats):
        assert [item.index for item in response.data] == list(range(len(DOCUMENTS)))
        assert all(item.object == "embedding" for item in response.data)
        assert response.model == MODEL
        np.testing.assert_array_equal(as_array(response), expected.vectors)
        # usage counts the tokens embedded, special tokens included, as gRPC's total_tokens.
        assert response.usage.prompt_tokens == sum(expected.token_counts)
        assert response.usage.total_tokens == response.usage.prompt_tokens
    assert expected.token_counts[-1] == 256


def test_a_single_string_is_one_input(http_server: ServerThread, client: openai.OpenAI) -> None:
    response = client.embeddings.create(input="The cat sat on the mat.", model=MODEL)
    assert len(response.data) == 1 and len(response.data[0].embedding) == 384
    expected = grpc_embed(http_server, ["The cat sat on the mat."]).vectors
    np.testing.assert_array_equal(as_array(response), expected)
    np.testing.assert_allclose(np.linalg.norm(as_array(response)), 1.0, atol=1e-5)
    # model may be left empty: the server's default model.
    empty = client.embeddings.create(input="The cat sat on the mat.", model="")
    assert empty.model == MODEL
    np.testing.assert_array_equal(as_array(empty), expected)


def test_base64_is_little_endian_float32(http_server: ServerThread) -> None:
    body = {"input": TEXTS[:3], "model": MODEL, "encoding_format": "base64"}
    status, headers, encoded = http(http_server, "POST", "/v1/embeddings", body)
    assert status == 200 and headers["content-type"] == "application/json"
    _, _, floats = http(http_server, "POST", "/v1/embeddings", {**body, "encoding_format": "float"})
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(i["embedding"]), dtype="<f4") for i in encoded["data"]]
    )
    assert decoded.shape == (3, 384)
    np.testing.assert_array_equal(decoded, np.array([i["embedding"] for i in floats["data"]]))
    np.testing.assert_array_equal(decoded, grpc_embed(http_server, TEXTS[:3]).vectors)
    assert encoded["object"] == "list"
    assert encoded["usage"] == floats["usage"]


def test_token_ids_give_the_vectors_of_their_texts(
    http_server: ServerThread, client: openai.OpenAI
) -> None:
    directory = bundled_minilm_dir()
    assert directory is not None
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ids = [tokenizer.encode(text).ids for text in TEXTS]
    texts = as_array(client.embeddings.create(input=TEXTS, model=MODEL))
    by_ids = client.embeddings.create(input=ids, model=MODEL)
    np.testing.assert_allclose(as_array(by_ids), texts, atol=1e-5)
    assert by_ids.usage.prompt_tokens == sum(len(row) for row in ids)
    # One list of ids is one input.
    single = client.embeddings.create(input=ids[0], model=MODEL)
    np.testing.assert_allclose(as_array(single)[0], texts[0], atol=1e-5)
    # Past max_tokens the ids are cut like texts: the first 256 (end) or the last (start).
    long_ids = [101, *([7592] * 300), 102]
    end = client.embeddings.create(input=[long_ids], model=MODEL)
    assert end.usage.prompt_tokens == 256
    np.testing.assert_allclose(
        as_array(end),
        as_array(client.embeddings.create(input=[long_ids[:256]], model=MODEL)),
        atol=1e-6,
    )
    start = client.embeddings.create(
        input=[long_ids], model=MODEL, extra_body={"truncation": "start"}
    )
    np.testing.assert_allclose(
        as_array(start),
        as_array(client.embeddings.create(input=[long_ids[-256:]], model=MODEL)),
        atol=1e-6,
    )


def test_dimensions_are_matryoshka_sizes(http_server: ServerThread, client: openai.OpenAI) -> None:
    texts = ["vector database search", "a small green apple", "fast rust server"]
    small = client.embeddings.create(input=texts, model="tiny-qwen3", dimensions=32)
    assert [len(item.embedding) for item in small.data] == [32, 32, 32]
    expected = grpc_embed(http_server, texts, model="tiny-qwen3", dimensions=32).vectors
    np.testing.assert_array_equal(as_array(small), expected)
    np.testing.assert_allclose(np.linalg.norm(as_array(small), axis=1), 1.0, atol=1e-5)
    native = client.embeddings.create(input=texts, model="tiny-qwen3")
    width = len(native.data[0].embedding)
    assert width > 32
    # The native size by number is the native vector.
    same = client.embeddings.create(input=texts, model="tiny-qwen3", dimensions=width)
    np.testing.assert_array_equal(as_array(same), as_array(native))
    same_size = client.embeddings.create(input="x", model=MODEL, dimensions=384)
    assert len(same_size.data[0].embedding) == 384


def test_extensions_normalize_and_prompts(http_server: ServerThread) -> None:
    body = {"input": "capital of France", "model": MODEL, "encoding_format": "float"}
    _, _, raw = http(http_server, "POST", "/v1/embeddings", {**body, "normalize": False})
    _, _, prefixed = http(http_server, "POST", "/v1/embeddings", {**body, "prompt": "query: "})
    expected_raw = grpc_embed(http_server, [body["input"]], normalize=False).vectors[0]
    np.testing.assert_array_equal(np.array(raw["data"][0]["embedding"], "f4"), expected_raw)
    literal = grpc_embed(http_server, ["query: capital of France"]).vectors[0]
    np.testing.assert_allclose(prefixed["data"][0]["embedding"], literal, atol=1e-6)


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list().data}
    assert {MODEL, "tiny-qwen3", "broken-truncated"} <= set(models)
    minilm = models[MODEL]
    assert minilm.object == "model" and minilm.owned_by == "akidb-embed"
    assert minilm.created > 1_600_000_000
    assert minilm.model_extra == {"state": "loaded", "is_default": True}
    assert client.models.retrieve(MODEL).id == MODEL
    try:
        client.models.retrieve("no-such-model")
    except openai.NotFoundError as error:
        assert "unknown model 'no-such-model'" in str(error)
        assert MODEL in str(error)
    else:
        raise AssertionError("retrieve of an unknown model succeeded")


def test_info_reports_version_models_and_limits(http_server: ServerThread) -> None:
    status, _, info = http(http_server, "GET", "/info")
    assert status == 200
    assert info["version"] and info["backend"].startswith(("cpu", "gpu"))
    assert info["serving"] is True and info["default_model"] == MODEL and info["auth"] is False
    models = {m["name"]: m for m in info["models"]}
    minilm = models[MODEL]
    assert minilm["state"] == "loaded" and minilm["is_default"]
    assert (minilm["dimensions"], minilm["max_tokens"], minilm["pooling"]) == (384, 256, "mean")
    assert minilm["architecture"] == "bert" and minilm["revision"]
    assert models["bge-small-en-v1.5"]["state"] == "not_downloaded"
    assert "akidb-embed pull" in models["bge-small-en-v1.5"]["reason"]
    limits = info["limits"]
    assert limits["max_texts_per_request"] == 1024
    assert limits["max_chars_per_text"] == 200_000
    assert limits["max_queued_tokens"] == 2_000_000
    assert limits["max_request_bytes"] == 64 * 1024 * 1024
    # The device's default (512 on CPU, 8192 on a GPU), the same as `serve` without the flag.
    assert limits["max_batch_tokens"] == default_batch_tokens(gpu_backend() is not None)
    assert limits["max_batch_size"] == 64


def test_health_and_request_ids(http_server: ServerThread) -> None:
    status, headers, body = http(http_server, "GET", "/health")
    assert (status, body) == (200, {"status": "serving"})
    assert len(headers["x-request-id"]) == 16
    _, headers, _ = http(http_server, "GET", "/health", headers={"x-request-id": "probe-7"})
    assert headers["x-request-id"] == "probe-7"
