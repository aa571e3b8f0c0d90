"""A tiny random Llama model with a real tokenizer, for fast tests of training and inference code paths."""

from __future__ import annotations

from pathlib import Path

from llamaduo.localmodel.atomic import build_dir_atomically


def build_tiny_model(dest: Path, tokenizer_source: Path, *, seed: int = 0) -> Path:
    """Build (once, atomically) a seeded random 2-layer Llama in `dest` with `tokenizer_source`'s tokenizer."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from llamaduo.localmodel.loading import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_source)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        torch.manual_seed(seed)
        # The generation config (saved beside the weights) takes bos/eos/pad from the model config.
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_dir_atomically(dest, build)
