"""edit_serve.attention: grouped-query heads stay grouped on a CPU, with the same logits."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from edit_serve import attention

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of", "Hi"]


def test_grouped_heads_give_transformers_logits_with_half_the_heads(smollm, monkeypatch):
    assert AttentionInterface._global_mapping["sdpa"] is attention.grouped_sdpa  # load_model registered it
    batch = smollm.tokenizer(PROMPTS, return_tensors="pt", padding=True)  # rows of different lengths: a mask
    assert not bool(batch["attention_mask"].all())
    calls = []
    kernel = F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        calls.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa", False)))
        return kernel(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        grouped = smollm.model(**batch).logits
        groups = set(calls)
        calls.clear()
        monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", sdpa_attention_forward)
        repeated = smollm.model(**batch).logits
    heads, kv_heads = smollm.model.config.num_attention_heads, smollm.model.config.num_key_value_heads
    assert kv_heads < heads
    assert groups == {(heads, kv_heads, True)} and set(calls) == {(heads, heads, False)}
    assert torch.equal(grouped, repeated)
