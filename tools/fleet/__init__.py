"""Fleet runs: many real node agents against one emulated, throttled EC2 account."""
