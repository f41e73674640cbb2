"""The transport's own ceiling: a plain grpc.aio server that answers each EmbedStream
message with a canned response of the same shape, driven by the same Python client. What
the real server reaches with one item per message is measured against this."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from akidb_embed_client import EmbedClient

SERVER = """
import asyncio, sys
import grpc
import numpy as np
from akidb.embedding.v1 import embedding_service_pb2 as pb
from akidb.embedding.v1 import embedding_service_pb2_grpc as pb_grpc

VECTOR = np.zeros(32, "<f4").tobytes()

class Echo(pb_grpc.EmbeddingServiceServicer):
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


def measure(socket: Path, texts: Sequence[str], per_message: int, env: dict[str, str]) -> float:
    """Items/s through the echo server, the same client and message sizes as the real one."""
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(socket)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        with EmbedClient(str(socket), timeout=600) as client:
            list(client.embed_stream(texts[:500], max_items_per_message=per_message))
            started = time.perf_counter()
            count = sum(1 for _ in client.embed_stream(texts, max_items_per_message=per_message))
            return count / (time.perf_counter() - started)
    finally:
        process.kill()
        process.wait(30)
