"""Models on disk and on the Hub: the registry, the verified cache, pulls."""
