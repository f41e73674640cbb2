"""Real text nobody here wrote: docstrings of the Python standard library (PSF License).

Read with `ast` (nothing is imported), split into paragraph passages, some joined with their
neighbour so lengths vary. The server ships a fixed sample of them (`data/calibration.txt`,
one passage a line, written by `python -m akidb_embed.modeling.corpus`) so that calibration and the
self-check do not depend on the Python version that runs it; the benchmarks and tests read
the whole library.
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
_WHITESPACE = re.compile(r"\s+")

CALIBRATION_FILE = Path(__file__).parent.parent / "data" / "calibration.txt"
# Passages in the shipped sample, and the longest one kept (characters).
CALIBRATION_SIZE = 512
CALIBRATION_MAX_CHARS = 1200
# Texts of the load-time self-check: every this-many-th calibration passage.
PROBE_STRIDE = 32


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


@cache
def calibration_texts() -> tuple[str, ...]:
    """The shipped calibration corpus, in its fixed order."""
    lines = CALIBRATION_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line.strip())


def probe_texts() -> tuple[str, ...]:
    """The 16 texts the self-check embeds: fixed, of varied length."""
    return calibration_texts()[::PROBE_STRIDE][:16]


def write_calibration(path: Path = CALIBRATION_FILE, seed: int = 0) -> int:
    """Draw the calibration sample from this Python's standard library and write it."""
    pool = [p for p in passages(seed) if len(p) <= CALIBRATION_MAX_CHARS]
    chosen = random.Random(seed).sample(pool, CALIBRATION_SIZE)
    path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return len(chosen)


if __name__ == "__main__":
    count = write_calibration(Path(sys.argv[1]) if len(sys.argv) > 1 else CALIBRATION_FILE)
    print(f"wrote {count} passages")
