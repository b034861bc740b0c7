"""PPO with a KL leash: InstructGPT's step 3, the policy optimised against a reward model on new prompts.

    lmforge ppo --model runs/world/sft/final --reward-model runs/world/reward/final \
                --prompts runs/world/preferences/train_prompts.jsonl --out runs/ppo

Four models: the policy (from SFT, trained), a frozen reference (an SFT copy), the frozen reward model, and a
value model (trained) started from the reward model, as in the N+ implementation details of RLHF with PPO
(a fresh head on a copy of the policy when the reward is a plain function). Each iteration:

1. **Rollout** through the engine on the live policy: pure sampling at `temperature`, no top-k/top-p
   truncation, so the tokens are drawn from exactly the distribution whose log-probabilities are trained.
2. **Score**: log-probs of the sampled tokens under the policy and the reference (both from `logits / T`),
   values, and the reward model's score at the last token; a response that never emitted EOS loses
   `missing_eos_penalty`.
3. **Per-token rewards** `r_t = -beta * kl_t` (k1 `log pi - log ref` by default; k2, k3 as options), with the
   score added at the last token. **GAE** over the response (`gamma`, `lam`), advantages whitened over the batch.
4. **PPO epochs**: `epochs` passes over the rollout batch in minibatches, each an optimizer step of the one
   loop, with the clipped policy loss and the clipped value loss (`value_coef`).
5. The optional **adaptive KL controller** moves beta towards `kl_target`.

Rollouts happen inside the loop's batch function at each iteration's first step, so the updates go through
`train_loop.train` like every method (and under `torchrun` each rank rolls out its own share of prompts).
Logged per iteration in `iterations.jsonl`: reward-model score, gold score (world prompts), KL (k1 summed per
sequence, at temperature 1), entropy, response length, EOS rate, beta, and the mean policy loss, value loss,
clip fractions, approximate KL and ratio of the iteration's updates.
A PPO run does not resume: its rollout buffer is not checkpointed, only the final policy is saved.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import BadConfigError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import RewardModel
from lmforge.train.loop import TrainConfig, micro_batch_count, pick_device, train, world_info
from lmforge.train.sft import _save, add_lora, merged_copy


@dataclass(frozen=True)
class PPOConfig:
    model: str = ""
    """The SFT checkpoint: the policy starts from it and a frozen copy is the reference."""
    reward_model: str = ""
    """A reward model checkpoint (`lmforge reward train`) with the policy's tokenizer."""
    prompts: str = ""
    """JSONL prompts: world task records (Alpaca with meta: the gold score is logged too) or {"prompt": ...}."""
    out: str = "runs/ppo"
    iterations: int = 20
    """Rollout-and-update rounds."""
    rollouts: int = 32
    """Prompts sampled (one response each) per iteration, across all ranks."""
    epochs: int = 4
    """Passes over each rollout batch."""
    temperature: float = 1.0
    """Rollout temperature; the training log-probs use the same logits / T."""
    max_new_tokens: int = 96
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty to the reference (0: no leash)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_target: float = 0.0
    """Adaptive KL controller's target (summed KL per sequence); 0: beta stays fixed."""
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    """Policy ratio clip epsilon."""
    value_clip: float = 0.2
    value_coef: float = 0.1
    missing_eos_penalty: float = 1.0
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=0, batch_size=16, lr=1e-5, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, eval_every=10**9))
    """`train.batch_size` is the minibatch (sequences per optimizer step); `train.steps` is derived from
    iterations x epochs x rollouts / batch_size."""


# ---------------------------------------------------------------------------------------------------------
# The pieces, each checked by hand in the tests


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Estimates of KL(pi || ref) from tokens sampled from pi, with u = log ref - log pi:
    k1 = -u (unbiased, can be negative), k2 = u^2 / 2, k3 = e^u - 1 - u (unbiased and never negative)."""
    u = ref_logp - logp
    if estimator == "k1":
        return -u
    if estimator == "k2":
        return 0.5 * u * u
    if estimator == "k3":
        return torch.expm1(u) - u
    raise BadConfigError(f"kl_estimator must be k1, k2 or k3, got {estimator!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) over response positions (B, L), mask 1 on real tokens, left-aligned:
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1},  R_t = A_t + V_t, V past the end = 0."""
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (zero elsewhere)."""
    mask = mask.to(x.dtype)
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = ((x - mean) ** 2 * mask).sum() / n
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def clipped_policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): mean over masked tokens of max(-A rho, -A clip(rho, 1-eps, 1+eps))."""
    ratio = torch.exp((logp - logp_old).clamp(-20, 20))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    n = mask.sum().clamp(min=1)
    loss = (torch.maximum(unclipped, clipped) * mask).sum() / n
    clipfrac = ((clipped > unclipped).to(mask.dtype) * mask).sum() / n
    return loss, clipfrac


