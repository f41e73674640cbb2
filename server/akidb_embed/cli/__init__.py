"""The `akidb-embed` command."""
