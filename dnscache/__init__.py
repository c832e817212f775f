"""ultranet node DNS cache: a multi-core caching forwarder."""
