"""The reward model: a scalar score of a (prompt, response), trained from comparisons (InstructGPT step 2).

    lmforge reward train --model runs/world/sft/final --data pairs.jsonl --valid-data held.jsonl --out runs/rm
    lmforge reward score --model runs/rm/final --data responses.jsonl --out scored.jsonl

The model is the SFT checkpoint with its unembedding replaced by a linear head read at the last real token
(the EOS that closes the response; `model.RewardModel`). Its loss is Bradley-Terry: a preferred response y_w
should outscore a dispreferred y_l,

    L = -log sigmoid(r(x, y_w) - r(x, y_l) - margin)

For a ranked list of K responses, all C(K,2) pairs of one prompt form one batch element and their losses are
averaged (scaled by 1/C(K,2)): K forward passes per prompt instead of 2·C(K,2), and the pairs of one prompt
are never spread over batches (shuffled pairs made InstructGPT's reward model overfit). A pair is the case
K = 2. Optional: a fixed `margin`, and `center` · mean((r_w + r_l)^2), which keeps rewards near 0 (rewards
are only defined up to a constant). Accuracy is the share of held-out comparisons ranked like the labels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.data.instructions import read_records
from lmforge.data.preferences import drop_too_long, format_skips, read_ranked, write_jsonl
from lmforge.errors import BadConfigError, BadFileError, MismatchError
from lmforge.model import RewardModel
from lmforge.train.loop import TrainConfig, example_batches, train, world_info


@dataclass(frozen=True)
class RewardConfig:
    model: str = ""
    """The checkpoint the reward model starts from (usually the SFT model)."""
    data: str = ""
    """Comparisons: pairs {prompt, chosen, rejected}, ranked lists {prompt, responses}, HH-RLHF transcripts."""
    valid_data: str = ""
    """Held-out comparisons: their pair accuracy is logged and saved with the checkpoint."""
    format: str = "auto"
    out: str = "runs/reward"
    margin: float = 0.0
    center: float = 0.0
    """Coefficient of mean((r_w + r_l)^2), keeping rewards centred near 0 (0.01 is a common choice)."""
    max_len: int = 0
    """Longest prompt + response in tokens (longer comparisons are skipped and counted); 0: the context."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=16, lr=3e-4,
                                                                   warmup_steps=10, eval_every=50))


# ---------------------------------------------------------------------------------------------------------
# The loss


