"""The synthesizer: asks the service LLM for more training pairs like the train seeds."""
