"""LLM-as-judge: a language model compares two answers (pairwise) or rates one (single score), and the three
biases of such judges are measured and corrected.

    lmforge judge --model JUDGE --a answers_a.jsonl --b answers_b.jsonl --out judged.json
    lmforge judge --model JUDGE --mode single --a answers.jsonl --out rated.json

- **Pairwise** (MT-bench protocol): the judge sees the question and answers A and B and replies `[[A]]`,
  `[[B]]` or `[[C]]` (tie). Every pair is judged twice, (a, b) and (b, a); a win needs the same winner in both
  orders, and a verdict that flips with the order counts as a tie. A reply naming no verdict (or more than
  one) is *unparseable*: counted and reported, the pair left out, never silently a tie.
- **Position bias**: the position-consistency rate (pairs whose verdict survives the swap) and the share of
  pairs where the judge picks the first slot, or the second, in both orders. The correction is the swap
  itself: the win rate from both orders against the one from the first order alone.
- **Length bias**: AlpacaEval's length-controlled win rate. A logistic regression of the per-pair outcome on
  the length difference, `logit P(a > b) = theta + phi * tanh((len_a - len_b) / sd)` (characters; sd of the
  differences; ties as half a win), predicted at zero difference: LC = sigmoid(theta).
- **Self-preference**: when the judge also wrote one side's answers, its win rate for them minus the win rate
  that gold labels give them (positive: the judge favours its own writing).
- **Single score**: the judge rates an answer 1-10 as `[[rating]]` (MT-bench's regex, with `[rating]` as
  the fallback); unparseable ratings are counted and left out of the mean.

A judge is anything that maps prompts to replies (`ReplyFn`): an lmforge checkpoint or a local Hugging Face
model (`model_reply_fn`), an OpenAI-compatible server (`endpoint_reply_fn`), or a function in tests. Judging is
greedy (T = 0).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lmforge.errors import BadConfigError, BadFileError

ReplyFn = Callable[[list[str]], list[str]]

PAIR_INSTRUCTION = ("Which answer to the question is better? Judge what they say, not their order or length. "
                    "Reply [[A]], [[B]], or [[C]] for a tie.")
SINGLE_INSTRUCTION = "Rate the answer to the question from 1 to 10. Reply [[rating]], for example [[7]]."


def pair_prompt(question: str, answer_a: str, answer_b: str) -> str:
    return f"{PAIR_INSTRUCTION}\n\nQuestion: {question}\n\n[A]\n{answer_a}\n[/A]\n\n[B]\n{answer_b}\n[/B]"


def compact_pair_prompt(question: str, answer_a: str, answer_b: str) -> str:
    """The same request in ~20 tokens, for judges whose context holds little more than the two answers (the
    embedded world's 256-token models, whose tokenizer spends ~100 tokens on PAIR_INSTRUCTION)."""
    return f"{question}\n\nA: {answer_a}\n\nB: {answer_b}\n\nWhich answer is better?"


def single_prompt(question: str, answer: str) -> str:
    return f"{SINGLE_INSTRUCTION}\n\nQuestion: {question}\n\n[Answer]\n{answer}\n[/Answer]"


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'C' (tie) when the reply names exactly one of [[A]], [[B]], [[C]]; otherwise None."""
    found = set(re.findall(r"\[\[([ABC])\]\]", reply))
    return found.pop() if len(found) == 1 else None


def parse_rating(reply: str) -> float | None:
    """The number in [[n]] (or, failing that, [n]); None when there is none."""
    match = re.search(r"\[\[(\d+\.?\d*)\]\]", reply) or re.search(r"\[(\d+\.?\d*)\]", reply)
    return float(match.group(1)) if match else None


# ---------------------------------------------------------------------------------------------------------
# Pairwise judging in both orders


def _outcome(verdict: str | None, a_in_first_slot: bool) -> float | None:
    """1 when answer a wins, 0 when b does, 0.5 for a tie; None when unparseable."""
    if verdict is None:
        return None
    if verdict == "C":
        return 0.5
    return float((verdict == "A") == a_in_first_slot)


def judge_pairs(reply_fn: ReplyFn, questions: Sequence[str], answers_a: Sequence[str],
                answers_b: Sequence[str], prompt_fn: Callable[[str, str, str], str] = pair_prompt) -> list[dict]:
    """One row per pair: both verdicts, each order's outcome for a, the combined outcome (None when either
    order is unparseable) and whether the verdict survived the swap."""
    if not len(questions) == len(answers_a) == len(answers_b):
        raise BadConfigError(f"judge: {len(questions)} questions, {len(answers_a)} answers a and "
                             f"{len(answers_b)} answers b; they must pair up")
    n = len(questions)
    prompts = [prompt_fn(q, a, b) for q, a, b in zip(questions, answers_a, answers_b)]
    prompts += [prompt_fn(q, b, a) for q, a, b in zip(questions, answers_a, answers_b)]
    replies = reply_fn(prompts)
    rows = []
    for i in range(n):
        first, second = parse_verdict(replies[i]), parse_verdict(replies[n + i])
        o1, o2 = _outcome(first, True), _outcome(second, False)
        parsed = o1 is not None and o2 is not None
        rows.append({"verdict_ab": first, "verdict_ba": second, "first_order": o1, "second_order": o2,
                     "outcome": (o1 if o1 == o2 else 0.5) if parsed else None,
                     "consistent": parsed and o1 == o2, "parsed": parsed,
                     "reply_ab": replies[i], "reply_ba": replies[n + i]})
    return rows


def position_figures(rows: list[dict]) -> dict:
    """Position consistency and first/second-slot preference over the parsed pairs."""
    parsed = [r for r in rows if r["parsed"]]
    n = max(len(parsed), 1)
    return {"pairs": len(rows), "unparseable": len(rows) - len(parsed),
            "consistency": sum(r["consistent"] for r in parsed) / n,
            "first_slot_both_orders": sum(r["verdict_ab"] == "A" and r["verdict_ba"] == "A" for r in parsed) / n,
            "second_slot_both_orders": sum(r["verdict_ab"] == "B" and r["verdict_ba"] == "B" for r in parsed) / n}


def bootstrap_interval(values: Sequence[float], n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of a mean by resampling the items (pairs) with replacement."""
    if not len(values):
        return 0.0, 0.0
    x = np.asarray(values, dtype=float)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def win_rate(outcomes: Sequence[float | None], seed: int = 0) -> dict:
    """Mean outcome for a (ties count half) over the parsed pairs, with a bootstrap 95% interval."""
    kept = [o for o in outcomes if o is not None]
    low, high = bootstrap_interval(kept, seed=seed)
    return {"win_rate": sum(kept) / max(len(kept), 1), "interval": [low, high], "n": len(kept),
            "wins": kept.count(1.0), "ties": kept.count(0.5), "losses": kept.count(0.0)}


