"""A Hub that accepts connections and never answers must not stall other models' requests:
server pulls are capped in number (RESOURCE_EXHAUSTED past the cap) and in time
(UNAVAILABLE for the requests waiting on a pull that runs out of time)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from akidb_embed.api.server import ServerConfig
from akidb_embed.service.pulls import PullLimits
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread

from .conftest import HubEnv

# More than the default executor's threads (min(32, cores + 4)) on any machine.
UNKNOWN_REQUESTS = 40
TEXTS = [f"text number {i} for a client that wants no Hub at all" for i in range(64)]


def test_a_hung_hub_does_not_stall_other_clients(hub_env: HubEnv, socket_dir: Path) -> None:
    hub_env.hub.hang = True
    config = ServerConfig(
        socket_path=socket_dir / "embed.sock",
        allow_downloads=True,
        pulls=PullLimits(max_concurrent=2, timeout_s=3),
    )
    thread = ServerThread(config).start()
    outcomes: list[tuple[grpc.StatusCode, str, float]] = []
    lock = threading.Lock()

    def ask_for_unknown(index: int) -> None:
        started = time.monotonic()
        with EmbedClient(thread.target, timeout=30) as client:
            try:
                client.embed(["x"], model=f"acme/unknown-{index}")
                code, message = grpc.StatusCode.OK, ""
            except EmbedClientError as error:
                code, message = error.code, error.message
        with lock:
            outcomes.append((code, message, time.monotonic() - started))

    try:
        with EmbedClient(thread.target, timeout=20) as other:
            reference = other.embed(TEXTS).vectors
            askers = [
                threading.Thread(target=ask_for_unknown, args=(i,)) for i in range(UNKNOWN_REQUESTS)
            ]
            for asker in askers:
                asker.start()
            time.sleep(0.5)  # the pulls are under way, stuck on the Hub
            started = time.monotonic()
            again = other.embed(TEXTS).vectors
            took = time.monotonic() - started
            for asker in askers:
                asker.join(60)
    finally:
        hub_env.hub.hang = False
        thread.stop()

    np.testing.assert_allclose(again, reference, atol=1e-5)
    assert took < 5, f"a 64-text Embed took {took:.1f}s behind hung pulls"
    codes = Counter(code for code, _, _ in outcomes)
    assert len(outcomes) == UNKNOWN_REQUESTS
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}, codes
    # Two pulls reach the Hub; the rest are refused at once, saying why and what to do.
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= UNKNOWN_REQUESTS - 4, codes
    for code, message, seconds in outcomes:
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert "already pulling 2 models from the Hub" in message, message
            assert "akidb-embed pull acme/unknown-" in message, message
            assert seconds < 5, seconds
        else:
            # The pulled ones end when their time runs out, with a status that says so.
            assert "Hub" in message, message
            assert 2 < seconds < 10, seconds
