"""Decoding trade-offs measured: the same prompts decoded by each strategy, scored for quality and diversity.

- **quality**: correctness by the world's scorer (every world task has one; open-ended answers count as right
  when they state a true fact and invent none), and the perplexity of the output under the model itself
  (low: the model's own likeliest text; high: the sampler wandered into its tail);
- **diversity**: distinct-n, the share of unique word n-grams among all n-grams of the samples drawn for one
  prompt, averaged over prompts (1/n_samples when every sample is the same, near 1 when none repeat).

Greedy and beam search are deterministic, so their samples are one output repeated: diversity is exact, not
estimated. The lecture's expectations: greedy and beam score well on single-answer tasks and never vary;
temperature < 1 stays near greedy, > 1 gains diversity and loses quality; top-k and top-p cut the noisy tail.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from typing import Callable

from lmforge.data.world_tasks import prompt_text
from lmforge.evaluate.metrics import distinct_n
from lmforge.evaluate.world_tasks import prompts_for
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scoring import loglikelihood_tokens

STRATEGIES: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "beam search (4 beams)": {"temperature": 0.0, "num_beams": 4},
    "sampling, T=0.5": {"temperature": 0.5},
    "sampling, T=1.0": {"temperature": 1.0},
    "sampling, T=1.5": {"temperature": 1.5},
    "top-k 10, T=1.0": {"temperature": 1.0, "top_k": 10},
    "top-p 0.9, T=1.0": {"temperature": 1.0, "top_p": 0.9},
}


def decoding_tradeoffs(model, tokenizer, records: list[dict], score: Callable[[dict, str], dict],
                       n_samples: int = 4, max_new_tokens: int = 48, seed: int = 0) -> dict:
    """{strategy: {"accuracy", "perplexity", "distinct_1", "distinct_2", "mean_tokens", "example"}} for a chat
    model on `records` (world task records, asked zero-shot through the chat template)."""
    engine = Engine(model, tokenizer, max_batch_size=32)
    keep = engine.max_len - max_new_tokens  # a long request loses its start rather than the answer its room
    prompts = [p[-keep:] for p in prompts_for(records, tokenizer, "chat")]
    results = {}
    for name, options in STRATEGIES.items():
        params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed, **options)
        if params.num_beams > 1:
            per_prompt, copies = [engine.beam_search(p, params)[:1] for p in prompts], n_samples
        elif params.temperature == 0:
            per_prompt, copies = [[o] for o in engine.generate(prompts, params)], n_samples
        else:
            grouped = defaultdict(list)
            for o in engine.generate(prompts, replace(params, n=n_samples)):
                grouped[o.prompt_index].append(o)
            per_prompt, copies = [grouped[i] for i in range(len(prompts))], 1
        # every output counts `copies` times in every average, so the distinct ones suffice (diversity aside)
        pairs = [(p, o.token_ids) for p, outs in zip(prompts, per_prompt) for o in outs if o.token_ids]
        total_logprob = sum(lp for lp, _ in loglikelihood_tokens(model, pairs, tokenizer.pad_id))
        total_tokens = sum(len(ids) for _, ids in pairs)
        right = [bool(score(r, o.text.strip()).get("correct")) for r, outs in zip(records, per_prompt) for o in outs]
        texts = [[o.text for o in outs] * copies for outs in per_prompt]
        results[name] = {
            "accuracy": sum(right) / len(right),
            "perplexity": math.exp(-total_logprob / max(total_tokens, 1)),
            "distinct_1": sum(distinct_n(t, 1) for t in texts) / len(texts),
            "distinct_2": sum(distinct_n(t, 2) for t in texts) / len(texts),
            "mean_tokens": total_tokens / max(len(right), 1),
            "example": (prompt_text(records[0]), texts[0][:2]),
        }
    return results
