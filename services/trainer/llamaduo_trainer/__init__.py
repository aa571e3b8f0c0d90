"""LlamaDuo trainer service: (Q)LoRA fine-tuning of the local model on chat rows."""
