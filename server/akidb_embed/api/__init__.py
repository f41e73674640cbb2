"""Transports and the server's lifecycle: gRPC, the HTTP API, the Unix socket,
the configuration."""
