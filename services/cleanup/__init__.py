"""Cleanup worker: removes what a host no longer needs."""
