"""One access line per RPC at INFO: method, status, items, tokens, milliseconds; the same
fields as JSON keys with --log-format json."""

from __future__ import annotations

import json
import logging

import pytest

from akidb_embed.observability.logs import JsonFormatter
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread

SERVICE = "akidb.embedding.v1.EmbeddingService"


def access_records(caplog: pytest.LogCaptureFixture, method: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "akidb_embed.access" and getattr(r, "method", "") == f"{SERVICE}/{method}"
    ]


def test_one_access_line_per_rpc(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="akidb_embed.access")
    with EmbedClient(server.target, timeout=30) as client:
        result = client.embed(["first text", "a second, longer text"])
        items = list(client.embed_stream([("a", "one"), ("b", ""), ("c", "three words here")]))
        with pytest.raises(EmbedClientError):
            client.embed(["x"], model="no-such-model")
        client.check()
    [embed, failed] = access_records(caplog, "Embed")
    assert embed.levelno == logging.INFO
    assert (embed.status, embed.items, embed.tokens) == ("OK", 2, sum(result.token_counts))  # type: ignore[attr-defined]
    assert embed.ms > 0  # type: ignore[attr-defined]
    assert "Embed OK items=2" in embed.getMessage()
    assert failed.status == "NOT_FOUND" and failed.items == 0  # type: ignore[attr-defined]
    [stream] = access_records(caplog, "EmbedStream")
    # The empty text gets its own item error: answered, no tokens.
    tokens = sum(i.token_count for i in items if i.error is None)
    assert (stream.status, stream.items, stream.tokens) == ("OK", 3, tokens)  # type: ignore[attr-defined]
    # Probes call health every few seconds: their lines are DEBUG.
    health = [r for r in caplog.records if "grpc.health.v1.Health/Check" in r.getMessage()]
    assert all(r.levelno == logging.DEBUG for r in health)

    line = json.loads(JsonFormatter().format(embed))
    assert line["method"] == f"{SERVICE}/Embed"
    assert (line["status"], line["items"], line["tokens"]) == ("OK", 2, embed.tokens)  # type: ignore[attr-defined]
    assert isinstance(line["ms"], float) and line["level"] == "INFO"
    assert len(line["request_id"]) == 16
