"""The domain service: budgets, residency, pulls in the background, self-checks.
No gRPC here."""
