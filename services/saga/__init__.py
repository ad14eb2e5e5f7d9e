"""The saga's edge on the bus: the runner every worker shares and its layers, what a step
handler receives and returns, publishing decisions, and compare-and-set transitions."""
