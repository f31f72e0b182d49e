"""Benchmark harness: Fender against an upstream, a bare aiohttp pass-through and its peers.

Entry point: `python -m bench.run` (or `make bench`). See README section "Benchmarks".
"""
