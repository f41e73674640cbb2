"""Fixtures for the operations tests: a server with damaged models beside the good one and a
metrics endpoint, a server in a subprocess, and a metrics scraper."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from akidb_embed.api.server import ServerConfig
from akidb_embed.store.registry import bundled_minilm_dir
from akidb_embed_client import EmbedClient, EmbedClientError
from tests.conftest import ServerThread

REPO = Path(__file__).resolve().parents[2]
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
# Statuses a client can cause; INTERNAL and UNKNOWN would be server bugs.
PRECISE = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
WEIGHTS = "model.safetensors"


def _safetensors_header(data: bytes) -> tuple[int, dict[str, dict[str, object]]]:
    size = struct.unpack("<Q", data[:8])[0]
    return size, json.loads(data[8 : 8 + size])


def make_broken_models(base: Path) -> dict[str, Path]:
    """Copies of the bundled model with damaged weights, one kind of damage each."""
    source = bundled_minilm_dir()
    if source is None:
        pytest.skip("the embedded default model is missing: run make setup")
    data = (source / WEIGHTS).read_bytes()
    size, header = _safetensors_header(data)
    start, end = header["embeddings.word_embeddings.weight"]["data_offsets"]  # type: ignore[misc]
    body = 8 + size
    nan_weights = bytearray(data)
    nan_weights[body + start : body + end] = b"\xff" * (end - start)  # float32 NaN
    # One vocabulary row NaN ("##zoo", as in "kazoo"): loads and warms up fine, then gives
    # NaN for any text that holds the token.
    nan_row = bytearray(data)
    row = 23221 * 384 * 4
    nan_row[body + start + row : body + start + row + 384 * 4] = b"\xff" * (384 * 4)
    damaged: dict[str, bytes | None] = {
        "nan-row": bytes(nan_row),
        "broken-header": data[:8] + b"\xff" * 64 + data[72:],
        "broken-truncated": data[: len(data) // 2],
        "broken-nan-weights": bytes(nan_weights),
        "pickled-only": None,
    }
    out = {}
    for name, weights in damaged.items():
        target = base / name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(WEIGHTS))
        if weights is None:
            (target / "pytorch_model.bin").write_bytes(b"not really a pickle")
        else:
            (target / WEIGHTS).write_bytes(weights)
        out[name] = target
    return out


@pytest.fixture(scope="session")
def broken_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_broken_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def ops_server(
    tmp_path_factory: pytest.TempPathFactory, broken_models: dict[str, Path]
) -> Iterator[ServerThread]:
    """The default model preloaded; damaged ones known by name; metrics on a free port."""
    config = ServerConfig(
        socket_path=tmp_path_factory.mktemp("ops-sock") / "embed.sock",
        local_model_dirs=list(broken_models.values()),
        metrics_port=0,
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_url(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def scrape(server: ServerThread) -> Samples:
    assert server.server is not None and server.server.metrics_endpoint is not None
    return scrape_url(server.server.metrics_endpoint.url)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, method: str, code: str) -> float:
    service = "grpc.health.v1.Health" if method in ("Check", "Watch") else None
    service = service or "akidb.embedding.v1.EmbeddingService"
    total = 0.0
    for (name, labels), number in samples.items():
        found = dict(labels)
        if (
            name == "grpc_server_handled_total"
            and found.get("grpc_method") == method
            and found.get("grpc_service") == service
            and found.get("grpc_code") == code
        ):
            total += number
    return total


def server_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'server'}:{REPO / 'clients' / 'python'}")
    if OPENBLAS.exists():
        env["LD_PRELOAD"] = str(OPENBLAS)
    return env


class ServerProcess:
    """`python -m akidb_embed serve` in a subprocess, as an operator would run it."""

    def __init__(
        self,
        socket_path: Path,
        log_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "akidb_embed",
                "serve",
                "--socket",
                str(socket_path),
                "--metrics-port",
                "0",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=server_env() | (env or {}),
            cwd=REPO,
        )

    @property
    def target(self) -> str:
        return str(self.socket_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 180) -> ServerProcess:
        deadline = time.monotonic() + timeout
        with EmbedClient(self.target, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
                try:
                    if client.check() == "SERVING":
                        return self
                except EmbedClientError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"server not SERVING after {timeout}s:\n{self.log()}")

    @property
    def metrics_url(self) -> str:
        found = re.search(r"metrics on (http://\S+/metrics)", self.log())
        assert found, self.log()
        return found.group(1)

    def rss_bytes(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()
