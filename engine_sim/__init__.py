"""vLLM-compatible engine simulator for tests, demos and benchmarks."""
