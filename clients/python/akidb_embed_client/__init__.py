"""Typed Python client for the akidb-embed sidecar."""

from .client import (
    DEFAULT_TIMEOUT,
    AsyncEmbedClient,
    Chunk,
    EmbedClient,
    EmbedClientError,
    EmbedResult,
    Health,
    ModelHealth,
    ModelInfo,
    Options,
    QuantizationRanges,
    ServerLimits,
    Space,
    StreamResult,
    default_target,
)
from .replicas import PoolCounters

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncEmbedClient",
    "Chunk",
    "EmbedClient",
    "EmbedClientError",
    "EmbedResult",
    "Health",
    "ModelHealth",
    "ModelInfo",
    "Options",
    "PoolCounters",
    "QuantizationRanges",
    "ServerLimits",
    "Space",
    "StreamResult",
    "default_target",
]
