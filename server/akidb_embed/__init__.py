"""akidb-embed: the embedding sidecar of AkiDB."""

__version__ = "0.1.0"
