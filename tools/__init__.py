"""Repository tools: the node lab, the demo and the benchmarks."""
