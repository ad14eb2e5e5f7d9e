"""Destination worker: everything that happens on the host a container arrives at."""
