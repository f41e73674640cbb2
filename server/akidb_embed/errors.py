"""Domain errors. Each names the kind of failure; the gRPC layer maps kinds to status codes.

Messages are for people: say what was wrong and what to change.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class EmbedError(Exception):
    """Base of every error the domain layer reports to a caller."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(EmbedError):
    kind = ErrorKind.INVALID_ARGUMENT


class ModelNotFound(EmbedError):
    kind = ErrorKind.NOT_FOUND


class ModelNotAvailable(EmbedError):
    """The model is known but cannot serve now (not downloaded, failed to load)."""

    kind = ErrorKind.FAILED_PRECONDITION


class Overloaded(EmbedError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Unavailable(EmbedError):
    """The server is starting or shutting down."""

    kind = ErrorKind.UNAVAILABLE


class DeadlineExceeded(EmbedError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Cancelled(EmbedError):
    kind = ErrorKind.CANCELLED


class ModelLoadError(EmbedError):
    """A model's files are unusable: unsupported architecture, corrupt or missing weights."""

    kind = ErrorKind.FAILED_PRECONDITION


class HubUnavailable(EmbedError):
    """The Hugging Face Hub cannot be reached (no network, DNS, proxy, Hub down, rate limit)."""

    kind = ErrorKind.UNAVAILABLE


class HubAccessDenied(EmbedError):
    """The repository is gated or private and the token is missing or lacks access."""

    kind = ErrorKind.FAILED_PRECONDITION


class DiskFull(EmbedError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class UnsupportedModel(ModelLoadError):
    """The repository can never be served: no safetensors, or an architecture akidb-embed lacks."""


class DamagedModel(ModelLoadError):
    """Cached files fail verification (truncated, garbled, missing)."""
