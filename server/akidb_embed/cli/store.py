"""`akidb-embed pull | models | rm`: the model store on the command line.

cli.py adds these with `add_store_commands(subparsers)`; each parser sets `handler`, a
function of the parsed arguments that returns the exit code. `models` here lists what is on
disk; the caller may pass the names a running server has loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from ..errors import EmbedError
from ..store.model_cache import human_size
from ..store.registry import BUNDLED, CacheState, Registry

EXIT_OK = 0
EXIT_ERROR = 1


def _err(message: str) -> None:
    """The same prefix as every other command's errors (and argparse's)."""
    print(f"akidb-embed: error: {message}", file=sys.stderr)


def _note(message: str) -> None:
    print(message, file=sys.stderr)


# --- pull ------------------------------------------------------------------------------


def add_pull_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub into the cache",
        description="Download a model (safetensors only) into the cache and verify it. "
        "A verified copy already cached is not fetched again.",
    )
    parser.add_argument(
        "name", help="registry name (see `akidb-embed models`) or Hub id org/name[@revision]"
    )
    parser.add_argument(
        "--revision", help="branch, tag or commit to pull (default: the default branch)"
    )
    parser.add_argument(
        "--force", action="store_true", help="fetch every file again, even if cached"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar per file (default: when stderr is a terminal)",
    )
    parser.set_defaults(handler=run_pull)
    return parser


def run_pull(args: argparse.Namespace, registry: Registry | None = None) -> int:
    registry = registry or Registry()
    try:
        name = args.name if not args.revision else f"{args.name.split('@')[0]}@{args.revision}"
        entry = registry.resolve(name)
        _note(f"pulling {entry.name} ({entry.source}) into {registry.root}")
        started = time.monotonic()
        located = registry.pull(
            entry, force=args.force, notify=_note, progress=getattr(args, "progress", None)
        )
    except EmbedError as exc:
        _err(exc.message)
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err(f"pull of {args.name} interrupted; run the same command to finish it")
        return 130
    seconds = time.monotonic() - started
    print(
        f"{entry.name}: {entry.source} at {located.revision} "
        f"({human_size(located.size_bytes)} on disk, {seconds:.1f} s) in {located.directory}"
    )
    return EXIT_OK


# --- models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    name: str
    source: str
    status: str
    revision: str
    size_bytes: int
    directory: str
    loaded: bool | None
    description: str
    problem: str = ""


def model_rows(registry: Registry, loaded: Collection[str] | None = None) -> list[ModelRow]:
    """Every model the registry knows or the cache holds, content verified (sha256 against the
    recorded checksums: this reads every file). `loaded`: names a server has loaded (None:
    unknown, no server asked)."""
    rows = []
    for entry in registry.entries():
        status = registry.status(entry, deep=True)
        located = status.located
        rows.append(
            ModelRow(
                name=entry.name,
                source=entry.source,
                status=status.state.value,
                revision=located.revision if located else "",
                size_bytes=located.size_bytes if located else 0,
                directory=str(located.directory) if located else "",
                loaded=None if loaded is None else entry.name in loaded,
                description=entry.description,
                problem=status.problem,
            )
        )
    return rows


def format_models(rows: list[ModelRow], out: TextIO) -> None:
    show_loaded = any(r.loaded is not None for r in rows)
    header = ["NAME", "SOURCE", "STATUS", "REVISION", "SIZE"] + (["LOADED"] if show_loaded else [])
    table = [header]
    for row in rows:
        cells = [
            row.name,
            row.source,
            row.status,
            row.revision[:12] if row.revision else "-",
            human_size(row.size_bytes) if row.size_bytes else "-",
        ]
        if show_loaded:
            cells.append("yes" if row.loaded else "no")
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for cells in table:
        out.write("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip() + "\n")
    for row in rows:
        if row.problem:
            out.write(f"{row.name}: {row.problem}; run `akidb-embed pull {row.name} --force`\n")


def add_models_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "models",
        help="list known and cached models",
        description="List registry names and cached models: source, status, pinned revision, "
        "size on disk. Every file's sha256 is checked against the one recorded when it was "
        "pulled (or installed), so damaged copies show as damaged.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run_models)
    return parser


def run_models(
    args: argparse.Namespace,
    registry: Registry | None = None,
    loaded: Collection[str] | None = None,
) -> int:
    registry = registry or Registry()
    try:
        rows = model_rows(registry, loaded)
    except EmbedError as exc:
        _err(exc.message)
        return EXIT_ERROR
    if getattr(args, "json", False):
        json.dump([asdict(r) for r in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        format_models(rows, sys.stdout)
        _note(f"cache: {registry.root}")
    return EXIT_OK


# --- rm --------------------------------------------------------------------------------


def add_rm_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "rm",
        help="delete a model from the cache",
        description="Delete a model's files from the cache (only one revision with "
        "NAME@REVISION). A running server keeps a model it has loaded until it restarts.",
    )
    parser.add_argument("name", help="registry name or Hub id org/name[@revision]")
    parser.set_defaults(handler=run_rm)
    return parser


def run_rm(args: argparse.Namespace, registry: Registry | None = None) -> int:
    registry = registry or Registry()
    try:
        entry = registry.resolve(args.name)
        removed = registry.remove(entry)
    except EmbedError as exc:
        _err(exc.message)
        return EXIT_ERROR
    bundled = BUNDLED.get(entry.name)
    if removed:
        print(f"removed {entry.name} ({entry.source}: {', '.join(c[:12] for c in removed)})")
    if bundled is not None and bundled() is not None:
        _note(f"{entry.name} also ships with the Python package; that copy stays in use")
        return EXIT_OK
    if not removed:
        _err(f"{entry.name} is not in the cache ({registry.root}); nothing to remove")
        return EXIT_ERROR
    if registry.status(entry).state is CacheState.MISSING:
        _note(f"to get it back: akidb-embed pull {entry.name}")
    return EXIT_OK


# --- wiring ----------------------------------------------------------------------------


def add_store_commands(subparsers: Any) -> None:
    """Add `pull`, `models` and `rm` to a parser's subcommands."""
    add_pull_parser(subparsers)
    add_models_parser(subparsers)
    add_rm_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="akidb-embed", description="akidb-embed model store")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_store_commands(subparsers)
    args = parser.parse_args(argv)
    handler = args.handler
    code: int = handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
