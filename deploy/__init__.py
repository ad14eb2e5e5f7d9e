"""Deployment: the lab of simulated hosts, NATS configs and systemd units."""
