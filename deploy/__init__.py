"""Deployment, as far as it exists today: everything to run Ferry on one machine.

- `deploy/lab/`: the lab of simulated hosts (network + private mount namespaces, one
  single-node NATS JetStream server whose config the lab writes when it starts);
- `deploy/setup/`: `make setup` (packages, CRIU, pycriu, nats-server, the venv);
- `deploy/bench/`: `make bench`; `deploy/chaos.py`: `make chaos`;
- `deploy/demo.py`: `make demo`; `deploy/minecraft/`: the Minecraft demo (`make demo-minecraft`).

A systemd unit for the agent and NATS cluster configs come with the real-deployment work.
"""
