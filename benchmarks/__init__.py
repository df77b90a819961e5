"""Benchmark scripts: each prints ratios against its baseline measured in the same run."""