def ranking_loss(rewards: torch.Tensor, group_sizes: list[int], margin: float = 0.0,
                 center: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Rewards of consecutive groups, each ranked best first -> (mean over groups of the mean pair loss,
    metrics). Every pair (i, j) with i ranked above j adds -log sigmoid(r_i - r_j - margin)."""
    losses, wins, gaps = [], [], []
    start = 0
    for k in group_sizes:
        r = rewards[start:start + k]
        start += k
        better, worse = zip(*combinations(range(k), 2))
        diff = r[list(better)] - r[list(worse)]
        loss = -F.logsigmoid(diff - margin).mean()
        if center:
            loss = loss + center * ((r[list(better)] + r[list(worse)]) ** 2).mean()
        losses.append(loss)
        wins.append((diff > 0).float().mean())
        gaps.append(diff.mean())
    metrics = {"accuracy": torch.stack(wins).mean().item(), "margin": torch.stack(gaps).mean().item(),
               "reward_mean": rewards.mean().item()}
    return torch.stack(losses).mean(), metrics


# ---------------------------------------------------------------------------------------------------------
# Data: each example is one prompt with its responses, best first, as token ids


def encode_group(tokenizer, prompt: list[dict], responses: list[str]) -> list[list[int]]:
    """prompt + each response rendered with the chat template; the last token is the response's EOS."""
    return [tokenizer.render([*prompt, {"role": "assistant", "content": r}])[0] for r in responses]


def load_comparisons(path: str, tokenizer, max_len: int, format: str = "auto") -> list[list[list[int]]]:
    """Token ids of every usable comparison group in `path`; what is skipped is logged with a count per reason
    (an error only when nothing is left)."""
    ranked, skipped = read_ranked(path, format=format)
    ranked, too_long = drop_too_long(
        ranked, lambda prompt, response: len(encode_group(tokenizer, prompt, [response])[0]), max_len)
    skipped = {**skipped, **too_long}
    if skipped:
        print(f"{path}: {format_skips(skipped, 'comparisons')}")
    return [encode_group(tokenizer, item.prompt, item.responses) for item in ranked]


def collate_groups(groups: list[list[list[int]]], pad_id: int) -> dict:
    rows = [ids for group in groups for ids in group]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
    return {"input_ids": input_ids, "lengths": torch.tensor([len(r) for r in rows]),
            "group_sizes": [len(g) for g in groups]}


def reward_loss(model, batch, margin: float = 0.0, center: float = 0.0) -> tuple[torch.Tensor, dict]:
    rewards = model(batch["input_ids"], batch["lengths"])
    loss, metrics = ranking_loss(rewards, batch["group_sizes"], margin, center)
    return loss, {**metrics, "n_tokens": int(batch["lengths"].sum())}


@torch.no_grad()
def group_rewards(model, groups: list[list[list[int]]], pad_id: int, batch_size: int = 16) -> list[list[float]]:
    """The reward of every response of every group, group by group, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(groups), batch_size):
        batch = collate_groups(groups[i:i + batch_size], pad_id)
        values = model(batch["input_ids"].to(device), batch["lengths"].to(device)).tolist()
        for k in batch["group_sizes"]:
            out.append(values[:k])
            values = values[k:]
    return out


def sequence_rewards(model, sequences: list[list[int]], pad_id: int) -> list[float]:
    """One reward per token sequence (prompt + response ids, ending where the response ends)."""
    return [group[0] for group in group_rewards(model, [[ids] for ids in sequences], pad_id)]


def check_same_tokenizer(policy_tokenizer, reward_tokenizer, policy: str, reward_model: str) -> None:
    """A reward model scores the policy's token ids directly, so both must share one vocabulary."""
    if policy_tokenizer.fingerprint() != reward_tokenizer.fingerprint():
        raise MismatchError(f"{reward_model}: its tokenizer differs from the policy's ({policy}); the reward model "
                            "must read the policy's tokens: train it from the same SFT model")


def pair_accuracy(model, groups: list[list[list[int]]], pad_id: int, batch_size: int = 16) -> float:
    """Share of the comparisons (every ordered pair of every group) the model ranks like the labels."""
    right = total = 0
    for r in group_rewards(model, groups, pad_id, batch_size):
        pairs = list(combinations(range(len(r)), 2))
        right += sum(r[a] > r[b] for a, b in pairs)
        total += len(pairs)
    return right / max(total, 1)


# ---------------------------------------------------------------------------------------------------------
# Training and scoring


def _load_reward_weights(model: RewardModel, directory: Path) -> None:
    """Resume: the saved checkpoint is a LlamaForSequenceClassification; load it back into the live model."""
    saved, _, _ = load_checkpoint(directory, kind="reward_model")
    model.load_state_dict(saved.state_dict())


def train_reward(cfg: RewardConfig) -> Path:
    if not cfg.model or not cfg.data:
        raise BadConfigError("reward train needs --model CHECKPOINT and --data FILE")
    rank, world_size = world_info()
    body, tokenizer, _ = load_checkpoint(cfg.model)  # a reward model given here is a clear error
    model = RewardModel(body)
    max_len = cfg.max_len or model.cfg.max_seq_len
    groups = load_comparisons(cfg.data, tokenizer, max_len, cfg.format)
    valid = load_comparisons(cfg.valid_data, tokenizer, max_len, cfg.format) if cfg.valid_data else []
    configs = {"reward": asdict(cfg)}
    lineage = {"stage": "reward", "parent": str(cfg.model)}

    def save(directory, m, trainer_state=None, metrics=None):
        save_checkpoint(directory, m, tokenizer, configs=configs, lineage=lineage, trainer_state=trainer_state,
                        metrics=metrics)

    def evaluate(m):
        return {"val_accuracy": pair_accuracy(m, valid, tokenizer.pad_id)} if valid else {}

    train(model, example_batches(len(groups), cfg.train, rank, world_size,
                                 lambda idx: collate_groups([groups[i] for i in idx], tokenizer.pad_id)),
          partial(reward_loss, margin=cfg.margin, center=cfg.center), cfg.train, cfg.out, save=save,
          evaluate=evaluate, load=_load_reward_weights)
    return Path(cfg.out) / "final"


@dataclass(frozen=True)
class ScoreConfig:
    model: str = ""
    """A reward model checkpoint (`lmforge reward train`)."""
    data: str = ""
    """JSONL records with `prompt` (a string or messages) and `response` (a string) or `responses` (a list)."""
    out: str = ""
    """Where to write the records with `reward` (or `rewards`) added; default: print them."""
    batch_size: int = 16
    """Records (each with all its responses) per forward pass."""


def prompt_messages(prompt, where: str) -> list[dict]:
    """A record's `prompt`: a string (one user message) or a list of {role, content} messages."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return prompt
    raise BadFileError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")


def score_file(cfg: ScoreConfig) -> list[dict]:
    """Add the reward model's score to every response of a JSONL file, written atomically."""
    model, tokenizer, _ = load_checkpoint(cfg.model, kind="reward_model")
    records, groups = [], []
    for where, record in read_records(cfg.data):
        if "prompt" not in record or not ("response" in record or "responses" in record):
            raise BadFileError(f"{where}: needs 'prompt' and 'response' or 'responses'")
        responses = record["responses"] if "responses" in record else [record["response"]]
        # too long for the context: the prompt's start goes, the response and its EOS stay
        groups.append([ids[-model.cfg.max_seq_len:]
                       for ids in encode_group(tokenizer, prompt_messages(record["prompt"], where), responses)])
        records.append(record)
    for record, values in zip(records, group_rewards(model, groups, tokenizer.pad_id, cfg.batch_size)):
        record["rewards" if "responses" in record else "reward"] = values if "responses" in record else values[0]
    if cfg.out:
        write_jsonl(cfg.out, records)
    else:
        print("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), end="")
    return records
