"""Benchmarks: throughput and memory (more in later issues)."""
