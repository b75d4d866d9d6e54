"""Measured comparisons of memengine against plain PyTorch, shared by the benchmarks, the tests and the command line."""
