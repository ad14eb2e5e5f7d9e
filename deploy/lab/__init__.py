"""A lab of simulated hosts on one machine: each host a network namespace plus a private
mount namespace, all on one "datacenter" bridge, with one NATS JetStream server."""
