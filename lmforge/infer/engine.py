"""Generation with the KV cache.

For now one function: greedy continuation of one prompt, prefill then one token at a time through the
model's KV cache. It is what `lmforge run` uses for its samples; the batched engine with every decoding
strategy (DESIGN §4b) grows from here.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """The argmax continuation of `prompt_ids`, stopping after a stop token (not returned) or at the limit
    (or the model's context, whichever comes first)."""
    device = next(model.parameters()).device
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(prompt_ids))
    if budget <= 0:
        return []
    cache = model.new_kv_cache(batch_size=1, max_len=len(prompt_ids) + budget)
    logits = model(torch.tensor([prompt_ids], device=device), kv_cache=cache)[:, -1]  # prefill: (1, V)
    out: list[int] = []
    for _ in range(budget):
        token = int(logits.argmax(-1))
        if token in stop_ids:
            break
        out.append(token)
        if len(out) == budget:
            break
        logits = model(torch.tensor([[token]], device=device), kv_cache=cache)[:, -1]
    return out
