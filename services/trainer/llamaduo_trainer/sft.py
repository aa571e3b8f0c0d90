"""trl's `SFTTrainer`, with the LM head run only where the loss is, and real tokens counted per run.

trl 1.16 computes the loss with a fused LM head that never materialises the logits. On CUDA it projects only the
positions whose label counts; elsewhere (CPU) it projects every position through the vocabulary-wide head, three
matmuls each (forward, recomputed forward, backward) plus an entropy and a top-1 pass for its metrics. For a small
model that head is a large share of the FLOPs (SmolLM2-135M: 49k x 576 per token, ~20% of the model's forward), and
in chat SFT most positions are prompt. `answer_logits_only` asks the model for logits at the answer positions only
(`logits_to_keep` with a tensor of indices, so the model's own logit scaling and soft-capping still apply) and takes
the cross-entropy there: the same loss, without the prompt positions' head FLOPs or the metrics' passes. It does
materialise the answer positions' logits (answer tokens x vocabulary, fp32), which a CPU run can afford; on CUDA
trl's tiled head stays.
"""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
from peft import PeftModel
from trl.trainer.sft_trainer import SFTTrainer

from llamaduo_trainer.callbacks import BestAdapter
from llamaduo_trainer.examples import IGNORE_INDEX


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (unwrapped) causal LM's forward takes `logits_to_keep`, as transformers' generation-ready LMs do."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


class LlamaDuoSFTTrainer(SFTTrainer):
    """`SFTTrainer` with an answer-positions-only loss (`answer_logits_only`) and a per-run real-token count."""

    def __init__(self, *args: Any, answer_logits_only: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answer_logits_only = answer_logits_only and accepts_logits_to_keep(cast(torch.nn.Module, self.model))
        self.real_tokens = 0
        """Non-padding tokens trained on in this process's run (all processes' under data parallel)."""
        # Filled in by `finetune.build_sft_trainer`.
        self.best_adapter: BestAdapter | None = None
        self.train_rows = 0
        self.validation_rows = 0
        self.device_name = "cpu"

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """Mean next-token cross-entropy over the answer tokens, normalised like trl's (by `num_items_in_batch`)."""
        if model.training:
            self._count_tokens(inputs)
        if not self.answer_logits_only or return_outputs:
            return cast(Any, super()).compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels: torch.Tensor = inputs["labels"]
        targets = labels[:, 1:]
        # Positions whose next token is trained on; in a padding-free batch (one row) exactly the answer positions.
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
        forward = {key: value for key, value in inputs.items() if key != "labels"}
        forward["use_cache"] = False
        logits: torch.Tensor = model(**forward, logits_to_keep=keep).logits
        chosen = targets[:, keep]
        total = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            chosen.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        count = (chosen != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
        # As trl: `num_items_in_batch` counts every process's tokens, and DDP averages the gradients across them.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        mode = "train" if model.training else "eval"
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _count_tokens(self, inputs: dict[str, Any]) -> None:
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:  # padding-free: one row of real tokens
            local = torch.tensor(inputs["input_ids"].numel(), device=inputs["input_ids"].device)
        counted = int(self.accelerator.gather_for_metrics(local.reshape(1)).sum().item())
        self.real_tokens += counted
        if self.answer_logits_only:
            # trl's own loss keeps this running total for its `num_tokens` log; ours has to.
            self._total_train_tokens += counted


__all__ = ["LlamaDuoSFTTrainer", "accepts_logits_to_keep"]
