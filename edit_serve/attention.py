"""transformers' `sdpa` attention with grouped-query heads left grouped on a CPU.

Where a model has fewer key/value heads than query heads (Llama, SmolLM2: 3 for 9) and a mask
is passed, transformers repeats each key and value head into full heads before calling
`scaled_dot_product_attention`, because CUDA's fused kernels would fall back to plain math
with both a mask and grouped heads. A CPU's kernel takes the grouped heads as they are
(`enable_gqa`) and gives the same numbers to the bit (SmolLM2 ROME patches came out equal)
in about half the time: on SmolLM2 the attention's forward and backward at v*'s shapes took
367 us instead of 688 us, and a ROME edit 2.92 s instead of 3.08 s (2 threads, interleaved runs).
Editing passes always carry a mask (padded rows, replayed prompt heads), and so does a
batch of served prompts of different lengths: there greedy generation gives the same tokens,
and a batch of 8 short prompts (64 new tokens, 1 thread) took as long as before (9.76 s against
9.79 s, median of 3 interleaved): at short contexts attention is a small part of a step.

`register()` puts this in place of `sdpa` for every model in the process (transformers'
documented way to replace an attention function); anything it does not handle (a CUDA
tensor, no mask, a position bias, a paged cache, attention weights asked for) goes to
transformers' own function unchanged.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    grouped = getattr(module, "num_key_value_groups", 1) > 1
    plain = kwargs.get("position_bias") is not None or kwargs.get("cache") is not None or kwargs.get(
        "output_attentions", False)
    if query.device.type != "cpu" or not grouped or attention_mask is None or plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=False, enable_gqa=True)  # a mask: not causal
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Use `grouped_sdpa` for every model whose attention is `sdpa` (idempotent)."""
    AttentionInterface.register("sdpa", grouped_sdpa)
