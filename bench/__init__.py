"""Benchmarks: `make bench` (Turnout side by side with peers), `make bench-soak`, profiles."""
