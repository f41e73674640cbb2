"""A corpus of real text not written by us: docstrings of the Python standard library.

Read with `ast` (nothing is imported), split into paragraph passages, some joined with
their neighbour so lengths vary from a few tokens to past the model's limit.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
_WHITESPACE = re.compile(r"\s+")


def stdlib_files(root: Path | None = None) -> list[Path]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)
    )


def docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def paragraphs(doc: str) -> list[str]:
    parts = (_WHITESPACE.sub(" ", p).strip() for p in re.split(r"\n\s*\n", doc))
    return [p for p in parts if len(p) >= 20]


def passages(seed: int = 0) -> list[str]:
    """Every passage, in a fixed order: a paragraph, or it joined with the next (1 in 4)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    for path in stdlib_files():
        for doc in docstrings(path):
            paras = paragraphs(doc)
            i = 0
            while i < len(paras):
                take = 2 if rng.random() < 0.25 and i + 1 < len(paras) else 1
                text = " ".join(paras[i : i + take])
                i += take
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    return out


def sample(n: int, seed: int = 0) -> list[str]:
    """`n` passages drawn without replacement (cycled if the library has fewer)."""
    pool = passages(seed)
    rng = random.Random(seed)
    if n <= len(pool):
        return rng.sample(pool, n)
    return [pool[i % len(pool)] for i in range(n)]


@dataclass(frozen=True)
class LengthStats:
    count: int
    total_tokens: int
    mean: float
    p10: int
    p50: int
    p90: int
    p99: int
    max: int
    truncated: int

    @classmethod
    def of(cls, lengths: Sequence[int], limit: int) -> LengthStats:
        arr = np.asarray(lengths)
        q = np.percentile(arr, [10, 50, 90, 99]).astype(int)
        return cls(
            count=len(arr),
            total_tokens=int(arr.sum()),
            mean=float(arr.mean()),
            p10=int(q[0]),
            p50=int(q[1]),
            p90=int(q[2]),
            p99=int(q[3]),
            max=int(arr.max()),
            truncated=int((arr >= limit).sum()),
        )
