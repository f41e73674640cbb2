"""Where and when compute runs: the scheduler thread, the engine worker processes."""
