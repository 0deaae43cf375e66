"""Benchmarks of the chat service, run by hand: `python -m bench` (see bench/README.md)."""
