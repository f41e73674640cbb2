"""`akidb-embed`: serve, embed, models, health, pull, rm."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from .. import __version__
from ..api.config import ServerConfig, add_settings, apply_settings
from ..api.http_api import ApiKeyError, load_api_keys
from ..api.server import run_server
from ..api.unix_socket import SocketInUse, default_socket_path
from ..host.blas import ensure_fast_blas
from ..host.device import gpu_backend
from ..observability.logs import configure_logging
from ..runtime.workers import DEFAULT_MODEL_BYTES, default_query_workers, default_workers
from ..service.service import Limits
from ..store.model_cache import human_size
from ..store.registry import DEFAULT_MODEL
from .store import add_pull_parser, add_rm_parser, run_models, run_pull, run_rm

if TYPE_CHECKING:
    from akidb_embed_client import EmbedClientError, Options

    from ..api.server import EmbeddingServer

# Above this many texts `embed` sends them on one EmbedStream instead of one Embed call (the
# server's default --max-texts-per-request).
STREAM_ABOVE = Limits.max_texts_per_request
FORMATS = ("json", "jsonl", "npy")


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        help=f"server's Unix socket (default: {default_socket_path()}, or $AKIDB_EMBED_SOCKET)",
    )
    parser.add_argument("--address", help="server's host:port, instead of a socket")
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait for the answer (default 30; no limit for a "
        f"stream of more than {STREAM_ABOVE} texts)",
    )


def _target(args: argparse.Namespace) -> str:
    return str(args.address or args.socket or default_socket_path())


def _timeout(args: argparse.Namespace, default: float | None = 30.0) -> float | None:
    return float(args.timeout) if args.timeout is not None else default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="akidb-embed", description="AkiDB's embedding sidecar: a gRPC server for MLX models."
    )
    parser.add_argument("--version", action="version", version=f"akidb-embed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Every option below with a $NAME can also be set by that "
        "environment variable (the flag wins).",
    )
    serve.add_argument("--socket", type=Path, help=f"Unix socket (default {default_socket_path()})")
    serve.add_argument("--no-socket", action="store_true", help="TCP only (needs --port)")
    serve.add_argument("--port", type=int, help="also listen on TCP (0 picks a free port)")
    serve.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME_OR_DIR",
        help=f"preload this model (repeatable; the first is the default; default {DEFAULT_MODEL})",
    )
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text lines, or one JSON object per line (both carry the request id)",
    )
    serve.add_argument(
        "--api-key-file",
        type=Path,
        help="require 'Authorization: Bearer KEY' on the HTTP API (--http-port) with a key "
        "from this file (one a line; /health stays open)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="engine worker processes, each with its own copy of the models, supervised: a "
        "dead or hung one is replaced and its batch re-run (default: one per core on CPU, as "
        "many as --memory-budget-mb allows; 1 on a GPU; 0 runs the models in the server "
        "process, unsupervised)",
    )
    serve.add_argument(
        "--query-workers",
        type=int,
        help="engine worker processes kept for queries (Embed calls of at most 8 texts) beside "
        "--workers, so that a query never waits for a bulk batch to finish; each holds one "
        "more copy of the models (default: 1 on CPU with engine workers, if memory allows; 0 "
        "on a GPU or with --workers 0)",
    )
    serve.add_argument(
        "--memory-budget-mb",
        type=int,
        help="memory the default --workers count must fit in (default: the container's limit, "
        "cgroup memory.max, else the machine's RAM); each worker costs ~110 MB plus its "
        "models' weights",
    )
    add_settings(serve)

    embed = sub.add_parser(
        "embed",
        help="embed texts with a running server",
        description="Embed texts with a running server. Texts come from the arguments, or one "
        "per line on stdin (a blank line is an error: every line is one text). More than "
        f"{STREAM_ABOVE} texts go over one EmbedStream call, so any number works.",
    )
    embed.add_argument("texts", nargs="*", help="texts (default: one per line on stdin)")
    embed.add_argument("--model", default="", help="model name (default: the server's)")
    embed.add_argument("--dimensions", type=int, default=0, help="Matryoshka size (0: native)")
    prompt = embed.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-name", help="a prompt the model ships, e.g. query")
    prompt.add_argument("--prompt", help="a literal prefix put before every text")
    prompt.add_argument(
        "--instruction", help="a task, formatted with the model's instruction template"
    )
    embed.add_argument(
        "--truncation",
        choices=["end", "start", "error"],
        help="texts over the model's token limit: cut the end (default), the start, or fail",
    )
    embed.add_argument("--no-normalize", action="store_true", help="keep the raw vector norm")
    embed.add_argument(
        "--format",
        choices=FORMATS,
        default="json",
        help="json: one object with every vector (default); jsonl: one object per text, "
        "written as they come; npy: a float32 array (binary: redirect it to a file)",
    )
    _add_target(embed)

    models = sub.add_parser(
        "models",
        help="list models: a running server's, else the registry and the cache",
        description="Ask the running server for its models (state, revision, size); with no "
        "server, or with --offline, list the registry names and the local cache instead.",
    )
    models.add_argument(
        "--offline", action="store_true", help="list the registry and cache; ask no server"
    )
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_target(models)

    add_pull_parser(sub)
    add_rm_parser(sub)

    health = sub.add_parser("health", help="exit 0 only if the server is SERVING (exec probe)")
    health.add_argument(
        "--service",
        default="",
        help="a loaded model's name, akidb.embedding.v1.EmbeddingService, or '' for the whole "
        "server (default)",
    )
    _add_target(health)
    return parser


def fail(message: str, code: int = 1) -> int:
    """Every command's errors: `akidb-embed: error: ...` on stderr (as argparse writes)."""
    print(f"akidb-embed: error: {message}", file=sys.stderr)
    return code


