"""Ferry's processes: host runtime adapters, the bus edge, workers, the agent and the CLI."""
