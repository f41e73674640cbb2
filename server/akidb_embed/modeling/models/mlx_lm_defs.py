"""Import mlx-lm's model definitions (`mlx_lm.models.<name>`) without mlx-lm's top package.

`mlx_lm/__init__.py` imports its generate/convert API, which imports transformers (and torch
when it is installed): 3.8 s and +230 MB RSS measured here, for nothing the server uses. The
model definition files only import MLX and each other, so they are loaded under a bare package
object that stands in for `mlx_lm` while they import, and is removed afterwards; a later
`import mlx_lm` runs the real package normally and reuses the already loaded definitions.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

_lock = threading.Lock()


def mlx_lm_model(name: str) -> ModuleType:
    """`mlx_lm.models.<name>`, e.g. "qwen3" or "gemma3_text"."""
    qualified = f"mlx_lm.models.{name}"
    with _lock:
        if qualified in sys.modules or "mlx_lm" in sys.modules:
            return importlib.import_module(qualified)
        spec = importlib.util.find_spec("mlx_lm")
        if spec is None:
            raise ImportError("mlx-lm is not installed; install akidb-embed's dependencies")
        sys.modules["mlx_lm"] = importlib.util.module_from_spec(spec)
        try:
            return importlib.import_module(qualified)
        finally:
            del sys.modules["mlx_lm"]