def explain(error: EmbedClientError, target: str, timeout: float | None = None) -> str:
    """The client's error, with what to do about it."""
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"no akidb-embed server answers at {target} ({error.message}); start one with "
            "`akidb-embed serve`, or point at it with --socket PATH, --address HOST:PORT or "
            "$AKIDB_EMBED_SOCKET"
        )
    if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        waited = f" within {timeout:g} s" if timeout else ""
        return (
            f"the server at {target} did not answer{waited}; raise --timeout, or check it "
            "with `akidb-embed health`"
        )
    # The server's own messages name the text or option and what to change.
    return f"{error.code.name}: {error.message}"


def self_command() -> str:
    """How the user can run this program again: `akidb-embed` if that is on PATH."""
    script = Path(sys.argv[0])
    if script.name == "akidb-embed":
        found = shutil.which("akidb-embed")
        if found and Path(found).resolve() == script.resolve():
            return "akidb-embed"
        return shlex.quote(os.path.relpath(script) if not script.is_absolute() else str(script))
    return f"{shlex.quote(sys.executable)} -m akidb_embed"


def try_line(server: EmbeddingServer) -> str:
    """The command that embeds a first text with this server, printed once it is SERVING."""
    config = server.config
    command = self_command() + " embed"
    if config.socket_path is not None:
        if config.socket_path != default_socket_path():
            command += f" --socket {shlex.quote(str(config.socket_path))}"
    elif server.addresses:
        command += f" --address {server.addresses[-1]}"
    return f'try: {command} "hello world"'


def model_bytes(names: list[str], local_dirs: list[Path]) -> int:
    """The weights one engine worker will load (files on disk); a guess when unknown."""
    from ..errors import EmbedError
    from ..store.registry import Registry

    registry = Registry()
    total = 0
    for directory in local_dirs:
        with contextlib.suppress(EmbedError):  # the server says what is wrong with it
            registry.add_local(directory)
    for name in names:
        try:
            located = registry.status(registry.resolve(name)).located
        except EmbedError:
            located = None
        total += located.size_bytes if located is not None else DEFAULT_MODEL_BYTES
    return total


