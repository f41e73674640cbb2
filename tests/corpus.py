"""Real text not written by us: sentences from the Python standard library's docstrings."""

from __future__ import annotations

import importlib
import inspect
import re

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


def docstring_sentences(limit: int, min_chars: int = 20) -> list[str]:
    """Up to `limit` distinct sentences, in a fixed order, from module and member docstrings."""
    seen: set[str] = set()
    out: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""]
        for _, member in sorted(vars(module).items()):
            if inspect.isclass(member) or inspect.isfunction(member):
                docs.append(inspect.getdoc(member) or "")
        for doc in docs:
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if len(sentence) >= min_chars and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
                    if len(out) >= limit:
                        return out
    return out


def parity_texts(count: int = 64) -> list[str]:
    texts = docstring_sentences(count - len(EXTRA)) + EXTRA
    # Lengths must vary: add whole docstrings (some longer than the model's window).
    texts.append(inspect.getdoc(importlib.import_module("argparse")) or "")
    texts.append(inspect.getdoc(importlib.import_module("json")) or "")
    return texts
