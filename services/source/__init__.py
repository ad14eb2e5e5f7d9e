"""Source worker: everything that happens on the host a container leaves."""
