"""ultranet CNI plugin: the exec shim, CNI spec types and pod plumbing."""
