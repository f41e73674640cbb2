"""Turning token ids into vectors: the engine's two halves, loading, tokenisation,
precision, encodings, and one flat file per architecture (models/)."""
