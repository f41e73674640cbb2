"""Typed Python client for the akidb-embed sidecar."""

from .client import (
    DEFAULT_TIMEOUT,
    AsyncEmbedClient,
    EmbedClient,
    EmbedClientError,
    EmbedResult,
    Health,
    ModelHealth,
    ModelInfo,
    Options,
    ServerLimits,
    Space,
    StreamResult,
    default_target,
)
from .replicas import PoolCounters

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncEmbedClient",
    "EmbedClient",
    "EmbedClientError",
    "EmbedResult",
    "Health",
    "ModelHealth",
    "ModelInfo",
    "Options",
    "PoolCounters",
    "ServerLimits",
    "Space",
    "StreamResult",
    "default_target",
]
