"""A stand-in for vLLM in the suite (tests of `bench.peers`): only what the benchmarks call."""

__version__ = "0.0-fake"
