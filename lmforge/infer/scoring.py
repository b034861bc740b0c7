"""Scoring: the log-likelihood requests every evaluator is built on (lm-evaluation-harness's interface).

This module holds `loglikelihood_rolling`, the score of a whole text, with the windowing lm-eval uses for
perplexity: texts longer than the context are cut into *disjoint* predicted spans, each scored once, with one
token of carried context at a span's start (context_len = 1). Worked example, context L = 4, text tokens
t0..t9, BOS = b:

    window 1: input  b  t0 t1 t2      scores t0 t1 t2 t3
    window 2: input  t3 t4 t5 t6      scores t4 t5 t6 t7     (t3 is the carried context)
    window 3: input  t5 t6 t7 t8      scores          t8 t9  (the short last span is extended to the left
                                                              to a full L tokens; only its tail is scored)

so every token is scored exactly once. A sliding window with more context gives lower perplexities that are
not comparable with lm-eval's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rolling_windows(tokens: list[int], max_len: int, prefix_token: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) pairs; the targets are predicted by the *last* len(targets) positions of inputs."""
    if not tokens:
        return []
    windows = []
    first = min(max_len, len(tokens))
    windows.append(([prefix_token, *tokens[: first - 1]], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n_pred = min(len(tokens) - predicted, max_len)
        end = predicted + n_pred
        start = max(0, end - max_len - 1)
        inputs = tokens[start : end - 1]
        windows.append((inputs, tokens[predicted:end]))
        predicted = end
    return windows


@torch.no_grad()
def token_logprobs(model, inputs: list[int], n_targets: int, targets: list[int]) -> torch.Tensor:
    """Log-probabilities of `targets` at the last n_targets positions of `inputs` (one sequence)."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([inputs], device=device)).float()[0, -n_targets:]  # (n, V)
    return F.log_softmax(logits, dim=-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]


@torch.no_grad()
def loglikelihood_rolling(model, tokens: list[int], max_len: int, prefix_token: int) -> tuple[float, int]:
    """(sum of log P(token | previous tokens) over all tokens, number of tokens scored)."""
    total, scored = 0.0, 0
    for inputs, targets in rolling_windows(tokens, max_len, prefix_token):
        total += token_logprobs(model, inputs, len(targets), targets).double().sum().item()
        scored += len(targets)
    return total, scored


# ---------------------------------------------------------------------------------------------------------
# loglikelihood(context, continuation) and generate_until(context, params): lm-eval's other two requests


def split_context(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as the model sees them together: trailing spaces move from the
    context to the continuation, the pair is encoded as one string and split where the context alone ends
    (so a merge across the boundary is not invented). An empty context is conditioned on BOS."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    if not stripped:
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(stripped + continuation, add_bos=True)
    n_context = len(tokenizer.encode(stripped, add_bos=True))
    return whole[:n_context], whole[n_context:]


@torch.no_grad()
def loglikelihood_tokens(model, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                         batch_size: int = 16) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): (sum of the continuation's log-probabilities, whether every
    continuation token is the argmax). Sequences longer than the context window lose context from the left.
    Rows are right-padded: causal attention never lets a real token see the padding after it."""
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    results = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = [(ctx + cont)[-(max_len + 1):][:-1] for ctx, cont in chunk]
        width = max(len(r) for r in rows)
        batch = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r)
        logp = F.log_softmax(model(batch.to(device)).float(), dim=-1)  # (B, W, V)
        for i, ((_, cont), r) in enumerate(zip(chunk, rows)):
            n = len(cont)
            positions = logp[i, len(r) - n:len(r)]  # (n, V): the positions that predict the continuation
            target = torch.tensor(cont, device=device)
            total = positions.gather(-1, target[:, None])[:, 0].double().sum().item()
            results.append((total, bool((positions.argmax(-1) == target).all())))
    return results


def loglikelihood(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood` over (context, continuation) strings."""
    pairs = [split_context(tokenizer, ctx, cont) for ctx, cont in requests]
    for (ctx, cont), (_, cont_ids) in zip(requests, pairs):
        if not cont_ids:
            from lmforge.errors import BadConfigError

            raise BadConfigError(f"empty continuation for context {ctx[:40]!r}")
    return loglikelihood_tokens(model, pairs, tokenizer.pad_id, batch_size)


def generate_until(model, tokenizer, contexts: list[str], params) -> list[str]:
    """lm-eval's `generate_until`: the continuation of each context up to a stop string (params.stop), EOS or
    params.max_new_tokens, through the batched engine. Greedy unless params say otherwise."""
    from lmforge.infer.engine import Engine

    engine = Engine(model, tokenizer, max_batch_size=min(16, max(1, len(contexts))))
    keep = max(1, engine.max_len - params.max_new_tokens)  # the context loses tokens from the left
    prompts = [tokenizer.encode(c, add_bos=True)[-keep:] for c in contexts]
    return [out.text for out in engine.generate(prompts, params)]
