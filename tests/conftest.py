"""Shared fixtures: an in-process server on a Unix socket in a temp dir."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from akidb_embed.api.server import EmbeddingServer, ServerConfig
from akidb_embed.modeling.precision import CPU_PRECISION_ENV

# The suite's parity bounds are fp32 ones; on CPUs with bf16 instructions `auto` would pick
# bf16 linears. The bf16 path has its own tests (tests/*/test_bf16*.py), which ask for it.
os.environ.setdefault(CPU_PRECISION_ENV, "fp32")


class ServerThread:
    """Runs an EmbeddingServer on its own event loop in a background thread."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.server: EmbeddingServer | None = None
        self._ready = threading.Event()
        self._stop_requested = threading.Event()
        self.grace = 5.0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def target(self) -> str:
        assert self.config.socket_path is not None
        return str(self.config.socket_path)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        try:
            self.server = EmbeddingServer(self.config)
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        # grpc.aio's loop in a non-main thread is not woken by call_soon_threadsafe, so
        # poll for the stop request instead of run_coroutine_threadsafe.
        while not self._stop_requested.is_set():
            await asyncio.sleep(0.05)
        await self.server.stop(self.grace)

    def start(self, timeout: float = 120) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("server did not become ready")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, grace: float = 5) -> None:
        self.grace = grace
        self._stop_requested.set()
        self._thread.join(grace + 60)
        assert not self._thread.is_alive(), "server did not stop"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The default model, warm, on a socket in a private temp dir."""
    socket_dir = tmp_path_factory.mktemp("sock")
    thread = ServerThread(ServerConfig(socket_path=socket_dir / "embed.sock")).start()
    yield thread
    thread.stop()


@pytest.fixture()
def socket_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path