def clipped_value_loss(values: torch.Tensor, values_old: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction): 1/2 mean over masked tokens of max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    clipped = values_old + (values - values_old).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    n = mask.sum().clamp(min=1)
    return 0.5 * (torch.maximum(a, b) * mask).sum() / n, ((b > a).to(mask.dtype) * mask).sum() / n


def adapt_kl_coef(beta: float, observed_kl: float, target: float, n_steps: int, horizon: int) -> float:
    """The adaptive controller: beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""
    error = min(max(observed_kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n_steps / horizon)


# ---------------------------------------------------------------------------------------------------------
# Policy and value in one module, so the loop (and DDP) trains both with one optimizer


class PolicyAndValue(nn.Module):
    def __init__(self, policy: nn.Module, value: RewardModel):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V), values (B, T)): the value at position t is that of the state that emits token t+1."""
        values = self.value.score(self.value.body(input_ids)).squeeze(-1).float()
        return self.policy(input_ids).float(), values


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, index: torch.Tensor, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) of the response tokens, (B, L): position index[b, j] of the logits predicts
    token index[b, j] + 1."""
    picked = _gather_response_logits(logits, index) / temperature  # (B, L, V)
    logps = F.log_softmax(picked, dim=-1)
    targets = input_ids.gather(1, index + 1)
    entropy = -(logps.exp() * logps).sum(-1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def _gather_response_logits(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.size(-1)))


def ppo_loss(model, batch, clip: float, value_clip: float, value_coef: float, temperature: float
             ) -> tuple[torch.Tensor, dict]:
    logits, values = model(batch["input_ids"])
    mask = batch["mask"].float()
    logp, entropy = response_logprobs(logits, batch["input_ids"], batch["index"], temperature)
    values = values.gather(1, batch["index"])
    policy_loss, clipfrac = clipped_policy_loss(logp, batch["logp_old"], batch["advantages"], mask, clip)
    value_loss, value_clipfrac = clipped_value_loss(values, batch["values_old"], batch["returns"], mask, value_clip)
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        log_ratio = (logp - batch["logp_old"]) * mask
        metrics = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "clipfrac": clipfrac.item(),
                   "value_clipfrac": value_clipfrac.item(), "approxkl": (0.5 * (log_ratio ** 2).sum() / n).item(),
                   "ratio": ((log_ratio.exp() * mask).sum() / n).item(), "entropy": ((entropy * mask).sum() / n).item(),
                   "n_tokens": int(batch["attention"].sum())}
    return policy_loss + value_coef * value_loss, metrics


# ---------------------------------------------------------------------------------------------------------
# Rollouts


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def rollout(model: PolicyAndValue, reference: nn.Module, tokenizer, prompts: list[list[int]],
            reward_fn: Callable[[list[list[int]], list[list[int]]], list[float]], cfg: PPOConfig, beta: float,
            seed: int) -> tuple[dict, dict, list[str]]:
    """Sample one response per prompt from the live policy and turn it into a training batch:
    (batch tensors on CPU, statistics, response texts)."""
    device = next(model.parameters()).device
    model.eval()
    policy = merged_copy(model.policy)  # LoRA: the adapters folded in, so the engine sees plain weights
    engine = Engine(policy, tokenizer, max_batch_size=64)
    params = [SamplingParams(temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
                             seed=seed * 1_000_003 + i) for i in range(len(prompts))]
    outputs = engine.generate(prompts, params)
    responses = [o.token_ids for o in outputs]
    finished = torch.tensor([o.finish_reason == "stop" for o in outputs])
    texts = [o.text.strip() for o in outputs]

    rows = [p + r for p, r in zip(prompts, responses)]
    input_ids = _pad(rows, tokenizer.pad_id).to(device)
    lengths = torch.tensor([len(r) for r in responses])
    width = max(1, int(lengths.max()))
    # index[b, j]: the logits position that predicts response token j of row b
    index = torch.tensor([[len(p) - 1 + min(j, max(len(r) - 1, 0)) for j in range(width)]
                          for p, r in zip(prompts, responses)], device=device)
    mask = (torch.arange(width)[None] < lengths[:, None]).to(device)

    logits, values = model(input_ids)
    ref_logits = reference(input_ids).float()
    logp_old, entropy = response_logprobs(logits, input_ids, index, cfg.temperature)
    ref_logp, _ = response_logprobs(ref_logits, input_ids, index, cfg.temperature)
    values_old = values.gather(1, index) * mask
    # the KL that is logged: k1 summed per sequence, at temperature 1 whatever the rollouts' temperature
    if cfg.temperature == 1.0:
        logp_t1, ref_t1 = logp_old, ref_logp
    else:
        logp_t1, _ = response_logprobs(logits, input_ids, index, 1.0)
        ref_t1, _ = response_logprobs(ref_logits, input_ids, index, 1.0)
    kl_t1 = ((logp_t1 - ref_t1) * mask).sum(1)

    scores = torch.tensor(reward_fn(prompts, responses), dtype=torch.float, device=device)
    scores = scores - cfg.missing_eos_penalty * (~finished).to(device).float()
    kl = kl_per_token(logp_old, ref_logp, cfg.kl_estimator).clamp(-10, 10) * mask
    rewards = -beta * kl
    last = (lengths - 1).clamp(min=0).to(device)
    rewards[torch.arange(len(rows), device=device), last] += scores
    advantages, returns = gae(rewards, values_old, mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask)

    attention = (torch.arange(input_ids.size(1))[None] < torch.tensor([len(r) for r in rows])[:, None])
    batch = {"input_ids": input_ids, "index": index, "mask": mask, "logp_old": logp_old * mask,
             "values_old": values_old, "advantages": advantages, "returns": returns, "attention": attention}
    batch = {k: v.cpu() for k, v in batch.items()}
    stats = {"score": scores.mean().item(), "kl": kl_t1.mean().item(),
             "entropy": ((entropy * mask).sum(1)).mean().item(), "length": lengths.float().mean().item(),
             "eos_rate": finished.float().mean().item(), "beta": beta}
    return batch, stats, texts


# ---------------------------------------------------------------------------------------------------------
# Training


def ppo_train(policy: nn.Module, tokenizer, prompts: list[list[int]],
              reward_fn: Callable[[list[list[int]], list[list[int]]], list[float]], cfg: PPOConfig,
              value_init: RewardModel | None = None, gold_fn: Callable[[list[int], list[str]], list[float]] | None = None,
              save: Callable | None = None) -> list[dict]:
    """Optimise `policy` in place against `reward_fn(prompt ids, response ids) -> scores`; returns one row of
    statistics per iteration (also written to OUT/iterations.jsonl). `gold_fn(prompt indices, texts)` adds
    the gold score of each iteration's responses when the prompts have one."""
    if not prompts:
        raise BadConfigError("ppo: no prompts")
    rank, world_size = world_info()
    micro_size, n_micro = micro_batch_count(cfg.train, world_size)
    per_step = micro_size * n_micro  # sequences of one optimizer step on this rank
    local_rollouts = cfg.rollouts // world_size
    if cfg.rollouts % world_size or local_rollouts % per_step:
        raise BadConfigError(f"ppo: --rollouts {cfg.rollouts} must split evenly over {world_size} rank(s) into "
                             f"minibatches of --train.batch-size {cfg.train.batch_size}")
    minibatches = local_rollouts // per_step
    steps_per_iteration = cfg.epochs * minibatches
    train_cfg = TrainConfig(**{**asdict(cfg.train), "steps": cfg.iterations * steps_per_iteration})

    lora = hasattr(policy, "merge_and_unload")
    reference = (merged_copy(policy) if lora else copy.deepcopy(policy)).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    if value_init is None:
        value_init = RewardModel(merged_copy(policy) if lora else copy.deepcopy(policy))
        nn.init.zeros_(value_init.score.weight)
    model = PolicyAndValue(policy, copy.deepcopy(value_init))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    history_path = out / "iterations.jsonl"
    if rank == 0 and history_path.exists():
        history_path.unlink()

    state = {"iteration": -1, "beta": cfg.kl_coef, "batch": None, "order": None}
    history: list[dict] = []
    rng = random.Random(cfg.train.seed * 7919 + rank)

    def get_micro_batches(step: int) -> list[dict]:
        iteration, within = divmod(step, steps_per_iteration)
        if iteration != state["iteration"]:
            reference.to(next(model.parameters()).device)
            chosen = [rng.randrange(len(prompts)) for _ in range(local_rollouts)]
            batch, stats, texts = rollout(model, reference, tokenizer, [prompts[i] for i in chosen], reward_fn,
                                          cfg, state["beta"], seed=cfg.train.seed * 100_003 + iteration * 1009 + rank)
            model.train()
            if gold_fn is not None:
                stats["gold"] = sum(gold_fn(chosen, texts)) / len(texts)
            stats = {"iteration": iteration + 1, **stats}
            history.append(stats)
            if rank == 0:
                with open(history_path, "a") as f:
                    f.write(json.dumps(stats) + "\n")
            if cfg.kl_target > 0:
                state["beta"] = adapt_kl_coef(state["beta"], stats["kl"], cfg.kl_target, cfg.rollouts, cfg.kl_horizon)
            state.update(iteration=iteration, batch=batch)
        batch = state["batch"]
        epoch, m = divmod(within, minibatches)
        if m == 0:  # a new shuffle for every epoch
            state["order"] = torch.randperm(local_rollouts, generator=torch.Generator().manual_seed(
                cfg.train.seed * 31 + step))
        picked = state["order"][m * per_step:(m + 1) * per_step]
        micro = []
        for k in range(n_micro):
            rows = picked[k * micro_size:(k + 1) * micro_size]
            micro.append({key: value[rows] for key, value in batch.items()})
        return micro

    loss_fn = partial(ppo_loss, clip=cfg.clip, value_clip=cfg.value_clip, value_coef=cfg.value_coef,
                      temperature=cfg.temperature)
    train(model, get_micro_batches, loss_fn, train_cfg, out, save=save, resume=False)
    if rank == 0:  # each iteration's row gains the mean of its updates' losses and clip fractions
        updates: dict[int, list[dict]] = {}
        for line in (out / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            updates.setdefault((row["step"] - 1) // steps_per_iteration, []).append(row)
        for i, stats in enumerate(history):
            rows = updates.get(i, [])
            for key in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac", "approxkl", "ratio"):
                if rows:
                    stats[key] = sum(r[key] for r in rows) / len(rows)
        history_path.write_text("".join(json.dumps(stats) + "\n" for stats in history))
    return history


def ppo(cfg: PPOConfig) -> Path:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.data.oracle import gold_score
    from lmforge.train.reward import check_same_tokenizer, sequence_rewards
    from lmforge.train.sample_preferences import read_prompts

    if not cfg.model or not cfg.reward_model or not cfg.prompts:
        raise BadConfigError("ppo needs --model CHECKPOINT, --reward-model CHECKPOINT and --prompts FILE")
    policy, tokenizer, _ = load_checkpoint(cfg.model)
    reward_model, rm_tokenizer, _ = load_checkpoint(cfg.reward_model, kind="reward_model")
    check_same_tokenizer(tokenizer, rm_tokenizer, cfg.model, cfg.reward_model)
    keep = policy.cfg.max_seq_len - cfg.max_new_tokens
    read = read_prompts(cfg.prompts)
    usable = [(messages, record) for messages, record in read if len(tokenizer.render_prompt(messages)) <= keep]
    if not usable:
        raise BadConfigError(f"{cfg.prompts}: no usable prompt (all {len(read)} leave no room for "
                             f"{cfg.max_new_tokens} new tokens in the context of {policy.cfg.max_seq_len})")
    if len(usable) < len(read):
        print(f"{cfg.prompts}: {len(read) - len(usable)} prompts longer than the context allows were skipped")
    prompts = [tokenizer.render_prompt(m) for m, _ in usable]
    records = [r for _, r in usable]
    reward_model.to(pick_device(cfg.train.device)).eval()

    def reward_fn(prompt_ids, response_ids) -> list[float]:
        return sequence_rewards(reward_model, [p + r for p, r in zip(prompt_ids, response_ids)], tokenizer.pad_id)

    gold_fn = None
    if all("meta" in r for r in records):
        def gold_fn(indices, texts) -> list[float]:
            return [gold_score(records[i], t) for i, t in zip(indices, texts)]
    if cfg.lora:
        policy = add_lora(policy, cfg)
    save_policy = partial(_save, tokenizer=tokenizer, configs={"ppo": asdict(cfg)},
                          lineage={"stage": "ppo", "parent": str(cfg.model), "reward_model": str(cfg.reward_model)})
    history = ppo_train(policy, tokenizer, prompts, reward_fn, cfg, value_init=reward_model, gold_fn=gold_fn,
                        save=lambda directory, model, **kw: save_policy(directory, model.policy, **kw))
    if history:
        last = history[-1]
        print(f"ppo: {len(history)} iterations; last reward-model score {last['score']:.3f}, KL {last['kl']:.2f}"
              + (f", gold {last['gold']:.3f}" if "gold" in last else "") + f" -> {Path(cfg.out) / 'final'}")
    return Path(cfg.out) / "final"
