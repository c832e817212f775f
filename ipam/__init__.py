"""ultranet IPAM: the node daemon's address management, the shared subnet allocator,
instance network limits and the NAU planner."""
