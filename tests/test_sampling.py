"""Sampling: each processor equals its `transformers` twin, the chain follows HF's order, and the draw is exact.

The statistical tests use fixed seeds, so they are deterministic; the chi-square thresholds (p > 0.001) are
there to catch a wrong distribution, not flakiness.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.errors import BadConfigError
from lmforge.infer.sampling import (
    SamplingParams,
    apply_frequency_presence,
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
    process_batch,
    process_logits,
    sample_next,
    token_logprobs,
)

V = 50
CONTEXT = [3, 7, 7, 7, 12, 3, 0, 49, 12]  # repeated ids on purpose


def random_logits(seed: int, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 3  # (V,), wide enough that truncation bites


def hf(processor, logits: torch.Tensor, context=CONTEXT) -> torch.Tensor:
    """Run an HF processor on one row: it takes (input_ids (1, L), scores (1, V))."""
    return processor(torch.tensor([context]), logits[None].clone())[0]


def assert_same(ours: torch.Tensor, theirs: torch.Tensor):
    """Exactly the same -inf pattern, and allclose on what survives."""
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    keep = ~torch.isneginf(ours)
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(seed, penalty):
    logits = random_logits(seed)
    ours = apply_repetition_penalty(logits, CONTEXT, penalty)
    assert_same(ours, hf(RepetitionPenaltyLogitsProcessor(penalty), logits))
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[CONTEXT] = False
    assert torch.equal(ours[untouched], logits[untouched])


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_hf(temperature):
    logits = random_logits(1)
    assert_same(apply_temperature(logits, temperature), hf(TemperatureLogitsWarper(temperature), logits))


@pytest.mark.parametrize("k", [1, 2, 5, 20, V, V + 10])
def test_top_k_matches_hf(k):
    logits = random_logits(2)
    assert_same(apply_top_k(logits, k), hf(TopKLogitsWarper(k), logits))


def test_top_k_keeps_ties_at_threshold():
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.0])
    ours = apply_top_k(logits, 2)
    assert torch.isneginf(ours).tolist() == [False, False, False, False, True, True]
    assert_same(ours, hf(TopKLogitsWarper(2), logits))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_top_p_matches_hf(seed, p):
    logits = random_logits(seed)
    assert_same(apply_top_p(logits, p), hf(TopPLogitsWarper(p), logits))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("min_p", [0.01, 0.05, 0.1, 0.3, 0.9, 1.0])
def test_min_p_matches_hf(seed, min_p):
    logits = random_logits(seed)
    assert_same(apply_min_p(logits, min_p), hf(MinPLogitsWarper(min_p), logits))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "knobs",
    [
        dict(repetition_penalty=1.3, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
        dict(repetition_penalty=0.8, temperature=1.4, top_k=5, top_p=0.5, min_p=0.2),
        dict(repetition_penalty=1.1, temperature=0.5, top_k=V + 5, top_p=0.95, min_p=0.01),
    ],
)
def test_full_chain_matches_hf_order(seed, knobs):
    """HF builds: repetition penalty -> temperature -> top-k -> top-p -> min-p (sampling)."""
    logits = random_logits(seed)
    params = SamplingParams(**knobs)
    prompt, generated = CONTEXT[:5], CONTEXT[5:]
    ours = process_logits(logits, params, prompt, generated)
    chain = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
        TemperatureLogitsWarper(params.temperature),
        TopKLogitsWarper(params.top_k),
        TopPLogitsWarper(params.top_p),
        MinPLogitsWarper(params.min_p),
    ])
    assert_same(ours, hf(chain, logits, prompt + generated))
    assert torch.isneginf(ours).any()  # the knobs did truncate something


def test_process_batch_rows_use_their_own_params():
    logits = torch.stack([random_logits(s) for s in range(3)])  # (3, V)
    params = [SamplingParams(top_k=3), SamplingParams(temperature=0), SamplingParams(top_p=0.5, min_p=0.1)]
    prompts, outs = [[1, 2], [3], []], [[4], [], [5, 5]]
    batch = process_batch(logits, params, prompts, outs)
    assert batch.shape == (3, V) and batch.dtype == torch.float32
    for i in range(3):
        assert torch.equal(batch[i], process_logits(logits[i], params[i], prompts[i], outs[i]))
    with pytest.raises(ValueError):
        process_batch(logits, params[:2], prompts, outs)


# --------------------------------------------------------------------------- worked examples and hand values


EXAMPLE_PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def test_top_p_worked_example():
    kept = ~torch.isneginf(apply_top_p(EXAMPLE_PROBS.log(), 0.7))
    assert kept.tolist() == [True, True, False, False]  # {0.5, 0.3}, mass 0.8


def test_min_p_worked_example():
    kept = ~torch.isneginf(apply_min_p(EXAMPLE_PROBS.log(), 0.2))
    assert kept.tolist() == [True, True, True, False]  # threshold 0.1 drops only 0.05


def test_top_p_always_keeps_top_token():
    kept = ~torch.isneginf(apply_top_p(EXAMPLE_PROBS.log(), 1e-6))
    assert kept.tolist() == [True, False, False, False]


def test_frequency_and_presence_by_hand():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = apply_frequency_presence(logits, [1, 1, 1, 3], frequency=0.5, presence=0.25)
    # id 1: 3 times -> 2 - 0.5*3 - 0.25 = 0.25; id 3: once -> 4 - 0.5 - 0.25 = 3.25; others untouched
    torch.testing.assert_close(out, torch.tensor([1.0, 0.25, 3.0, 3.25]))
    out = apply_frequency_presence(logits, [2, 2], frequency=-1.0, presence=0.0)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 5.0, 4.0]))


def test_frequency_presence_count_generated_only():
    logits = torch.zeros(4)
    params = SamplingParams(temperature=0, frequency_penalty=1.0, presence_penalty=1.0)
    out = process_logits(logits, params, prompt_ids=[0, 0, 0], generated_ids=[2])
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -2.0, 0.0]))


def test_repetition_penalty_by_hand():
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 2.0, -1.0]), [0, 0, 1, 1, 1], 2.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 2.0, -1.0]))  # each distinct id once


# --------------------------------------------------------------------------- greedy and logprobs


def test_greedy_is_argmax_and_ignores_warpers():
    for seed in range(5):
        logits = random_logits(seed)
        params = SamplingParams(temperature=0, top_k=1, top_p=0.01, min_p=0.9)
        processed = process_logits(logits, params, [], [])
        assert torch.equal(processed, logits)  # no warper touched it
        assert sample_next(processed, params, make_generator(seed)) == int(logits.argmax())
        # T -> 0 is the same as top_k = 1 when sampling
        top1 = SamplingParams(top_k=1)
        assert sample_next(process_logits(logits, top1, [], []), top1, make_generator(seed)) == int(logits.argmax())


def test_token_logprobs_is_log_softmax_of_raw_and_ignores_truncation():
    raw = torch.stack([random_logits(s) for s in range(2)])  # (2, V)
    torch.testing.assert_close(token_logprobs(raw, 0.7), torch.log_softmax(raw / 0.7, -1))
    torch.testing.assert_close(token_logprobs(raw[0], 0.0), torch.log_softmax(raw[0], -1))
    assert torch.isfinite(token_logprobs(raw, 0.7)).all()


# --------------------------------------------------------------------------- the draw


def draw_many(logits: torch.Tensor, params: SamplingParams, n_draws: int, seed: int) -> list[int]:
    processed = process_logits(logits, params, [], [])
    generator = make_generator(seed)
    return [sample_next(processed, params, generator) for _ in range(n_draws)]


def test_top_k_and_top_p_never_sample_outside():
    logits = random_logits(5, vocab=20) / 3  # std 1: a nucleus of several tokens
    allowed_k = set(torch.topk(logits, 4).indices.tolist())
    assert set(draw_many(logits, SamplingParams(top_k=4), 3000, seed=1)) <= allowed_k
    nucleus = set(torch.nonzero(~torch.isneginf(apply_top_p(logits, 0.6))).flatten().tolist())
    assert 1 < len(nucleus) < 20
    drawn = set(draw_many(logits, SamplingParams(top_p=0.6), 3000, seed=2))
    assert drawn <= nucleus and len(drawn) > 1


@pytest.mark.parametrize(
    "params",
    # On these logits top-k keeps 10 of 16, top-p 8 of those, min-p 4 of those: every knob bites.
    [SamplingParams(), SamplingParams(temperature=0.7, top_k=10, top_p=0.95, min_p=0.1)],
    ids=["plain", "combined"],
)
def test_draws_follow_processed_distribution(params):
    logits = random_logits(6, vocab=16) / 4
    n_draws = 20_000
    counts = Counter(draw_many(logits, params, n_draws, seed=123))
    probs = process_logits(logits, params, [], []).softmax(-1).double()
    support = torch.nonzero(probs > 0).flatten().tolist()
    assert set(counts) <= set(support)
    if params.top_k:  # the combined knobs must actually truncate, or case (b) would test nothing new
        assert len(support) == 4
    observed = [counts[i] for i in support]
    expected = (probs[support] / probs[support].sum() * n_draws).tolist()
    assert chisquare(observed, expected).pvalue > 0.001


def test_same_seed_same_draws_different_seed_differs():
    logits = random_logits(7, vocab=16)
    params = SamplingParams(temperature=1.2)
    a = draw_many(logits, params, 200, seed=42)
    assert a == draw_many(logits, params, 200, seed=42)
    assert a != draw_many(logits, params, 200, seed=43)
    # an unseeded generator is fresh each time, and leaves the global RNG alone
    state = torch.random.get_rng_state()
    assert draw_many(logits, params, 200, seed=None) != draw_many(logits, params, 200, seed=None)
    assert torch.equal(state, torch.random.get_rng_state())


def test_masked_tokens_never_drawn_even_when_extreme():
    logits = torch.tensor([0.0, -math.inf, 100.0, -math.inf, -200.0])
    params = SamplingParams()
    assert set(draw_many(logits, params, 500, seed=0)) <= {0, 2, 4}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan),
        ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
        ("min_p", -0.1), ("min_p", 1.1),
        ("top_k", -1),
        ("max_new_tokens", -1),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5), ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
        ("n", 0),
        ("num_beams", 0),
        ("top_logprobs", -1), ("top_logprobs", 21),
    ],
)
def test_invalid_values_raise_naming_field(field, value):
    with pytest.raises(BadConfigError, match=field):
        SamplingParams(**{field: value})


def test_n_above_num_beams_raises():
    with pytest.raises(BadConfigError, match="n must be <= num_beams"):
        SamplingParams(num_beams=2, n=3)
    SamplingParams(num_beams=3, n=3)  # fine
    SamplingParams(n=4)  # fine without beams


def test_defaults_are_valid_and_frozen():
    params = SamplingParams()
    assert not params.is_greedy and SamplingParams(temperature=0).is_greedy
    SamplingParams(max_new_tokens=0, temperature=0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2)
    with pytest.raises(AttributeError):
        params.temperature = 0.5
