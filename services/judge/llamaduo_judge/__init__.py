"""The judge: scores the fine-tuned model's answers against the human references with the service LLM."""
