"""Perplexity: exact on a model whose logits form a known bigram table; every token scored once."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.infer.scoring import rolling_windows
from lmforge.model import Transformer

from conftest import tiny_config


def bigram_model(tokenizer) -> Transformer:
    """Zero every transformer block: the residual stream is then just the token's embedding, so the logits
    at position i depend only on token i: a bigram table."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(tokenizer.vocab_size, max_seq_len=32, tie_embeddings=False))
    with torch.no_grad():
        for p in model.layers.parameters():
            p.zero_()
        model.embed_tokens.weight.mul_(20)  # sharpen, so the table is far from uniform
    return model.eval()


def hand_computed_log_likelihood(model, ids: list[int]) -> float:
    """log P(text) = sum_i log softmax(W_head · g ⊙ rmsnorm(E[prev]))[next], computed without the model."""
    E, W, g, eps = model.embed_tokens.weight, model.lm_head.weight, model.norm.weight, model.cfg.norm_eps
    total = 0.0
    for prev, nxt in zip(ids[:-1], ids[1:]):
        h = E[prev].double()
        h = g.double() * h / torch.sqrt(h.pow(2).mean() + eps)
        total += torch.log_softmax(W.double() @ h, dim=-1)[nxt].item()
    return total


def test_cli_perplexity_equals_the_hand_computed_bigram_value(tokenizer, tmp_path):
    model = bigram_model(tokenizer)
    save_checkpoint(tmp_path / "bigram", model, tokenizer)
    text = "The cat sat on the mat. 고양이가 생선을 먹는다. " * 6
    ids = tokenizer.encode(text)
    assert len(ids) >= 3 * model.cfg.max_seq_len  # three times the context: several windows
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    assert main(["eval", "perplexity", "--model", str(tmp_path / "bigram"), "--data", str(tmp_path / "text.txt"),
                 "--out", str(tmp_path / "ppl.json"), "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "ppl.json").read_text())
    expected_ll = hand_computed_log_likelihood(model, [tokenizer.bos_id, *ids])
    assert result["n_tokens"] == len(ids)  # every token scored exactly once
    assert result["perplexity"] == pytest.approx(math.exp(-expected_ll / len(ids)), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(-expected_ll / len(text.encode()) / math.log(2), rel=1e-6)


def reference_windows(tokens, max_len, prefix):
    """lm-eval's get_rolling_token_windows + make_disjoint_window (context_len = 1), written from the
    description in ../shared/reference/evaluation.md §3, as (model input, scored targets)."""
    out = []
    pred_len, predicted = max_len, 0
    first = min(max_len, len(tokens))
    pairs = [([prefix] + tokens[: first - 1], tokens[:first])]
    predicted += first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, pred_len)
        end = predicted + n
        pairs.append((tokens[max(0, end - max_len - 1): end - 1], tokens[end - n: end]))
        predicted += n
    for context, continuation in pairs:
        context = context[: len(context) - (len(continuation) - 1)]  # make_disjoint_window
        out.append(((context + continuation)[:-1], continuation))
    return out


@pytest.mark.parametrize("n_tokens,max_len", [(1, 8), (8, 8), (9, 8), (24, 8), (25, 8), (100, 7)])
def test_rolling_windows_score_each_token_once_like_lm_eval(n_tokens, max_len):
    tokens = list(range(100, 100 + n_tokens))
    windows = rolling_windows(tokens, max_len, prefix_token=-1)
    assert windows == reference_windows(tokens, max_len, -1)
    scored = [t for _, targets in windows for t in targets]
    assert scored == tokens
    for inputs, targets in windows:
        assert len(inputs) <= max_len
        # the last len(targets) inputs are exactly the tokens just before each target
        full = [-1, *tokens]
        start = full.index(targets[0]) - 1
        assert inputs[-len(targets):] == full[start: start + len(targets)]


def test_model_scores_long_text_the_same_as_bigram_by_windows(tokenizer):
    """For the bigram model, carried context of one token is all it needs: windowed == whole-text score."""
    from lmforge.infer.scoring import loglikelihood_rolling

    model = bigram_model(tokenizer)
    ids = tokenizer.encode("Mina lives in Velmora. She is a baker. " * 8)
    ll, n = loglikelihood_rolling(model, ids, 32, tokenizer.bos_id)
    assert n == len(ids)
    assert ll == pytest.approx(hand_computed_log_likelihood(model, [tokenizer.bos_id, *ids]), rel=1e-6)
    with torch.no_grad():
        logits = model(torch.tensor([[tokenizer.bos_id, *ids[:31]]]))
    assert F.log_softmax(logits, -1)[0, 0, ids[0]].item() == pytest.approx(
        hand_computed_log_likelihood(model, [tokenizer.bos_id, ids[0]]), rel=1e-6)