# ---------------------------------------------------------------------------------------------------------
# Length control and self-preference


def length_controlled_win_rate(outcomes: Sequence[float], len_a: Sequence[float], len_b: Sequence[float],
                               l2: float = 1e-3) -> dict:
    """AlpacaEval's length-controlled win rate for a against b.

    Fits logit P(a > b) = theta + phi * tanh((len_a - len_b) / sd) to the outcomes (soft labels: a tie is half
    a win and half a loss in the log-loss), then predicts with the length term at zero: LC = sigmoid(theta).
    A small L2 penalty keeps the fit finite when the outcomes are separable by length."""
    from scipy.optimize import minimize

    y = np.asarray(outcomes, dtype=float)
    diff = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
    if len(y) == 0:
        return {"lc_win_rate": 0.0, "raw_win_rate": 0.0, "theta": 0.0, "phi": 0.0, "n": 0}
    sd = float(diff.std()) or 1.0
    x = np.tanh(diff / sd)

    def loss(params):
        theta, phi = params
        z = theta + phi * x
        # -[y log s(z) + (1-y) log s(-z)], written with logaddexp so large |z| stays finite
        value = np.sum(y * np.logaddexp(0, -z) + (1 - y) * np.logaddexp(0, z)) + l2 * (theta ** 2 + phi ** 2)
        residual = 1 / (1 + np.exp(-z)) - y
        return value, np.array([residual.sum() + 2 * l2 * theta, (residual * x).sum() + 2 * l2 * phi])

    fit = minimize(loss, np.zeros(2), jac=True, method="L-BFGS-B")
    theta, phi = (float(v) for v in fit.x)
    return {"lc_win_rate": 1 / (1 + math.exp(-theta)), "raw_win_rate": float(y.mean()), "theta": theta,
            "phi": phi, "length_sd": sd, "n": int(len(y))}


