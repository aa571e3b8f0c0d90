"""Attention for padding-free batches: each packed row attends only to itself, and only its own tokens cost FLOPs.

trl's padding-free collator concatenates a micro-batch's rows into one sequence and passes their boundaries as
`cu_seq_lens_q` (cumulative lengths) beside `position_ids`. With the stock `sdpa` implementation transformers 5 turns
the restarting position ids into a block-diagonal mask over the whole concatenation: correct, but sdpa then computes
every query against every key of the micro-batch and throws most of it away (for 4 rows of ~120 tokens, three quarters
of the attention FLOPs; far more for long packs). `varlen_sdpa` runs sdpa causally on each row instead.

It is also right where the stock path is not: transformers only derives that mask when no KV cache is passed, so a
padding-free batch run with `use_cache=True` (the config default) silently attends across rows under stock sdpa.

Registered under `VARLEN_SDPA` in transformers' attention and mask interfaces: without `cu_seq_lens_q` (padded batches,
generation) it is exactly `sdpa`, mask included.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

logger = logging.getLogger(__name__)

VARLEN_SDPA = "llamaduo_varlen_sdpa"


def varlen_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa per packed row when `cu_seq_lens_q` marks the rows of a one-sequence padding-free batch, else plain sdpa.

    Shapes as transformers' attention functions: query/key/value `(batch, heads, tokens, head_dim)`, output
    `(batch, tokens, heads, head_dim)`.
    """
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    lengths = _segment_lengths(bounds, query.shape[2])
    gqa = int(getattr(module, "num_key_value_groups", 1)) > 1
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa
        )
        for q, k, v in zip(
            torch.split(query, lengths, dim=2),
            torch.split(key, lengths, dim=2),
            torch.split(value, lengths, dim=2),
            strict=True,
        )
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


_last_bounds: list[tuple[torch.Tensor, int, list[int]]] = []


def _segment_lengths(bounds: torch.Tensor, tokens: int) -> list[int]:
    # Every layer gets the same tensor: read it once (on a GPU each read would be a device-to-host sync).
    if _last_bounds and _last_bounds[0][0] is bounds and _last_bounds[0][1] == tokens:
        return _last_bounds[0][2]
    lengths = [int(n) for n in torch.diff(bounds.to("cpu", torch.int64)).tolist() if n > 0]
    # The collator may pad the concatenation (pad_to_multiple_of): the tail after the last row is a segment of its own.
    if (tail := tokens - sum(lengths)) > 0:
        lengths.append(tail)
    _last_bounds[:] = [(bounds, tokens, lengths)]
    return lengths


def register_varlen_sdpa() -> str:
    """Register `varlen_sdpa` (and sdpa's mask builder under the same name); return the implementation's name."""
    AttentionInterface.register(VARLEN_SDPA, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    return VARLEN_SDPA


def use_varlen_sdpa(model: PreTrainedModel) -> bool:
    """Switch a model that runs on sdpa to `varlen_sdpa`; False (and unchanged) for any other attention.

    Flash attention reads the row boundaries itself; eager (and sdpa, when a model refuses the switch) still keep
    packed rows apart through the block-diagonal mask transformers builds from the position ids, only slower.
    """
    if model.config._attn_implementation != "sdpa":
        return False
    try:
        model.set_attn_implementation(register_varlen_sdpa())
    except (ValueError, KeyError) as exc:
        logger.info("%s keeps sdpa for padding-free batches: %s", type(model).__name__, exc)
        return False
    return bool(model.config._attn_implementation == VARLEN_SDPA)
