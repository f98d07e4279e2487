"""Distributed-test fixtures (gloo process launcher, tmpfs roots). Filled in by the test work."""
