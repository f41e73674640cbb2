"""Servers with the HTTP API on a free loopback port, and the official openai client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from akidb_embed.api.server import ServerConfig
from akidb_embed.service.service import Limits
from tests.conftest import ServerThread
from tests.fixtures import tiny_models as tiny
from tests.ops.conftest import make_broken_models

MODEL = "all-minilm-l6-v2"
API_KEY = "sk-test-0123456789"


def base_url(server: ServerThread) -> str:
    assert server.server is not None and server.server.http is not None
    return f"{server.server.http.url}/v1"


def openai_client(server: ServerThread, api_key: str = "unused") -> openai.OpenAI:
    # No retries: each test sees the first answer, and a 429 or 503 is not retried away.
    return openai.OpenAI(base_url=base_url(server), api_key=api_key, max_retries=0, timeout=120)


def http(
    server: ServerThread,
    method: str,
    path: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request with urllib: (status, headers, parsed JSON body)."""
    assert server.server is not None and server.server.http is not None
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.server.http.url + path, data=data, method=method, headers=headers or {}
    )
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, got, content = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        status, got, content = error.code, dict(error.headers), error.read()
    return status, {k.lower(): v for k, v in got.items()}, json.loads(content)


@pytest.fixture(scope="session")
def http_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen3 (Matryoshka sizes from 32) and a model whose weights are cut short."""
    root = tmp_path_factory.mktemp("http-models")
    broken = make_broken_models(root / "broken")
    return {"tiny-qwen3": tiny.build_qwen3(root / "tiny-qwen3"), **broken}


@pytest.fixture(scope="session")
def http_server(
    tmp_path_factory: pytest.TempPathFactory, http_models: dict[str, Path]
) -> Iterator[ServerThread]:
    """The default model warm; gRPC on a socket, HTTP and metrics on free loopback ports."""
    config = ServerConfig(
        socket_path=tmp_path_factory.mktemp("http-sock") / "embed.sock",
        local_model_dirs=[http_models["tiny-qwen3"], http_models["broken-truncated"]],
        http_port=0,
        metrics_port=0,
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="session")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """HTTP with an API key, a 1 MiB request limit, a small queue limit, small batches."""
    config = ServerConfig(
        socket_path=tmp_path_factory.mktemp("strict-sock") / "embed.sock",
        http_port=0,
        http_api_keys=(API_KEY, "sk-second-key"),
        max_message_bytes=1024 * 1024,
        max_batch_size=8,
        limits=Limits(max_queued_tokens=500),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture()
def client(http_server: ServerThread) -> Iterator[openai.OpenAI]:
    with openai_client(http_server) as opened:
        yield opened
