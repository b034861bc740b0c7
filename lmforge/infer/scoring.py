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
