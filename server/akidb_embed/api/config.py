"""The server's configuration: one object, and the table the `serve` command is built from.

Each setting is a field of ServerConfig (or of one of its parts: Limits, ModelBudget,
PullLimits, Watchdog, ModelPrecision) with its default written once, there. SETTINGS maps a
flag to that field: the flag's type and default come from the field, the environment
variable from the flag (`--stream-window` -> AKIDB_EMBED_STREAM_WINDOW), and the help text
is written once, here. Adding an option is a field and a row.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..modeling.precision import Choice, CpuPrecision, ModelPrecision
from ..runtime.workers import Watchdog
from ..service.pulls import PullLimits
from ..service.residency import ModelBudget
from ..service.service import Limits
from ..store.registry import DEFAULT_MODEL

ENV_PREFIX = "AKIDB_EMBED_"
# Bulk batches while queries arrive (docs/performance.md has the measurements behind these).
DEFAULT_BULK_BATCH_MS = 25.0
DEFAULT_BULK_FILL_MS = 2.0
MIB = 2**20


@dataclass
class ServerConfig:
    socket_path: Path | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    # Loaded and warmed before the server reports SERVING; the first is the default.
    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    local_model_dirs: list[Path] = field(default_factory=list)
    socket_mode: int = 0o600
    # Accept world-writable (non-sticky) directories above the socket's own directory.
    trust_socket_parents: bool = False
    grace_seconds: float = 30.0
    # None: by device (workers.default_batch_tokens): 512 on CPU, 8192 on a GPU.
    max_batch_tokens: int | None = None
    max_batch_size: int = 64
    max_message_bytes: int = 64 * MIB
    stream_window: int = 4096
    bulk_batch_seconds: float = DEFAULT_BULK_BATCH_MS / 1000
    bulk_fill_seconds: float = DEFAULT_BULK_FILL_MS / 1000
    watchdog: Watchdog = field(default_factory=Watchdog)
    limits: Limits = field(default_factory=Limits)
    budget: ModelBudget = field(default_factory=ModelBudget)
    allow_downloads: bool = False
    # Hub pulls the server makes itself (with allow_downloads): how many at once, how long.
    pulls: PullLimits = field(default_factory=PullLimits)
    # Prometheus `/metrics` over HTTP when set (0 picks a free port).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Engine worker processes (workers.py); 0 runs the models in this process.
    workers: int = 0
    # More engine worker processes, kept for queries (with workers > 0).
    query_workers: int = 0
    # The OpenAI-compatible HTTP API (http_api.py) when set (0 picks a free port).
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    # Bearer tokens the HTTP API accepts; empty: no authentication.
    http_api_keys: tuple[str, ...] = ()
    # What loaded models compute in; the default reads the environment.
    precision: ModelPrecision = field(default_factory=ModelPrecision.from_env)


def _octal(text: str) -> int:
    return int(text, 8)


def _flag_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1/0, true/false, yes/no)")


@dataclass(frozen=True)
class Setting:
    """One `serve` flag and the ServerConfig field it sets (`path`, dotted into a part).

    The flag's value times `scale` is the field's value (milliseconds to seconds, MiB to
    bytes); an `octal` flag is the field's integer written in octal, kept as the text it was
    written as ("600"). `default_text` replaces the shown default where it is computed
    elsewhere.
    """

    flag: str
    path: str
    help: str
    group: str = "server"
    scale: float = 1
    kind: type | None = None  # for a field whose default is None
    choices: tuple[str, ...] | None = None
    default_text: str | None = None
    metavar: str | None = None
    octal: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def field_default(self) -> Any:
        value: Any = ServerConfig(precision=ModelPrecision())  # not the environment's
        for part in self.path.split("."):
            value = getattr(value, part)
        return value

    def flag_type(self) -> type:
        if self.octal:
            return str
        if self.kind is not None:
            return self.kind
        default = self.field_default()
        if isinstance(default, bool):
            return bool
        if self.scale != 1:
            return type(default / self.scale) if isinstance(default, int) else float
        return type(default.value) if isinstance(default, Enum) else type(default)

    def flag_default(self) -> Any:
        """What the flag means when absent: the field's default, in the flag's unit."""
        default = self.field_default()
        if default is None or isinstance(default, bool):
            return default
        if self.octal:
            return f"{default:o}"
        if isinstance(default, Enum):  # its value on the command line
            return default.value
        if self.scale != 1:
            unscaled = default / self.scale
            return int(unscaled) if float(unscaled).is_integer() else unscaled
        return default

    def parse(self, text: str) -> Any:
        kind = self.flag_type()
        if kind is bool:
            return _flag_bool(text)
        if self.octal:
            _octal(text)  # checked now, kept as written
            return text
        return kind(text)

    def to_field(self, value: Any) -> Any:
        """The flag's value as the field's."""
        if value is None or isinstance(value, bool):
            return value
        if self.octal:
            return _octal(value)
        default = self.field_default()
        if isinstance(default, Enum):
            return type(default)(value)
        if self.scale != 1:
            scaled = value * self.scale
            return int(scaled) if isinstance(default, int) else float(scaled)
        return value


SETTINGS: tuple[Setting, ...] = (
    Setting("--host", "host", "TCP bind address", metavar="ADDR"),
    Setting("--grace", "grace_seconds", "drain seconds on SIGTERM", metavar="S"),
    Setting(
        "--socket-mode",
        "socket_mode",
        "socket permissions, octal",
        octal=True,
        metavar="MODE",
    ),
    Setting(
        "--trust-socket-parents",
        "trust_socket_parents",
        "accept world-writable directories above the socket's own directory (a volume that "
        "only this user's processes reach, e.g. a Kubernetes emptyDir); refused otherwise",
    ),
    Setting(
        "--allow-downloads",
        "allow_downloads",
        "pull a known model from the Hub on its first request (without it: "
        "FAILED_PRECONDITION with the pull command)",
    ),
    Setting(
        "--max-concurrent-pulls",
        "pulls.max_concurrent",
        "with --allow-downloads: Hub pulls at once; a request needing one more gets "
        "RESOURCE_EXHAUSTED",
        metavar="N",
    ),
    Setting(
        "--pull-timeout",
        "pulls.timeout_s",
        "with --allow-downloads: seconds before requests waiting on a pull get UNAVAILABLE; "
        "`akidb-embed pull` has no limit",
        metavar="S",
    ),
    Setting(
        "--metrics-port",
        "metrics_port",
        "serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port)",
        kind=int,
        default_text="off",
        metavar="PORT",
    ),
    Setting("--metrics-host", "metrics_host", "metrics bind address", metavar="ADDR"),
    Setting(
        "--http-port",
        "http_port",
        "serve /v1/embeddings, /v1/models, /info and /health on this TCP port "
        "(0 picks a free port)",
        group="http",
        kind=int,
        default_text="off",
        metavar="PORT",
    ),
    Setting("--http-host", "http_host", "HTTP bind address", group="http", metavar="ADDR"),
    Setting(
        "--max-batch-tokens",
        "max_batch_tokens",
        "padded tokens per batch",
        group="limits",
        kind=int,
        default_text="512 on CPU, where batches that fit the cache are fastest; 8192 on a GPU",
        metavar="N",
    ),
    Setting(
        "--batch-timeout",
        "watchdog.min_seconds",
        "seconds a batch may take at least before its worker counts as hung (the limit grows "
        "with the batch's size: 20x its expected time)",
        group="limits",
        metavar="S",
    ),
    Setting(
        "--bulk-batch-ms",
        "bulk_batch_seconds",
        "while queries arrive and no process kept for queries is ready, cut bulk batches to "
        "about this much compute, so a query waits little (0: never cut)",
        group="limits",
        scale=1 / 1000,
        metavar="MS",
    ),
    Setting(
        "--bulk-fill-ms",
        "bulk_fill_seconds",
        "let a small bulk batch wait up to this long for more texts (queries never wait)",
        group="limits",
        scale=1 / 1000,
        metavar="MS",
    ),
    Setting("--max-batch-size", "max_batch_size", "texts per batch", group="limits"),
    Setting(
        "--max-texts-per-request",
        "limits.max_texts_per_request",
        "texts of one Embed request or stream message (INVALID_ARGUMENT past it)",
        group="limits",
    ),
    Setting(
        "--max-chars-per-text",
        "limits.max_chars_per_text",
        "characters of one text (INVALID_ARGUMENT past it)",
        group="limits",
    ),
    Setting(
        "--max-chars-per-request",
        "limits.max_chars_per_request",
        "characters of one Embed request (RESOURCE_EXHAUSTED past it)",
        group="limits",
    ),
    Setting(
        "--max-chars-in-flight",
        "limits.max_chars_in_flight",
        "characters of text being worked on at once: past it Embed gets RESOURCE_EXHAUSTED "
        "and streams wait",
        group="limits",
    ),
    Setting(
        "--max-queued-tokens",
        "limits.max_queued_tokens",
        "past it, Embed calls get RESOURCE_EXHAUSTED (streams wait)",
        group="limits",
    ),
    Setting(
        "--stream-window",
        "stream_window",
        "items of one stream in flight; past it the server stops reading the stream",
        group="limits",
    ),
    Setting(
        "--max-message-mb",
        "max_message_bytes",
        "gRPC message size limit",
        group="limits",
        scale=MIB,
        metavar="MB",
    ),
    Setting(
        "--max-loaded-models",
        "budget.max_models",
        "models in memory at once (0: no limit)",
        group="memory",
        metavar="N",
    ),
    Setting(
        "--max-loaded-mb",
        "budget.max_bytes",
        "weights in memory, every copy counted (one per engine worker; 0: no limit)",
        group="memory",
        scale=MIB,
        metavar="MB",
    ),
    Setting(
        "--keep-alive",
        "budget.keep_alive_seconds",
        "seconds an on-demand model stays loaded when idle (0: forever); preloaded models "
        "always stay",
        group="memory",
        metavar="S",
    ),
    Setting(
        "--cpu-precision",
        "precision.cpu",
        "CPU engine: bf16 linear layers where the CPU has AVX512-BF16 or AMX (auto), fp32 "
        "always, or bf16 always (docs/precision-cpu.md)",
        group="precision",
        choices=tuple(c.value for c in CpuPrecision),
    ),
    Setting(
        "--dequantize",
        "precision.dequantize",
        "quantised linear layers to float32: on the CPU (auto), always or never",
        group="precision",
        choices=tuple(c.value for c in Choice),
    ),
    Setting(
        "--upcast",
        "precision.upcast",
        "float16/bfloat16 weights to float32: on the CPU (auto), always or never",
        group="precision",
        choices=tuple(c.value for c in Choice),
    ),
)

GROUPS = {
    "http": "OpenAI-compatible HTTP API (docs/http.md)",
    "limits": "batching and limits",
    "memory": "models in memory",
    "precision": "precision (docs/precision-cpu.md)",
}


def add_settings(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Add every setting's flag; a set environment variable replaces the default."""
    env = os.environ if environ is None else environ
    groups: dict[str, Any] = {"server": parser}
    for setting in SETTINGS:
        group = groups.get(setting.group)
        if group is None:
            group = groups[setting.group] = parser.add_argument_group(GROUPS[setting.group])
        default = setting.flag_default()
        if setting.env in env:  # shown as the default, and checked now
            try:
                default = setting.parse(env[setting.env].strip())
            except ValueError as exc:
                parser.error(f"${setting.env}: {exc}")
            if setting.choices and default not in setting.choices:
                parser.error(
                    f"${setting.env}={default!r} is not valid; use one of "
                    + ", ".join(setting.choices)
                )
        shown = setting.default_text or (
            "off" if default is None or default is False else "on" if default is True else default
        )
        help_text = f"{setting.help} (default {shown}; ${setting.env})"
        if setting.flag_type() is bool:
            group.add_argument(
                setting.flag,
                dest=setting.dest,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        group.add_argument(
            setting.flag,
            dest=setting.dest,
            type=setting.parse,
            default=default,
            choices=setting.choices,
            metavar=setting.metavar or ("N" if setting.flag_type() is int else None),
            help=help_text,
        )


def apply_settings(config: ServerConfig, args: argparse.Namespace) -> ServerConfig:
    """`config` with every setting's field set from `args` (parsed by `add_settings`)."""
    for setting in SETTINGS:
        value = getattr(args, setting.dest)
        config = _replace(config, setting.path.split("."), setting.to_field(value))
    return config


def _replace(obj: Any, path: Sequence[str], value: Any) -> Any:
    head, *rest = path
    new = value if not rest else _replace(getattr(obj, head), rest, value)
    return dataclasses.replace(obj, **{head: new})