def cmd_serve(args: argparse.Namespace) -> int:
    # First: on Linux CPU this may re-execute the process with OpenBLAS preloaded.
    ensure_fast_blas()
    configure_logging(args.log_level, args.log_format)
    on_gpu = gpu_backend() is not None
    if args.no_socket and args.port is None:
        return fail("--no-socket needs --port")
    api_keys: tuple[str, ...] = ()
    if args.api_key_file is not None:
        if args.http_port is None:
            return fail("--api-key-file needs --http-port (the keys guard the HTTP API)")
        try:
            api_keys = load_api_keys(args.api_key_file)
        except ApiKeyError as error:
            return fail(str(error))
    names: list[str] = []
    local_dirs: list[Path] = []
    for model in args.models or [DEFAULT_MODEL]:
        path = Path(model).expanduser()
        if path.is_dir():
            local_dirs.append(path)
            names.append(path.resolve().name)
        else:
            names.append(model)
    base = ServerConfig(
        socket_path=None if args.no_socket else (args.socket or default_socket_path()),
        port=args.port,
        models=names,
        local_model_dirs=local_dirs,
        http_api_keys=api_keys,
    )
    config = apply_settings(base, args)
    budget = args.memory_budget_mb * 2**20 if args.memory_budget_mb else None
    weights = model_bytes(names, local_dirs)
    config.workers = (
        args.workers
        if args.workers is not None
        else default_workers(on_gpu, memory_budget=budget, model_bytes=weights)
    )
    if args.query_workers is not None and args.query_workers < 0:
        return fail(f"--query-workers {args.query_workers}: give 0 or more")
    if args.query_workers and config.workers == 0:
        return fail("--query-workers needs engine workers: give --workers 1 or more")
    config.query_workers = (
        args.query_workers
        if args.query_workers is not None
        else default_query_workers(
            on_gpu, config.workers, memory_budget=budget, model_bytes=weights
        )
    )

    def on_serving(server: EmbeddingServer) -> None:
        if args.log_format == "text":
            print(try_line(server), file=sys.stderr, flush=True)

    try:
        code = asyncio.run(run_server(config, on_serving))
    except SocketInUse as error:
        return fail(str(error))
    # Everything is stopped and drained: leave without the interpreter's teardown, where
    # native thread pools (MLX, the tokenizer's, oneDNN's) can abort the process on their
    # way out and turn a clean exit 0 into SIGABRT.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def read_texts(args: argparse.Namespace) -> list[str] | str:
    """The texts to embed, or an error message. Blank stdin lines are refused: dropping
    them would shift every later vector against its line."""
    if args.texts:
        return list(args.texts)
    if sys.stdin.isatty():
        return "no texts: pass them as arguments, or one per line on stdin"
    texts = []
    for number, line in enumerate(sys.stdin, 1):
        text = line.rstrip("\r\n")
        if not text.strip():
            return (
                f"stdin line {number} is blank; every line is one text: remove blank lines "
                "first (e.g. `grep -v '^[[:space:]]*$'`)"
            )
        texts.append(text)
    if not texts:
        return "no texts: pass them as arguments, or one per line on stdin"
    return texts


def _options(args: argparse.Namespace) -> Options:
    """The per-request options the flags set (unset flags: the server's defaults)."""
    options: Options = {"dimensions": args.dimensions}
    if args.prompt_name is not None:
        options["prompt_name"] = args.prompt_name
    if args.prompt is not None:
        options["prompt"] = args.prompt
    if args.instruction is not None:
        options["instruction"] = args.instruction
    if args.truncation is not None:
        options["truncation"] = args.truncation
    if args.no_normalize:
        options["normalize"] = False
    return options


def _row(index: int, text: str, token_count: int, vector: Any) -> dict[str, Any]:
    return {"index": index, "text": text, "token_count": token_count, "vector": vector.tolist()}


def cmd_embed(args: argparse.Namespace) -> int:
    from akidb_embed_client import EmbedClient, EmbedClientError

    texts = read_texts(args)
    if isinstance(texts, str):
        return fail(texts, 2)
    if args.format == "npy" and sys.stdout.isatty():
        return fail("--format npy writes binary: redirect it to a file (> vectors.npy)", 2)
    target = _target(args)
    streamed = len(texts) > STREAM_ABOVE
    timeout = _timeout(args, None if streamed else 30.0)
    with EmbedClient(target, timeout=timeout) as client:
        try:
            if not streamed:
                try:
                    result = client.embed(texts, model=args.model, **_options(args))
                except EmbedClientError as error:
                    # A server started with a lower --max-texts-per-request says to stream.
                    if error.code != grpc.StatusCode.INVALID_ARGUMENT or (
                        "EmbedStream" not in error.message
                    ):
                        raise
                    return _embed_streamed(client, texts, args)
                head = {
                    "model": result.model,
                    "fingerprint": result.space.fingerprint,
                    "dimensions": result.space.dimensions,
                }
                rows = zip(texts, result.token_counts, result.vectors, strict=True)
                return _write(args.format, head, ((t, c, v) for t, c, v in rows), texts)
            return _embed_streamed(client, texts, args)
        except EmbedClientError as error:
            return fail(explain(error, target, timeout))


