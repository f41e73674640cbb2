"""Architectures by config.json's `model_type`: one flat module each."""

from __future__ import annotations

import importlib
from types import ModuleType

from ...errors import ModelLoadError

# model_type -> module that defines ModelArgs, Model and sanitize().
ARCHITECTURES: dict[str, str] = {
    "bert": "akidb_embed.modeling.models.bert",
    "gemma3_text": "akidb_embed.modeling.models.gemma3_text",
    "qwen3": "akidb_embed.modeling.models.qwen3",
}


def architecture_module(model_type: str) -> ModuleType:
    module = ARCHITECTURES.get(model_type)
    if module is None:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported; supported architectures: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    return importlib.import_module(module)
