"""The node lab: an EC2 + IMDS emulator and an instance built from network namespaces."""
