"""Benchmarks: the figures in each package README, and the commands behind them."""
