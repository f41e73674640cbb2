"""The package's layers (server/akidb_embed/*/): imports point one way, down.

From the top: cli, api, service, observability, runtime, store, modeling, host. A module may
import its own layer and those below it, and the package root (`errors`, `__version__`);
nothing imports `api` but `cli`. Below `api` nothing imports grpc: the domain is the same for
the gRPC and the HTTP front end.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "server" / "akidb_embed"
LAYERS = ["host", "modeling", "store", "runtime", "observability", "service", "api", "cli"]
ROOT_MODULES = {"akidb_embed", "akidb_embed.errors"}
TRANSPORTS = ("grpc", "grpc_health", "grpc_reflection", "akidb.embedding", "starlette", "uvicorn")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file (or in `text`, read as if it were
    that file), nested ones included."""
    current = module_name(path)
    package = current if path.name == "__init__.py" else current.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from . import x` names a module too
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "akidb_embed" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "bundled" not in p.parts)


def test_every_module_lives_in_a_layer() -> None:
    loose = sorted(
        p.name for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__", "errors")
    )
    assert loose == [], "modules outside a layer folder"
    assert {
        p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    } >= set(LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    source = module_name(path)
    here = layer_of(source)
    wrong = []
    for line, target in imports(path):
        there = layer_of(target)
        if there is None:
            continue
        if source.endswith("__main__"):
            allowed = there == "cli"
        elif here is None:  # the root: errors, __init__
            allowed = False
        else:
            allowed = LAYERS.index(there) <= LAYERS.index(here)
        if not allowed:
            wrong.append(f"line {line}: {source} ({here or 'root'}) imports {target} ({there})")
    assert wrong == []


@pytest.mark.parametrize(
    "path",
    [p for p in SOURCES if layer_of(module_name(p)) not in ("api", "cli")],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_below_the_api_nothing_speaks_a_transport(path: Path) -> None:
    spoken = [
        f"line {line}: {target}"
        for line, target in imports(path)
        if target.startswith(TRANSPORTS) and not target.startswith("akidb_embed")
    ]
    assert spoken == []


def test_the_checker_sees_an_upward_import() -> None:
    """The rule can fail: an upward import, relative and nested in a function, is found."""
    device = PACKAGE / "host" / "device.py"
    text = device.read_text() + "\n\ndef _probe() -> None:\n    from ..service import service\n"
    found = [target for _, target in imports(device, text)]
    assert "akidb_embed.service.service" in found
    assert [t for t in found if layer_of(t) not in (None, "host")] == [
        "akidb_embed.service",
        "akidb_embed.service.service",
    ]