def self_preference(judge_outcomes: Sequence[float | None], gold_outcomes: Sequence[float], seed: int = 0) -> dict:
    """The judge's win rate for its own answers minus the gold win rate for them, over the pairs the judge
    parsed, with a paired bootstrap interval of the difference. Outcomes are for the judge's own side."""
    pairs = [(j, g) for j, g in zip(judge_outcomes, gold_outcomes) if j is not None]
    if not pairs:
        return {"self_preference": 0.0, "interval": [0.0, 0.0], "judge_win_rate": 0.0, "gold_win_rate": 0.0,
                "n": 0}
    judged, gold = (np.array(v, dtype=float) for v in zip(*pairs))
    low, high = bootstrap_interval(judged - gold, seed=seed)
    return {"self_preference": float(judged.mean() - gold.mean()), "interval": [low, high],
            "judge_win_rate": float(judged.mean()), "gold_win_rate": float(gold.mean()), "n": len(pairs)}


def gold_outcome(score_a: float, score_b: float) -> float:
    return 1.0 if score_a > score_b else 0.5 if score_a == score_b else 0.0


def pairwise_summary(rows: list[dict], len_a: Sequence[float], len_b: Sequence[float],
                     gold: Sequence[float] | None = None, seed: int = 0) -> dict:
    """Everything one comparison of a against b reports: the win rate from the first order alone (no position
    correction), from both orders (swap-corrected) and length-controlled, the position figures, and, when
    gold outcomes are given, the gold win rate over the same parsed pairs."""
    parsed = [i for i, r in enumerate(rows) if r["parsed"]]
    outcomes = [rows[i]["outcome"] for i in parsed]
    summary = {"position": position_figures(rows),
               "first_order_only": win_rate([rows[i]["first_order"] for i in parsed], seed),
               "both_orders": win_rate(outcomes, seed),
               "length_controlled": length_controlled_win_rate(outcomes, [len_a[i] for i in parsed],
                                                               [len_b[i] for i in parsed])}
    if gold is not None:
        summary["gold"] = win_rate([gold[i] for i in parsed], seed)
        summary["gold_length_fit"] = length_controlled_win_rate([gold[i] for i in parsed],
                                                                [len_a[i] for i in parsed],
                                                                [len_b[i] for i in parsed])
    return summary


# ---------------------------------------------------------------------------------------------------------
# Judges backed by a model


def model_reply_fn(model, tokenizer, max_new_tokens: int = 16, batch_size: int = 32) -> ReplyFn:
    """Greedy replies of a chat model (an lmforge checkpoint, or a Hugging Face model with a chat template)
    to each prompt as a user turn. A prompt too long for the context keeps its end, which holds the answers
    and the verdict cue; how many were cut is kept in `reply_fn.truncated`."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    def reply(prompts: list[str]) -> list[str]:
        engine = Engine(model, tokenizer, max_batch_size=batch_size)
        room = engine.max_len - max_new_tokens
        ids = [tokenizer.render_prompt([{"role": "user", "content": p}]) for p in prompts]
        reply.truncated += sum(len(x) > room for x in ids)
        outputs = engine.generate([x[-room:] for x in ids],
                                  SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
        return [o.text.strip() for o in outputs]

    reply.truncated = 0
    return reply


def endpoint_reply_fn(endpoint, max_new_tokens: int = 16) -> ReplyFn:
    """Greedy replies from an OpenAI-compatible server (`lmforge.serve.client.EndpointModel`), sent
    concurrently so a batching server judges them together."""
    from lmforge.infer.sampling import SamplingParams

    def reply(prompts: list[str]) -> list[str]:
        return [text.strip() for text in endpoint.chat([[{"role": "user", "content": p}] for p in prompts],
                                                       SamplingParams(temperature=0, max_new_tokens=max_new_tokens))]

    reply.truncated = 0  # the server refuses a prompt that does not fit rather than cutting it
    return reply


def load_judge(path: str, max_new_tokens: int, device: str = "auto", api_key: str = "") -> ReplyFn:
    """A judge from a checkpoint directory, or from a server given as openai:http://HOST:PORT/v1/MODEL."""
    from lmforge.hf import load_model
    from lmforge.train.loop import pick_device

    if path.startswith("openai:"):
        from lmforge.serve.client import EndpointModel, parse_endpoint

        return endpoint_reply_fn(EndpointModel(*parse_endpoint(path), api_key=api_key or None), max_new_tokens)
    if not Path(path).exists():
        raise BadFileError(f"{path}: no such judge model directory")
    model, tokenizer = load_model(path, device=pick_device(device))
    model.eval()
    return model_reply_fn(model, tokenizer, max_new_tokens)


