"""Texts for the parity tests: sentences of the Python standard library's docstrings (read
with akidb_embed.modeling.corpus, which the server uses for calibration), and a few other
scripts and formats."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from akidb_embed.modeling.corpus import docstrings

MODULES = [
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions",
    "functools", "heapq", "http.client", "json", "logging", "pathlib", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "unittest", "urllib.parse", "uuid", "zipfile",
]  # fmt: skip

# Texts a real corpus has too: other scripts, emoji, numbers, markup.
EXTRA = [
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "¿Dónde está la biblioteca más cercana?",
    "🙂🚀 launch day! 🎉",
    "SELECT id, title FROM documents WHERE score > 0.85 ORDER BY score DESC;",
    "3.14159 2.71828 1.41421 1.73205",
    "<p>Hello <b>world</b></p>",
]


def _module_docstrings(name: str) -> list[str]:
    """A standard library module's docstrings, read from its source (akidb_embed's corpus
    reader: nothing is imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return []
    return list(docstrings(Path(spec.origin)))


def docstring_sentences(limit: int, min_chars: int = 20) -> list[str]:
    """Up to `limit` distinct sentences, in a fixed order, from module and member docstrings."""
    seen: set[str] = set()
    out: list[str] = []
    for name in MODULES:
        for doc in _module_docstrings(name):
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if len(sentence) >= min_chars and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
                    if len(out) >= limit:
                        return out
    return out


def parity_texts(count: int = 64) -> list[str]:
    texts = docstring_sentences(count - len(EXTRA)) + EXTRA
    # Lengths must vary: add whole module docstrings (some longer than the model's window).
    texts.append(_module_docstrings("argparse")[0])
    texts.append(_module_docstrings("json")[0])
    return texts