def _embed_streamed(client: Any, texts: list[str], args: argparse.Namespace) -> int:
    """More texts than one Embed call takes: one EmbedStream, ids = line indexes."""
    results = client.embed_stream(
        ((str(i), text) for i, text in enumerate(texts)), model=args.model, **_options(args)
    )
    failed: list[str] = []
    # The name the server knows the model by (the stream's space carries the source id).
    name = args.model or next((m.name for m in client.list_models() if m.is_default), "")
    head: dict[str, Any] = {}

    def items() -> Iterator[tuple[str, int, Any]]:
        for item in results:
            index = int(item.id)
            if item.error is not None:
                failed.append(
                    f"text {index + 1} ({texts[index][:40]!r}): "
                    f"{item.error.code.name}: {item.error.message}"
                )
                continue
            if not head and item.space is not None:
                head.update(
                    model=name or item.space.model_id,
                    fingerprint=item.space.fingerprint,
                    dimensions=item.space.dimensions,
                )
            yield texts[index], item.token_count, item.vector

    code = _write(args.format, head, items(), texts, failed)
    if failed:
        for line in failed[:10]:
            print(f"akidb-embed: error: {line}", file=sys.stderr)
        more = f" (and {len(failed) - 10} more)" if len(failed) > 10 else ""
        return fail(f"{len(failed)} of {len(texts)} texts failed{more}; fix them and run again")
    return code


def _write(
    fmt: str,
    head: dict[str, Any],
    rows: Iterator[tuple[str, int, Any]],
    texts: list[str],
    failed: list[str] | None = None,
) -> int:
    import numpy as np

    out = sys.stdout
    if fmt == "jsonl":  # as they come: a reader can start at once (`| head`)
        for index, (text, count, vector) in enumerate(rows):
            out.write(json.dumps(_row(index, text, count, vector)) + "\n")
        out.flush()
        return 0
    collected = list(rows)
    if failed:
        return 0  # the caller reports the failures; no partial output
    if fmt == "npy":
        array = np.stack([v for _, _, v in collected]).astype(np.float32, copy=False)
        np.save(out.buffer, array)
        out.buffer.flush()
        return 0
    embeddings = [_row(i, t, c, v) for i, (t, c, v) in enumerate(collected)]
    json.dump({**head, "embeddings": embeddings}, out)
    out.write("\n")
    out.flush()
    return 0


def _model_dict(model: Any) -> dict[str, Any]:
    data: dict[str, Any] = dataclasses.asdict(model)
    return data


def _json_default(value: Any) -> Any:
    """numpy arrays and scalars (e.g. quantisation ranges) as plain JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def cmd_models(args: argparse.Namespace) -> int:
    from akidb_embed_client import EmbedClient, EmbedClientError

    if args.offline:
        return run_models(args)
    target = _target(args)
    timeout = _timeout(args)
    with EmbedClient(target, timeout=timeout) as client:
        try:
            models = client.list_models()
        except EmbedClientError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE:
                return fail(explain(error, target, timeout))
            print(
                f"akidb-embed: no server answers at {target}; listing the registry and the "
                "cache instead (start one with `akidb-embed serve`)",
                file=sys.stderr,
            )
            return run_models(args)
    if args.json:
        json.dump([_model_dict(m) for m in models], sys.stdout, indent=1, default=_json_default)
        sys.stdout.write("\n")
        return 0
    rows = [("NAME", "STATE", "DIM", "MAX TOKENS", "REVISION", "SIZE", "SOURCE")]
    for m in models:
        state = m.state
        name = m.name + (" (default)" if m.is_default else "")
        size = human_size(m.size_on_disk_bytes) if m.size_on_disk_bytes else "-"
        rows.append(
            (
                name,
                state,
                str(m.dimensions or "-"),
                str(m.max_tokens or "-"),
                m.revision[:12] or "-",
                size,
                m.source,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from akidb_embed_client import EmbedClient, EmbedClientError

    target = _target(args)
    timeout = _timeout(args)
    with EmbedClient(target, timeout=timeout) as client:
        try:
            status = client.check(args.service)
        except EmbedClientError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                return fail(explain(error, target, timeout))
            return fail(unknown_service(client, args.service, target))
    print(status)
    return 0 if status == "SERVING" else 1


def unknown_service(client: Any, service: str, target: str) -> str:
    from akidb_embed_client import EmbedClientError

    try:
        loaded = [m.name for m in client.list_models() if m.state == "loaded"]
    except EmbedClientError:
        loaded = []
    models = f" or a loaded model ({', '.join(loaded)})" if loaded else " or a loaded model"
    return (
        f"the server at {target} has no health status for {service!r}; ask for '' (the whole "
        f"server, the default), akidb.embedding.v1.EmbeddingService{models}; "
        "`akidb-embed models` lists the models"
    )


COMMANDS = {
    "serve": cmd_serve,
    "embed": cmd_embed,
    "models": cmd_models,
    "health": cmd_health,
    "pull": run_pull,
    "rm": run_rm,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader went away (`akidb-embed embed ... | head -c 100`): stop quietly, and keep
        # the interpreter's final flush from failing on the closed pipe too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
