"""Real processes for tests and benchmarks (not shipped in the package)."""
