"""Evaluation and benchmarking: image metrics and the benchmark sets."""
