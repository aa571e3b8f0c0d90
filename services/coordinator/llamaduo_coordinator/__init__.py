"""The coordinator: the only decider and the only owner of migration state."""
