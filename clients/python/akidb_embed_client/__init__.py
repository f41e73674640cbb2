"""Typed Python client for the akidb-embed sidecar."""

from .client import (
    AsyncEmbedClient,
    EmbedClient,
    EmbedClientError,
    EmbedResult,
    Space,
    StreamResult,
    default_target,
)

__all__ = [
    "AsyncEmbedClient",
    "EmbedClient",
    "EmbedClientError",
    "EmbedResult",
    "Space",
    "StreamResult",
    "default_target",
]