# ---------------------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class JudgeConfig:
    model: str = ""
    """The judge: an lmforge checkpoint or a local Hugging Face model directory with a chat template, or an
    OpenAI-compatible server as openai:http://HOST:PORT/v1/MODEL (e.g. `lmforge serve`)."""
    api_key: str = ""
    """Bearer key for an openai: judge whose server was started with --api-key."""
    a: str = ""
    """JSONL of answers: {prompt (or instruction [+ input]), output (or response)}, optional `gold` (a number:
    the gold score of that answer) and `generator`."""
    b: str = ""
    """Pairwise mode: the answers to compare with --a, matched by prompt text (same prompts, any order)."""
    mode: str = "pairwise"
    """pairwise (both orders, ties when the verdict flips) or single (a 1-10 rating of each answer in --a)."""
    out: str = "judged.json"
    """Per-pair (or per-answer) verdicts and the summary, as one JSON file (written whole or not at all)."""
    compact: bool = False
    """Use the ~20-token pair prompt (for judges with a short context, like the embedded world's models)."""
    self_side: str = ""
    """'a' or 'b' when the judge itself wrote that side's answers: self-preference is then reported (needs
    `gold` in both files)."""
    max_new_tokens: int = 64
    """Longest judge reply; the verdict is parsed from anywhere in it."""
    device: str = "auto"
    seed: int = 0


def read_answers(path: str) -> list[dict]:
    """{prompt, output, gold?, generator?} per record, each field checked with the file and line named."""
    from lmforge.data.instructions import read_records

    rows = []
    for where, record in read_records(path):
        prompt = record.get("prompt", record.get("instruction"))
        if isinstance(prompt, list):  # a chat prompt: the last user turn is the question
            prompt = next((m.get("content") for m in reversed(prompt) if m.get("role") == "user"), None)
        if record.get("input"):
            prompt = f"{prompt}\n\n{record['input']}"
        output = record.get("output", record.get("response"))
        if not isinstance(prompt, str) or not prompt:
            raise BadFileError(f"{where}: needs a non-empty 'prompt' (or 'instruction') string")
        if not isinstance(output, str):
            raise BadFileError(f"{where}: needs an 'output' (or 'response') string")
        gold = record.get("gold")
        if gold is not None and not isinstance(gold, (int, float)):
            raise BadFileError(f"{where}: field 'gold' must be a number, got {gold!r}")
        rows.append({"prompt": prompt, "output": output, "gold": gold, "generator": record.get("generator"),
                     "where": where})
    if not rows:
        raise BadFileError(f"{path}: no answers")
    return rows


def pair_up(rows_a: list[dict], rows_b: list[dict], path_b: str) -> list[dict]:
    """The b answer for each a answer, by prompt text; every prompt must be in both files once."""
    by_prompt: dict[str, dict] = {}
    for row in rows_b:
        if row["prompt"] in by_prompt:
            raise BadFileError(f"{row['where']}: prompt repeats {by_prompt[row['prompt']]['where']}")
        by_prompt[row["prompt"]] = row
    missing = [row for row in rows_a if row["prompt"] not in by_prompt]
    if missing:
        raise BadFileError(f"{missing[0]['where']}: its prompt is not in {path_b} "
                           f"({len(missing)} of {len(rows_a)} prompts have no answer there)")
    if len(rows_b) != len(rows_a):
        raise BadFileError(f"{path_b}: {len(rows_b)} answers for {len(rows_a)} prompts; they must match")
    return [by_prompt[row["prompt"]] for row in rows_a]


