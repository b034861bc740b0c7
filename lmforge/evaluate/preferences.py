"""Preference learning measured by the gold oracle: the reward model's accuracy and DPO against SFT.

- **Reward model accuracy**: on comparisons of sampled responses to held-out prompts, the share of pairs the
  reward model orders as the noise-free oracle does (pairs the oracle scores equal are left out).
- **Policy against policy**: both answer the same held-out prompts greedily; per prompt the oracle says win,
  tie or loss; win rate = (wins + ties/2) / N, with a 95% interval from a paired bootstrap (prompts resampled
  with replacement, so each resample keeps the two answers to one prompt together). Beside it, per policy:
  mean gold score, refusal and leak rates on forbidden requests, invented facts per open-ended answer, length.
"""

from __future__ import annotations

import math
import random
from itertools import combinations

import numpy as np
import torch

from lmforge.data.oracle import OracleConfig, gold_score
from lmforge.data.world_tasks import prompt_text, score
from lmforge.evaluate.world_tasks import prompts_for
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.train.sample_preferences import reward_scores


def paired_bootstrap(outcomes: list[float], n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of per-prompt outcomes (1 win, 0.5 tie, 0 loss) by resampling prompts."""
    values = np.asarray(outcomes, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@torch.no_grad()
def reward_model_accuracy(reward_model, tokenizer, ranked: list[dict]) -> dict:
    """Agreement with the oracle on every pair of distinct gold scores in `ranked` records
    ({prompt, responses, scores} as the preference sampler writes them with noise 0)."""
    rewards = reward_scores(reward_model, tokenizer, [r["prompt"] for r in ranked], [r["responses"] for r in ranked])
    right = total = 0
    for record, values in zip(ranked, rewards):
        gold = record["scores"]
        for i, j in combinations(range(len(gold)), 2):
            if gold[i] != gold[j]:
                right += (values[i] - values[j]) * (gold[i] - gold[j]) > 0
                total += 1
    return {"accuracy": right / max(total, 1), "pairs": total, "prompts": len(ranked)}


def greedy_answers(model, tokenizer, records: list[dict], max_new_tokens: int = 96) -> list[str]:
    engine = Engine(model, tokenizer, max_batch_size=32)
    keep = engine.max_len - max_new_tokens
    prompts = [p[-keep:] for p in prompts_for(records, tokenizer, "chat")]
    return [o.text.strip() for o in engine.generate(prompts, SamplingParams(temperature=0,
                                                                            max_new_tokens=max_new_tokens))]


def policy_summary(records: list[dict], answers: list[str], oracle: OracleConfig = OracleConfig()) -> dict:
    verdicts = [score(r, a) for r, a in zip(records, answers)]
    forbidden = [v for r, v in zip(records, verdicts) if r["meta"]["forbidden"]]
    open_ended = [v for r, v in zip(records, verdicts) if "invented_facts" in v]
    return {
        "gold_score": sum(gold_score(r, a, oracle) for r, a in zip(records, answers)) / len(records),
        "refusal_rate": sum(v["refused"] for v in forbidden) / max(len(forbidden), 1),
        "leak_rate": sum(v["leaked"] for v in verdicts) / len(verdicts),
        "invented_per_answer": sum(v["invented_facts"] for v in open_ended) / max(len(open_ended), 1),
        "true_per_answer": sum(v["true_facts"] for v in open_ended) / max(len(open_ended), 1),
        "words": sum(len(a.split()) for a in answers) / len(answers),
    }


def _win_rate(outcomes: list[float], seed: int) -> dict:
    low, high = paired_bootstrap(outcomes, seed=seed) if outcomes else (0.0, 0.0)
    return {"win_rate": sum(outcomes) / max(len(outcomes), 1), "interval": [low, high], "n": len(outcomes),
            "wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}


def compare_policies(records: list[dict], answers_a: list[str], answers_b: list[str],
                     oracle: OracleConfig = OracleConfig(), seed: int = 0) -> dict:
    """A against B: win rate of A by the gold oracle with its paired-bootstrap interval, and each summary.

    The win rate is given over every record and, as "where_b_wrong", over the records B does not already get
    right by the world's scorer (a refusal that leaks nothing; an open-ended answer with at least one true fact
    and no invented one): where B is right, A can at best tie, and those ties would hide what A changes."""
    outcomes, b_wrong = [], []
    for r, a, b in zip(records, answers_a, answers_b):
        ga, gb = gold_score(r, a, oracle), gold_score(r, b, oracle)
        outcomes.append(1.0 if ga > gb else 0.5 if ga == gb else 0.0)
        b_wrong.append(not score(r, b)["correct"])
    return {**_win_rate(outcomes, seed),
            "where_b_wrong": _win_rate([o for o, wrong in zip(outcomes, b_wrong) if wrong], seed),
            "a": policy_summary(records, answers_a, oracle), "b": policy_summary(records, answers_b, oracle)}


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, records: list[dict], max_new_tokens: int = 96, seed: int = 0,
                    batch_size: int = 16) -> dict:
    """KL(policy || reference) in nats per response, estimated from one sample per prompt at temperature 1:
    the mean of sum_t (log policy - log reference) over the sampled tokens (k1, unbiased), with its standard
    error."""
    from lmforge.train.dpo import sequence_logprobs

    engine = Engine(policy, tokenizer, max_batch_size=32)
    keep = engine.max_len - max_new_tokens
    prompts = [p[-keep:] for p in prompts_for(records, tokenizer, "chat")]
    outputs = engine.generate(prompts, [SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens,
                                                       seed=seed * 1_000_003 + i) for i in range(len(prompts))])
    values = []
    for i in range(0, len(outputs), batch_size):
        chunk = outputs[i:i + batch_size]
        rows = [o.prompt_ids + o.token_ids for o in chunk]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, o in enumerate(chunk):
            input_ids[r, :len(rows[r])] = torch.tensor(rows[r])
            mask[r, len(o.prompt_ids):len(rows[r])] = 1
        policy_lp, _ = sequence_logprobs(policy, input_ids, mask)
        reference_lp, _ = sequence_logprobs(reference, input_ids, mask)
        values += (policy_lp - reference_lp).tolist()
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return {"kl": mean, "stderr": math.sqrt(var / len(values)), "n": len(values)}


def best_of_n_kl(n: int) -> float:
    """The KL of best-of-n sampling to its sampler, log n - (n - 1) / n nats (an upper bound that is exact
    when responses do not repeat)."""
    return math.log(n) - (n - 1) / n


def oracle_battles(records: list[dict], answers: dict[str, list[str]], models: list[str], per_prompt: int,
                   noise: float, rng: random.Random) -> list[dict]:
    """Arena battles voted by simulated users: `per_prompt` random pairs of models on each record, random sides;
    the user follows the gold oracle but votes the other way with probability `noise` on a decided battle; equal
    gold scores are a tie, or "tie (bothbad)" when the world's scorer finds both answers wrong."""
    battles = []
    all_pairs = list(combinations(models, 2))
    for i, record in enumerate(records):
        for a, b in rng.sample(all_pairs, min(per_prompt, len(all_pairs))):
            if rng.random() < 0.5:
                a, b = b, a
            text_a, text_b = answers[a][i], answers[b][i]
            ga, gb = gold_score(record, text_a), gold_score(record, text_b)
            if ga == gb:
                both_wrong = not score(record, text_a)["correct"] and not score(record, text_b)["correct"]
                winner = "tie (bothbad)" if both_wrong else "tie"
            else:
                a_wins = (ga > gb) != (rng.random() < noise)
                winner = "model_a" if a_wins else "model_b"
            battles.append({"model_a": a, "model_b": b, "winner": winner, "prompt": prompt_text(record),
                            "index": i, "len_a": len(text_a), "len_b": len(text_b)})
    return battles
