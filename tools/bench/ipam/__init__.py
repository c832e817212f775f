"""Benchmark of the node IPAM daemon."""