def _write_json(path: str, payload: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(target)


def run_judge(cfg: JudgeConfig) -> dict:
    if cfg.mode not in ("pairwise", "single"):
        raise BadConfigError(f"--mode must be pairwise or single, got {cfg.mode!r}")
    if not cfg.model or not cfg.a:
        raise BadConfigError("give --model JUDGE and --a ANSWERS.jsonl")
    if cfg.mode == "pairwise" and not cfg.b:
        raise BadConfigError("pairwise mode compares two files: give --b ANSWERS.jsonl too")
    if cfg.self_side not in ("", "a", "b"):
        raise BadConfigError(f"--self-side must be a or b, got {cfg.self_side!r}")
    rows_a = read_answers(cfg.a)
    rows_b = pair_up(rows_a, read_answers(cfg.b), cfg.b) if cfg.mode == "pairwise" else []
    reply_fn = load_judge(cfg.model, cfg.max_new_tokens, cfg.device, cfg.api_key)
    if cfg.mode == "single":
        result = rate_answers(reply_fn, [r["prompt"] for r in rows_a], [r["output"] for r in rows_a])
        _write_json(cfg.out, result)
        print(f"mean rating {result['summary']['mean_rating']:.2f} over {result['summary']['rated']} answers; "
              f"{result['summary']['unparseable']} unparseable -> {cfg.out}")
        return result
    rows = judge_pairs(reply_fn, [r["prompt"] for r in rows_a], [r["output"] for r in rows_a],
                       [r["output"] for r in rows_b], compact_pair_prompt if cfg.compact else pair_prompt)
    has_gold = all(r["gold"] is not None for r in rows_a + rows_b)
    gold = [gold_outcome(a["gold"], b["gold"]) for a, b in zip(rows_a, rows_b)] if has_gold else None
    summary = pairwise_summary(rows, [len(r["output"]) for r in rows_a], [len(r["output"]) for r in rows_b],
                               gold, cfg.seed)
    summary["truncated_prompts"] = getattr(reply_fn, "truncated", 0)
    if cfg.self_side:
        if gold is None:
            raise BadConfigError("--self-side needs a numeric 'gold' field on every answer in both files")
        flip = cfg.self_side == "b"
        summary["self_preference"] = self_preference(
            [None if r["outcome"] is None else (1 - r["outcome"] if flip else r["outcome"]) for r in rows],
            [1 - g if flip else g for g in gold], cfg.seed)
    for row, a, b in zip(rows, rows_a, rows_b):
        row.update(prompt=a["prompt"], a=a["output"], b=b["output"])
    result = {"summary": summary, "judgments": rows}
    _write_json(cfg.out, result)
    print(format_summary(summary))
    print(f"-> {cfg.out}")
    return result


def rate_answers(reply_fn: ReplyFn, questions: Sequence[str], answers: Sequence[str]) -> dict:
    """Single-score mode: one rating per answer, unparseable replies counted and left out of the mean."""
    replies = reply_fn([single_prompt(q, a) for q, a in zip(questions, answers)])
    ratings = [parse_rating(r) for r in replies]
    kept = [r for r in ratings if r is not None]
    return {"summary": {"answers": len(answers), "rated": len(kept), "unparseable": len(ratings) - len(kept),
                        "mean_rating": sum(kept) / max(len(kept), 1)},
            "ratings": [{"prompt": q, "output": a, "rating": r, "reply": reply}
                        for q, a, r, reply in zip(questions, answers, ratings, replies)]}


def format_summary(summary: dict) -> str:
    pos, lc = summary["position"], summary["length_controlled"]

    def wr(block: dict) -> str:
        low, high = block["interval"]
        return f"{100 * block['win_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={block['n']})"

    lines = [f"pairs {pos['pairs']}, unparseable {pos['unparseable']}",
             f"position consistency {100 * pos['consistency']:.1f}%; first slot in both orders "
             f"{100 * pos['first_slot_both_orders']:.1f}%, second {100 * pos['second_slot_both_orders']:.1f}%",
             f"win rate of a, first order only:   {wr(summary['first_order_only'])}",
             f"win rate of a, both orders:        {wr(summary['both_orders'])}",
             f"length-controlled win rate of a:   {100 * lc['lc_win_rate']:.1f}% (length coefficient {lc['phi']:+.2f})"]
    if "gold" in summary:
        lines.append(f"gold win rate of a:                {wr(summary['gold'])}")
    if "self_preference" in summary:
        sp = summary["self_preference"]
        lines.append(f"self-preference: {100 * sp['self_preference']:+.1f} points "
                     f"[{100 * sp['interval'][0]:+.1f}, {100 * sp['interval'][1]:+.1f}]")
    return "\n".join(lines)
