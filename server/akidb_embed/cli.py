"""`akidb-embed`: serve, embed, models, health, pull, rm."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from .blas import ensure_fast_blas, mlx_uses_gpu
from .logs import configure_logging
from .model_cache import human_size
from .pulls import PullLimits
from .registry import DEFAULT_MODEL
from .residency import ModelBudget
from .server import DEFAULT_BULK_BATCH_MS, DEFAULT_BULK_FILL_MS, ServerConfig, run_server
from .service import Limits
from .store_cli import add_pull_parser, add_rm_parser, run_models, run_pull, run_rm
from .unix_socket import SocketInUse, default_socket_path
from .workers import Watchdog, default_batch_tokens, default_workers


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        help=f"server's Unix socket (default: {default_socket_path()}, or $AKIDB_EMBED_SOCKET)",
    )
    parser.add_argument("--address", help="server's host:port, instead of a socket")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")


def _target(args: argparse.Namespace) -> str:
    return str(args.address or args.socket or default_socket_path())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="akidb-embed", description="AkiDB's embedding sidecar: a gRPC server for MLX models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--socket", type=Path, help=f"Unix socket (default {default_socket_path()})")
    serve.add_argument("--no-socket", action="store_true", help="TCP only (needs --port)")
    serve.add_argument("--port", type=int, help="also listen on TCP (0 picks a free port)")
    serve.add_argument("--host", default="127.0.0.1", help="TCP bind address (default loopback)")
    serve.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME_OR_DIR",
        help=f"preload this model (repeatable; the first is the default; default {DEFAULT_MODEL})",
    )
    serve.add_argument(
        "--allow-downloads",
        action="store_true",
        help="pull a known model from the Hub on its first request (default: "
        "FAILED_PRECONDITION with the pull command)",
    )
    serve.add_argument(
        "--max-concurrent-pulls",
        type=int,
        default=PullLimits.max_concurrent,
        help="with --allow-downloads: Hub pulls at once; a request needing one more gets "
        f"RESOURCE_EXHAUSTED (default {PullLimits.max_concurrent})",
    )
    serve.add_argument(
        "--pull-timeout",
        type=float,
        default=PullLimits.timeout_s,
        help="with --allow-downloads: seconds before requests waiting on a pull get "
        f"UNAVAILABLE (default {PullLimits.timeout_s:g}); `akidb-embed pull` has no limit",
    )
    serve.add_argument("--grace", type=float, default=30.0, help="drain seconds on SIGTERM")
    serve.add_argument("--socket-mode", default="600", help="socket permissions, octal (600)")
    serve.add_argument(
        "--trust-socket-parents",
        action="store_true",
        help="accept world-writable directories above the socket's own directory (a volume "
        "that only this user's processes reach, e.g. a Kubernetes emptyDir); refused otherwise",
    )
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text lines, or one JSON object per line (both carry the request id)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port)",
    )
    serve.add_argument(
        "--metrics-host", default="127.0.0.1", help="metrics bind address (default loopback)"
    )
    limits = serve.add_argument_group("batching and limits")
    limits.add_argument(
        "--max-batch-tokens",
        type=int,
        help="padded tokens per batch (default: 512 on CPU, where batches that fit the cache "
        "are fastest; 8192 on a GPU)",
    )
    limits.add_argument(
        "--workers",
        type=int,
        help="engine worker processes, each with its own copy of the models, supervised: a "
        "dead or hung one is replaced and its batch re-run (default: one per core on CPU, 1 "
        "on a GPU; 0 runs the models in the server process, unsupervised)",
    )
    limits.add_argument(
        "--batch-timeout",
        type=float,
        default=Watchdog.min_seconds,
        help="seconds a batch may take at least before its worker counts as hung (the limit "
        "grows with the batch's size: 20x its expected time)",
    )
    limits.add_argument(
        "--bulk-batch-ms",
        type=float,
        default=DEFAULT_BULK_BATCH_MS,
        help="while queries arrive, cut bulk batches to about this much compute, so a query "
        "waits little (0: never cut)",
    )
    limits.add_argument(
        "--bulk-fill-ms",
        type=float,
        default=DEFAULT_BULK_FILL_MS,
        help="let a small bulk batch wait up to this long for more texts (queries never wait)",
    )
    limits.add_argument("--max-batch-size", type=int, default=64, help="texts per batch")
    limits.add_argument("--max-texts-per-request", type=int, default=Limits.max_texts_per_request)
    limits.add_argument("--max-chars-per-text", type=int, default=Limits.max_chars_per_text)
    limits.add_argument(
        "--max-chars-per-request",
        type=int,
        default=Limits.max_chars_per_request,
        help="characters of one Embed request (RESOURCE_EXHAUSTED past it)",
    )
    limits.add_argument(
        "--max-chars-in-flight",
        type=int,
        default=Limits.max_chars_in_flight,
        help="characters of text being worked on at once: past it Embed gets "
        "RESOURCE_EXHAUSTED and streams wait",
    )
    limits.add_argument(
        "--max-queued-tokens",
        type=int,
        default=Limits.max_queued_tokens,
        help="past it, Embed calls get RESOURCE_EXHAUSTED (streams wait)",
    )
    limits.add_argument(
        "--stream-window",
        type=int,
        default=ServerConfig.stream_window,
        help="items of one stream in flight; past it the server stops reading the stream",
    )
    limits.add_argument("--max-message-mb", type=int, default=64, help="gRPC message size limit")
    memory = serve.add_argument_group("models in memory")
    memory.add_argument("--max-loaded-models", type=int, default=0, help="0: no limit")
    memory.add_argument("--max-loaded-mb", type=int, default=0, help="0: no limit")
    memory.add_argument(
        "--keep-alive",
        type=float,
        default=ModelBudget.keep_alive_seconds,
        help="seconds an on-demand model stays loaded when idle (0: forever); "
        "preloaded models always stay",
    )

    embed = sub.add_parser("embed", help="embed texts with a running server; JSON out")
    embed.add_argument("texts", nargs="*", help="texts (default: one per line on stdin)")
    embed.add_argument("--model", default="", help="model name (default: the server's)")
    embed.add_argument("--dimensions", type=int, default=0)
    embed.add_argument("--prompt-name", help="a prompt the model ships, e.g. query")
    embed.add_argument("--no-normalize", action="store_true")
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
    models.add_argument("--json", action="store_true", help="JSON (with --offline or no server)")
    _add_target(models)

    add_pull_parser(sub)
    add_rm_parser(sub)

    health = sub.add_parser("health", help="exit 0 only if the server is SERVING (exec probe)")
    health.add_argument("--service", default="", help="a model name, or '' for the server")
    _add_target(health)
    return parser


def fail(message: str, code: int = 1) -> int:
    print(f"akidb-embed: {message}", file=sys.stderr)
    return code


def explain(error: Exception, target: str) -> str:
    from akidb_embed_client import EmbedClientError

    if isinstance(error, EmbedClientError) and error.code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"no akidb-embed server answers at {target} ({error.message}); "
            "start one with `akidb-embed serve`, or pass --socket/--address"
        )
    return str(error)


def cmd_serve(args: argparse.Namespace) -> int:
    # First: on Linux CPU this may re-execute the process with OpenBLAS preloaded.
    ensure_fast_blas()
    configure_logging(args.log_level, args.log_format)
    on_gpu = mlx_uses_gpu()
    if args.no_socket and args.port is None:
        return fail("--no-socket needs --port")
    names: list[str] = []
    local_dirs: list[Path] = []
    for model in args.models or [DEFAULT_MODEL]:
        path = Path(model).expanduser()
        if path.is_dir():
            local_dirs.append(path)
            names.append(path.resolve().name)
        else:
            names.append(model)
    config = ServerConfig(
        socket_path=None if args.no_socket else (args.socket or default_socket_path()),
        port=args.port,
        host=args.host,
        models=names,
        local_model_dirs=local_dirs,
        socket_mode=int(args.socket_mode, 8),
        trust_socket_parents=args.trust_socket_parents,
        grace_seconds=args.grace,
        max_batch_tokens=args.max_batch_tokens or default_batch_tokens(on_gpu),
        workers=args.workers if args.workers is not None else default_workers(on_gpu),
        max_batch_size=args.max_batch_size,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        stream_window=args.stream_window,
        bulk_batch_seconds=args.bulk_batch_ms / 1000,
        bulk_fill_seconds=args.bulk_fill_ms / 1000,
        watchdog=Watchdog(min_seconds=args.batch_timeout),
        limits=Limits(
            max_texts_per_request=args.max_texts_per_request,
            max_chars_per_text=args.max_chars_per_text,
            max_chars_per_request=args.max_chars_per_request,
            max_chars_in_flight=args.max_chars_in_flight,
            max_queued_tokens=args.max_queued_tokens,
        ),
        allow_downloads=args.allow_downloads,
        pulls=PullLimits(max_concurrent=args.max_concurrent_pulls, timeout_s=args.pull_timeout),
        budget=ModelBudget(
            max_models=args.max_loaded_models,
            max_bytes=args.max_loaded_mb * 1024 * 1024,
            keep_alive_seconds=args.keep_alive,
        ),
    )
    try:
        return asyncio.run(run_server(config))
    except SocketInUse as error:
        return fail(str(error))


def cmd_embed(args: argparse.Namespace) -> int:
    from akidb_embed_client import EmbedClient, EmbedClientError, Options

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        return fail("no texts: pass them as arguments or one per line on stdin", 2)
    target = _target(args)
    with EmbedClient(target, timeout=args.timeout) as client:
        try:
            options: Options = {"dimensions": args.dimensions}
            if args.prompt_name:
                options["prompt_name"] = args.prompt_name
            if args.no_normalize:
                options["normalize"] = False
            result = client.embed(texts, model=args.model, **options)
        except EmbedClientError as error:
            return fail(explain(error, target))
    out = {
        "model": result.model,
        "fingerprint": result.space.fingerprint,
        "dimensions": result.space.dimensions,
        "embeddings": [
            {"text": text, "token_count": count, "vector": vector.tolist()}
            for text, count, vector in zip(texts, result.token_counts, result.vectors, strict=True)
        ],
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from akidb_embed_client import EmbedClient, EmbedClientError

    if args.offline:
        return run_models(args)
    target = _target(args)
    with EmbedClient(target, timeout=args.timeout) as client:
        try:
            models = client.list_models()
        except EmbedClientError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE:
                return fail(explain(error, target))
            print(f"no akidb-embed server answers at {target}; listing the cache", file=sys.stderr)
            return run_models(args)
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
    with EmbedClient(target, timeout=args.timeout) as client:
        try:
            status = client.check(args.service)
        except EmbedClientError as error:
            return fail(explain(error, target))
    print(status)
    return 0 if status == "SERVING" else 1


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
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
