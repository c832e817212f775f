"""The cloud emulator: EC2 state, the EC2 Query API and IMDS, served over HTTP on loopback."""
