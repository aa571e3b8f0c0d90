"""The embedded default: a local nats-server, the five services as processes, and a local service LLM."""
