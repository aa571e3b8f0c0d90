"""LlamaDuo: migrate a task from a service LLM to a small local model, on an event bus."""

__version__ = "0.1.0"
