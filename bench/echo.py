"""The transport's own ceiling: a plain grpc.aio server that answers each EmbedStream
message with a canned response of the same shape, driven by the same Python client. What
the real server reaches with one item per message is measured against this."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from akidb_embed_client import EmbedClient

SERVER = """
import asyncio, sys
import grpc
import numpy as np
from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

VECTOR = np.zeros(32, "<f4").tobytes()
QUERY_VECTOR = np.zeros(384, "<f4").tobytes()

class Echo(pb_grpc.EmbeddingServiceServicer):
    async def Embed(self, request, context):
        n = len(request.texts)
        return pb.EmbedResponse(
            embeddings=pb.EmbeddingBatch(
                vectors=QUERY_VECTOR * n, dimensions=384, token_counts=[8] * n,
                truncated=[False] * n,
            ),
            space=pb.EmbeddingSpace(dimensions=384),
            model="echo",
            total_tokens=8 * n,
        )

    async def EmbedStream(self, requests, context):
        first = True
        async for request in requests:
            n = len(request.ids)
            response = pb.EmbedStreamResponse(
                ids=request.ids,
                embeddings=pb.EmbeddingBatch(
                    vectors=VECTOR * n, dimensions=32, token_counts=[8] * n,
                    truncated=[False] * n,
                ),
            )
            if first:
                response.space.dimensions = 32
                first = False
            yield response

async def main():
    server = grpc.aio.server()
    pb_grpc.add_EmbeddingServiceServicer_to_server(Echo(), server)
    server.add_insecure_port("unix:" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def _start(socket: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(socket)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def query_latency(socket: Path, queries: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    """p50 and p99 ms of single-text Embed calls answered at once with a canned 384-wide
    vector, through the same client: the transport's share of a served query."""
    process = _start(socket, env)
    try:
        times = []
        with EmbedClient(str(socket), timeout=60) as client:
            client.embed([queries[0]])
            for query in queries:
                started = time.perf_counter()
                client.embed([query])
                times.append(time.perf_counter() - started)
        ms = np.array(times) * 1e3
        return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    finally:
        process.kill()
        process.wait(30)


def measure(socket: Path, texts: Sequence[str], per_message: int, env: dict[str, str]) -> float:
    """Items/s through the echo server, the same client and message sizes as the real one."""
    process = _start(socket, env)
    try:
        with EmbedClient(str(socket), timeout=600) as client:
            list(client.embed_stream(texts[:500], max_items_per_message=per_message))
            started = time.perf_counter()
            count = sum(1 for _ in client.embed_stream(texts, max_items_per_message=per_message))
            return count / (time.perf_counter() - started)
    finally:
        process.kill()
        process.wait(30)
