"""Rejection sampling: best-of-n by a reward model, then SFT on the winners (Llama 2's first alignment rounds).

    lmforge rejection-sampling --model runs/world/sft/final --reward-model runs/world/reward/final \
                               --prompts runs/world/preferences/train_prompts.jsonl --n 4 --rounds 2 --out runs/rs

Each round, the latest policy samples `n` responses per prompt (temperature `temperature`, no truncation);
the reward model scores them and the highest-scoring one is the prompt's winner. The round then fine-tunes the
*starting* model (`--model`) through the SFT code on the winners of every round so far, so a round's data grows
and an early lucky winner is not forgotten, while each round's sampler is the improved policy of the round
before. No reinforcement learning, no value model: stable and simple, and the reward model only ranks.

`best_of_n` alone is the inference-time method (`lmforge generate --best-of N --reward-model PATH`): no training,
n times the sampling cost at every request.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lmforge.errors import BadConfigError
from lmforge.train.loop import TrainConfig


@dataclass(frozen=True)
class RejectionConfig:
    model: str = ""
    """The SFT checkpoint: the first round samples from it, and every round fine-tunes it."""
    reward_model: str = ""
    """A reward model checkpoint with the policy's tokenizer."""
    prompts: str = ""
    """JSONL prompts: world task records or {"prompt": string or messages}."""
    out: str = "runs/rejection"
    n: int = 4
    """Responses sampled per prompt; the reward model keeps the best."""
    rounds: int = 2
    temperature: float = 1.0
    max_new_tokens: int = 96
    seed: int = 0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=60, batch_size=16, lr=1e-4, warmup_steps=5,
                                                                   eval_every=10**9, weight_decay=0.0))
    """SFT settings of every round (steps per round)."""
    progress: bool = True


@torch.no_grad()
def best_of_n(model, tokenizer, reward_model, prompts: list[list[dict]], n: int, temperature: float,
              max_new_tokens: int, seed: int) -> list[dict]:
    """For each prompt (messages): n samples, their reward-model scores, and the argmax (ties: the first)."""
    from lmforge.train.sample_preferences import reward_scores, sample_responses

    samples = sample_responses(model, tokenizer, prompts, k=n, temperature=temperature, top_p=1.0,
                               max_new_tokens=max_new_tokens, seed=seed)
    scores = reward_scores(reward_model, tokenizer, prompts, samples)
    out = []
    for texts, values in zip(samples, scores):
        best = max(range(len(values)), key=lambda i: (values[i], -i))
        out.append({"best": texts[best], "best_index": best, "responses": texts, "scores": values})
    return out


def rejection_sampling(cfg: RejectionConfig) -> Path:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.train.reward import check_same_tokenizer
    from lmforge.train.sample_preferences import read_prompts
    from lmforge.train.sft import SFTConfig, sft

    if not cfg.model or not cfg.reward_model or not cfg.prompts:
        raise BadConfigError("rejection-sampling needs --model CHECKPOINT, --reward-model CHECKPOINT and --prompts FILE")
    if cfg.n < 2 or cfg.rounds < 1:
        raise BadConfigError(f"--n must be at least 2 and --rounds at least 1 (got n={cfg.n}, rounds={cfg.rounds})")
    reward_model, rm_tokenizer, _ = load_checkpoint(cfg.reward_model, kind="reward_model")
    policy, tokenizer, _ = load_checkpoint(cfg.model)
    check_same_tokenizer(tokenizer, rm_tokenizer, cfg.model, cfg.reward_model)
    prompts = [messages for messages, _ in read_prompts(cfg.prompts)]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    winners: list[dict] = []
    history = []
    for round_index in range(cfg.rounds):
        round_dir = out / f"round_{round_index + 1}"
        picked = best_of_n(policy, tokenizer, reward_model, prompts, cfg.n, cfg.temperature, cfg.max_new_tokens,
                           cfg.seed + 1009 * round_index)
        winners += [{"messages": [*p, {"role": "assistant", "content": b["best"]}], "round": round_index + 1,
                     "score": b["scores"][b["best_index"]]} for p, b in zip(prompts, picked) if b["best"]]
        round_dir.mkdir(parents=True, exist_ok=True)
        data = round_dir / "winners.jsonl"
        data.write_text("".join(json.dumps(w, ensure_ascii=False) + "\n" for w in winners), encoding="utf-8")
        mean_best = sum(b["scores"][b["best_index"]] for b in picked) / len(picked)
        mean_all = sum(sum(b["scores"]) / len(b["scores"]) for b in picked) / len(picked)
        history.append({"round": round_index + 1, "winners": len(winners), "mean_best_score": mean_best,
                        "mean_sample_score": mean_all})
        print(f"rejection sampling round {round_index + 1}: best-of-{cfg.n} reward {mean_best:.3f} "
              f"(mean sample {mean_all:.3f}); SFT on {len(winners)} winners")
        sft(SFTConfig(model=cfg.model, data=str(data), out=str(round_dir / "sft"),
                      train=replace(cfg.train, seed=cfg.seed + round_index, progress=cfg.progress)),
            lineage={"stage": "rejection_sampling", "round": round_index + 1, "parent": str(cfg.model),
                     "reward_model": str(cfg.reward_model)})
        policy, _, _ = load_checkpoint(round_dir / "sft" / "final")
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(out / f"round_{cfg.rounds}" / "sft" / "final", final)
    (out / "rounds.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return final
