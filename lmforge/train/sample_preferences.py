"""Preference data from a model's own samples (InstructGPT step 2): K responses per prompt, ranked.

    lmforge preferences sample --model runs/world/sft/final --prompts tasks/train.alpaca.jsonl --k 4 --out prefs/
    lmforge preferences sample --model M --prompts prompts.jsonl --scorer runs/rm/final --out prefs/

The engine draws K responses per prompt (temperature sampling, each prompt its own seed). A scorer ranks
them: the world's gold oracle (`data.oracle`, for world task records, whose `meta` it needs; `--noise` flips
comparisons like a careless annotator) or a reward model checkpoint. Responses with the same score are
kept once (a tie teaches nothing), so a ranking has the distinct score levels best first. Written:

    OUT/ranked.jsonl   {prompt, responses: [best, ..., worst], scores, meta}     for the reward model
    OUT/pairs.jsonl    {prompt, chosen, rejected}: best against worst per prompt  for DPO

Prompts whose samples all score the same give no ranking and are counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lmforge.checkpoint import load_checkpoint
from lmforge.data.oracle import OracleConfig, gold_score, rank
from lmforge.data.instructions import read_records
from lmforge.data.preferences import write_jsonl
from lmforge.data.world_tasks import prompt_text
from lmforge.errors import BadConfigError, BadFileError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.train.reward import encode_group, group_rewards, prompt_messages


@dataclass(frozen=True)
class SampleConfig:
    model: str = ""
    """The policy whose samples are ranked (usually the SFT model)."""
    prompts: str = ""
    """JSONL: world task records (Alpaca with meta), or {"prompt": string or messages}."""
    out: str = "runs/preferences"
    k: int = 4
    """Responses sampled per prompt."""
    scorer: str = "oracle"
    """"oracle" (world records only) or a reward model checkpoint."""
    noise: float = 0.0
    """Oracle only: probability of flipping each comparison."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 96
    """Room for the longest world answers (~90 tokens): a cut-off response hides what its end would cost."""
    seed: int = 0
    progress: bool = True


def read_prompts(path: str) -> list[tuple[list[dict], dict]]:
    """(prompt messages, the record) per record: a world record's user turn is `prompt_text(record)`."""
    out = []
    for where, record in read_records(path):
        if "instruction" in record and "meta" in record:
            messages = [{"role": "user", "content": prompt_text(record)}]
        elif "prompt" in record:
            messages = prompt_messages(record["prompt"], where)
        else:
            raise BadFileError(f"{where}: needs a world task record or a 'prompt' (string or messages)")
        out.append((messages, record))
    if not out:
        raise BadFileError(f"{path}: no prompts")
    return out


def sample_responses(model, tokenizer, prompts: list[list[dict]], k: int, temperature: float, top_p: float,
                     max_new_tokens: int, seed: int) -> list[list[str]]:
    """K sampled responses per prompt (chat template), each prompt with its own seed."""
    engine = Engine(model, tokenizer, max_batch_size=64)
    keep = engine.max_len - max_new_tokens
    if keep < 8:
        raise BadConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {engine.max_len} tokens")
    ids = [tokenizer.render_prompt(p)[-keep:] for p in prompts]
    params = [SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=k,
                             seed=seed * 1_000_003 + i) for i in range(len(ids))]
    out: list[list[str]] = [[] for _ in ids]
    for o in engine.generate(ids, params):
        out[o.prompt_index].append(o.text.strip())
    return out


def reward_scores(reward_model, tokenizer, prompts: list[list[dict]], responses: list[list[str]],
                  batch_size: int = 8) -> list[list[float]]:
    groups = [encode_group(tokenizer, p, r) for p, r in zip(prompts, responses)]
    return group_rewards(reward_model, groups, tokenizer.pad_id, batch_size)


def rankings(prompts, records, responses, scores, rng: random.Random, noise: float) -> tuple[list[dict], int]:
    """Ranked records (distinct score levels, best first) and how many prompts had nothing to rank."""
    ranked, flat = [], 0
    for prompt, record, texts, values in zip(prompts, records, responses, scores):
        levels: dict[float, str] = {}
        for text, value in zip(texts, values):
            if text and value not in levels:
                levels[value] = text
        if len(levels) < 2:
            flat += 1
            continue
        values = list(levels)
        order = rank(values, rng, noise)
        ranked.append({"prompt": prompt, "responses": [levels[values[i]] for i in order],
                       "scores": [values[i] for i in order], "meta": record.get("meta", {})})
    return ranked, flat


def sample_preferences(cfg: SampleConfig) -> dict:
    if not cfg.model or not cfg.prompts:
        raise BadConfigError("preferences sample needs --model CHECKPOINT and --prompts FILE")
    if cfg.k < 2:
        raise BadConfigError(f"--k must be at least 2 to rank anything, got {cfg.k}")
    model, tokenizer, _ = load_checkpoint(cfg.model)
    items = read_prompts(cfg.prompts)
    prompts, records = [p for p, _ in items], [r for _, r in items]
    responses = []
    chunk = 64
    for i in tqdm(range(0, len(prompts), chunk), desc="sample", disable=not cfg.progress):
        responses += sample_responses(model, tokenizer, prompts[i:i + chunk], cfg.k, cfg.temperature, cfg.top_p,
                                      cfg.max_new_tokens, cfg.seed + i)
    if cfg.scorer == "oracle":
        missing = next((i for i, r in enumerate(records) if "meta" not in r), None)
        if missing is not None:
            raise BadConfigError(f"{cfg.prompts}: record {missing + 1} has no world meta; the oracle can only "
                                 "judge world task records (give --scorer a reward model instead)")
        oracle = OracleConfig()
        scores = [[gold_score(r, t, oracle) for t in texts] for r, texts in zip(records, responses)]
    else:
        reward_model, _, _ = load_checkpoint(cfg.scorer, kind="reward_model")
        scores = reward_scores(reward_model, tokenizer, prompts, responses)
    ranked, flat = rankings(prompts, records, responses, scores, random.Random(cfg.seed), cfg.noise)
    if not ranked:
        raise BadFileError(f"{cfg.prompts}: every prompt's {cfg.k} samples scored the same; nothing to rank")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "ranked.jsonl", ranked)
    write_jsonl(out / "pairs.jsonl", ({"prompt": r["prompt"], "chosen": r["responses"][0],
                                       "rejected": r["responses"][-1]} for r in ranked))
    summary = {"prompts": len(prompts), "ranked": len(ranked), "all_tied": flat, "k": cfg.k}
    print(f"preferences: {len(ranked)} of {len(prompts)} prompts ranked ({flat} with all samples tied) -> {out}")
    return summary
