"""Replicas of the server on loopback TCP ports, started and killed by the tests and the
benchmark: `python -m akidb_embed serve --no-socket --port 0`, one engine in each process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from akidb_embed_client import EmbedClient, EmbedClientError

REPO = Path(__file__).resolve().parents[1]
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")


def replica_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'server'}:{REPO / 'clients' / 'python'}")
    if OPENBLAS.exists() and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = str(OPENBLAS)
    return env


class Replica:
    """One server process on 127.0.0.1, its port read from its log."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "akidb_embed",
                "serve",
                "--no-socket",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--workers",
                "0",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=replica_env(),
            cwd=REPO,
        )
        self.address = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, deadline: float) -> Replica:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"replica exited {self.proc.returncode}:\n{self.log()}")
            if not self.address:
                found = re.search(r"listening on (?:\S+, )*(127\.0\.0\.1:\d+)", self.log())
                if found:
                    self.address = found.group(1)
            if self.address:
                with EmbedClient(self.address, timeout=2) as client:
                    try:
                        if client.check() == "SERVING":
                            return self
                    except EmbedClientError:
                        pass
            time.sleep(0.2)
        raise AssertionError(f"replica not SERVING in time:\n{self.log()}")

    @property
    def metrics_url(self) -> str:
        found = re.search(r"metrics on (http://\S+/metrics)", self.log())
        assert found, self.log()
        return found.group(1)

    def kill(self) -> None:
        """kill -9: no drain, connections reset."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self) -> None:
        """SIGTERM: NOT_SERVING, new items UNAVAILABLE, in-flight ones answered, then exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def start_replicas(directory: Path, n: int, *args: str, timeout: float = 180) -> list[Replica]:
    """`n` replicas, started together; returns once every one reports SERVING."""
    replicas = [Replica(directory / f"replica-{i}.log", *args) for i in range(n)]
    deadline = time.monotonic() + timeout
    try:
        for replica in replicas:
            replica.wait_serving(deadline)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas
