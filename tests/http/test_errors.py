"""Every error in OpenAI's shape, with the HTTP code mapped from the domain's error kind:
400, 401, 404, 405, 413, 429 (and 503 in test_operations.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import openai
import pytest

from akidb_embed.api.http_api import HTTP_STATUS
from akidb_embed.errors import ErrorKind
from akidb_embed_client import EmbedClient
from tests.conftest import ServerThread
from tests.http.conftest import API_KEY, MODEL, http, openai_client
from tests.http.test_embeddings import LONG_TEXT


def expect(
    server: ServerThread, status: int, body: object, *, raw: bytes | None = None
) -> dict[str, Any]:
    got, headers, answer = http(server, "POST", "/v1/embeddings", body, raw=raw)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and len(headers["x-request-id"]) == 16
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": []}, "input", "input is an empty list"),
        ({"input": ""}, None, "texts[0] is empty"),
        ({"input": ["a", "", "b"]}, None, "texts[1] is empty"),
        ({"input": ["a", 3]}, "input", "input[1] is a number in a list of strings"),
        ({"input": [[1, 2], [3, "x"]]}, "input", "input[1][1] is a string, not a token id"),
        ({"input": [True]}, "input", "input[0] is a boolean"),
        ({"input": {"text": "x"}}, "input", "input is an object"),
        ({"model": MODEL}, "input", "input is missing"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "use 'float' or 'base64'"),
        ({"input": "x", "dimensions": 0}, "dimensions", "dimensions=0 is not a positive integer"),
        ({"input": "x", "dimensions": 100}, None, "dimensions=100 is not supported"),
        ({"input": "x", "truncation": "middle"}, "truncation", 'truncation="middle"'),
        ({"input": "x", "prompt": "q: ", "prompt_name": "query"}, "prompt", "at most one"),
        ({"input": "x", "prompt_name": "query"}, None, "no prompt named 'query'"),
        ({"input": "x", "dimension": 10}, "dimension", "unrecognized request field 'dimension'"),
        ({"input": [[101, 30522, 102]]}, None, "30522 at position 1"),
        ({"input": [[101, -1]]}, None, "-1 at position 1"),
        ({"input": [[]]}, None, "token id list 0 is empty"),
        ({"input": [[1]], "prompt": "q: "}, None, "token ids are embedded as they are"),
        ({"input": ["ok", LONG_TEXT], "truncation": "error"}, None, "accepts at most 256"),
        ({"input": [[101] * 300], "truncation": "error"}, None, "has 300 tokens"),
        ({"input": ["x"] * 1025}, None, "1025 texts in one request; the limit is 1024"),
        ({"input": "x", "model": "broken-truncated"}, None, "broken-truncated"),
    ],
)
def test_bad_requests_are_400_with_the_reason(
    http_server: ServerThread, body: dict[str, Any], param: str | None, words: str
) -> None:
    error = expect(http_server, 400, {"model": MODEL, **body} if "model" not in body else body)
    assert words in error["message"], error
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_a_damaged_model_is_400_failed_precondition(http_server: ServerThread) -> None:
    # FAILED_PRECONDITION: retrying cannot help until the model is pulled again.
    error = expect(http_server, 400, {"input": "x", "model": "broken-truncated"})
    assert error["code"] == "failed_precondition"
    assert "pull it again" in error["message"] or "damaged" in error["message"], error


def test_body_that_is_not_json(http_server: ServerThread) -> None:
    error = expect(http_server, 400, None, raw=b'{"input": "x"')
    assert "not JSON" in error["message"] and error["param"] == "body"
    assert "not JSON" in expect(http_server, 400, None, raw=b"\xff\xfe")["message"]
    assert "the body is a list" in expect(http_server, 400, ["x"])["message"]


def test_unknown_model_and_route_are_404(http_server: ServerThread, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(input="x", model="text-embedding-3-small")
    assert info.value.status_code == 404
    assert "unknown model 'text-embedding-3-small'" in info.value.message
    assert info.value.code == "not_found"
    status, _, body = http(http_server, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["code"] == "route_not_found"
    assert "POST /v1/embeddings" in body["error"]["message"]
    status, headers, body = http(http_server, "GET", "/v1/embeddings")
    assert status == 405 and "POST" in headers["allow"]
    assert "use POST" in body["error"]["message"]


def test_request_over_the_size_limit_is_413(strict_server: ServerThread) -> None:
    with openai_client(strict_server, API_KEY) as client:
        big = ["many words in one text " * 100] * 500  # 1.15 MB of JSON; the limit is 1 MiB
        with pytest.raises(openai.APIStatusError) as info:
            client.embeddings.create(input=big, model=MODEL)
        assert info.value.status_code == 413
        assert info.value.code == "request_too_large"
        assert "the limit is 1048576" in info.value.message
        # The connection is fine for what follows.
        assert len(client.embeddings.create(input="small", model=MODEL).data) == 1
    # Far past the limit, the declared length alone is refused, before any of the body.
    assert strict_server.server is not None and strict_server.server.http is not None
    with socket.create_connection(("127.0.0.1", strict_server.server.http.port), 30) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
            b"Content-Length: 5242880\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"connection: close" in head.lower()
    assert "at least 5242880 bytes" in json.loads(body)["error"]["message"]


def test_api_key_is_required_except_for_health(strict_server: ServerThread) -> None:
    for key in ("wrong-key", ""):
        with openai_client(strict_server, key or "x") as client:
            with pytest.raises(openai.AuthenticationError) as info:
                client.embeddings.create(input="x", model=MODEL)
            assert info.value.status_code == 401
            assert "--api-key-file" in info.value.message
    status, headers, body = http(strict_server, "GET", "/info")
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert body["error"]["type"] == "authentication_error"
    status, _, body = http(strict_server, "GET", "/info", headers={"authorization": "Basic abc"})
    assert status == 401
    for key in (API_KEY, "sk-second-key"):
        with openai_client(strict_server, key) as client:
            assert client.embeddings.create(input="x", model=MODEL).data
            assert any(m.id == MODEL for m in client.models.list().data)
    status, _, body = http(strict_server, "GET", "/health")
    assert (status, body) == (200, {"status": "serving"})
    status, _, body = http(
        strict_server, "GET", "/info", headers={"authorization": f"Bearer {API_KEY}"}
    )
    assert status == 200 and body["auth"] is True
    assert body["limits"]["max_request_bytes"] == 1024 * 1024


def test_full_queue_is_429_with_retry_after(strict_server: ServerThread) -> None:
    """A gRPC batch fills the queue past the server's 500-token limit; HTTP is refused.
    (Texts planned into batches that have not started count as queued.)"""
    assert strict_server.server is not None
    worker = strict_server.server.scheduler
    # 100 texts of ~30 tokens: they wait, queued or planned, for the batch in progress.
    texts = [f"{i} " + "a text about embeddings " * 6 for i in range(100)]
    done = threading.Event()

    def flood() -> None:
        with EmbedClient(strict_server.target, timeout=300) as grpc_client:
            grpc_client.embed(texts)
        done.set()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while worker.queued_tokens <= 500 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert worker.queued_tokens > 500, "the batch never filled the queue"
    with (
        openai_client(strict_server, API_KEY) as client,
        pytest.raises(openai.RateLimitError) as info,
    ):
        client.embeddings.create(input="one more", model=MODEL)
    assert info.value.status_code == 429 and info.value.code == "resource_exhausted"
    assert "tokens queued (limit 500)" in info.value.message
    assert info.value.response.headers["retry-after"] == "1"
    thread.join(300)
    assert done.is_set()


def test_every_error_kind_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorKind)
    assert HTTP_STATUS[ErrorKind.DEADLINE_EXCEEDED] == 504
    assert HTTP_STATUS[ErrorKind.UNAVAILABLE] == 503
