"""``make demo``: the lab end to end, printed for people."""
