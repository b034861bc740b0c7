"""Direct preference optimization: learn from chosen/rejected pairs with no reward model and no RL.

    lmforge dpo --model runs/world/sft/final --data pairs.jsonl --out runs/dpo
    lmforge dpo --model M --data dpo_en_demo.json --loss ipo --beta 0.5 --lora --out runs/ipo

With log π(y|x) the *sum* of the response's token log-probabilities (prompt and padding masked out), and the
SFT model as the frozen reference π_ref:

    Δ_c = log π(y_c|x) - log π_ref(y_c|x)      Δ_r = log π(y_r|x) - log π_ref(y_r|x)
    sigmoid (DPO):  L = -log sigmoid(β (Δ_c - Δ_r))                        = ln 2 while π = π_ref
    IPO:            L = (Δ_c/|y_c| - Δ_r/|y_r| - 1/(2β))^2                  = (1/(2β))^2 while π = π_ref

IPO here uses length-normalised log-ratios (per response token, as TRL does), so long responses do not
dominate the squared loss. The implicit reward of a response is β Δ; the logged metrics follow TRL's names:
`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`.

The reference log-probabilities are computed once before training, in one pass of the SFT model, and cached
beside the run (keyed by the reference checkpoint and the data), so the reference never sits in memory
during training. `--lora` trains `peft` adapters (saved merged); the loop runs it under `torchrun` as any method.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint
from lmforge.data.preferences import drop_too_long, format_skips, read_pairs
from lmforge.errors import BadConfigError
from lmforge.train.loop import TrainConfig, example_batches, train, world_info
from lmforge.train.sft import _load_adapter, _save, add_lora


@dataclass(frozen=True)
class DPOConfig:
    model: str = ""
    """The SFT checkpoint: the policy starts from it and it is the frozen reference."""
    data: str = ""
    """Preference pairs: {prompt, chosen, rejected} (strings or messages), ranked lists, HH-RLHF transcripts."""
    valid_data: str = ""
    """Held-out pairs: their implicit-reward accuracy and margin are logged."""
    format: str = "auto"
    out: str = "runs/dpo"
    beta: float = 0.1
    """Strength of the pull towards the reference (larger: stay closer)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    max_len: int = 0
    """Longest prompt + response in tokens (longer pairs are skipped and counted); 0: the model's context."""
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=150, batch_size=16, lr=1e-4,
                                                                   warmup_steps=10, eval_every=50,
                                                                   weight_decay=0.0))


# ---------------------------------------------------------------------------------------------------------
# Log-probabilities and the loss


def sequence_logprobs(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over the masked tokens, number of masked tokens) per row. `loss_mask[b, t]` = 1 on the
    response tokens (and their EOS); token t is predicted from the logits at t - 1."""
    logits = model(input_ids)[:, :-1].float()  # fp32: log-softmax in low precision gives NaN or a flat loss
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = loss_mask[:, 1:].to(logp.dtype)
    return (logp * mask).sum(-1), mask.sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict]:
    """The mean loss over pairs and TRL's reward metrics, from summed sequence log-probabilities."""
    delta_c, delta_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (delta_c - delta_r))
    elif kind == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise BadConfigError("the IPO loss needs the response lengths")
        losses = (delta_c / chosen_tokens - delta_r / rejected_tokens - 1 / (2 * beta)) ** 2
    else:
        raise BadConfigError(f"--loss must be 'sigmoid' or 'ipo', got {kind!r}")
    chosen, rejected = beta * delta_c.detach(), beta * delta_r.detach()
    metrics = {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
               "rewards/margins": (chosen - rejected).mean().item(),
               "rewards/accuracies": (chosen > rejected).float().mean().item(),
               "logps/chosen": policy_chosen.detach().mean().item(),
               "logps/rejected": policy_rejected.detach().mean().item()}
    return losses.mean(), metrics


# ---------------------------------------------------------------------------------------------------------
# Data: a pair is the prompt rendered with each response; the mask marks the response's tokens


def encode_pairs(pairs, tokenizer) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    """[((chosen ids, mask), (rejected ids, mask))] through the chat template: prompt and padding are never
    scored, the response and the EOS that closes it are."""
    out = []
    for pair in pairs:
        rendered = []
        for response in (pair.chosen, pair.rejected):
            ids, mask = tokenizer.render([*pair.prompt, {"role": "assistant", "content": response}])
            last = max(i for i, m in enumerate(mask) if m == 0) + 1  # only the final assistant turn is scored
            rendered.append((ids, [0] * last + mask[last:]))
        out.append(tuple(rendered))
    return out


def collate_pairs(encoded, reference: torch.Tensor | None, indices: list[int], pad_id: int) -> dict:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B], right-padded, with masks and reference log-probs."""
    rows = [encoded[i][0] for i in indices] + [encoded[i][1] for i in indices]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        loss_mask[r, :len(mask)] = torch.tensor(mask)
    batch = {"input_ids": input_ids, "loss_mask": loss_mask}
    if reference is not None:
        batch["reference"] = torch.cat([reference[indices, 0], reference[indices, 1]])
    return batch


def preference_loss(model, batch, beta: float, kind: str) -> tuple[torch.Tensor, dict]:
    logps, counts = sequence_logprobs(model, batch["input_ids"], batch["loss_mask"])
    b = logps.size(0) // 2
    ref = batch["reference"]
    loss, metrics = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta, kind, counts[:b], counts[b:])
    return loss, {**metrics, "n_tokens": int(counts.sum())}


@torch.no_grad()
def reference_logprobs(model, encoded, pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """(N, 2) summed log-probs of each pair's chosen and rejected response under `model`, in one pass."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(encoded), batch_size):
        idx = list(range(i, min(i + batch_size, len(encoded))))
        batch = collate_pairs(encoded, None, idx, pad_id)
        logps, _ = sequence_logprobs(model, batch["input_ids"].to(device), batch["loss_mask"].to(device))
        out.append(logps.view(2, -1).T.cpu())
    return torch.cat(out)


def _cached_reference(path: Path, key: str, compute) -> torch.Tensor:
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == key:
            return saved["logps"]
    logps = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "logps": logps}, tmp)
    tmp.replace(path)
    return logps


def load_pairs(path: str, tokenizer, max_len: int, format: str = "auto") -> list:
    pairs, skipped = read_pairs(path, format=format)
    pairs, too_long = drop_too_long(
        pairs, lambda prompt, response: len(tokenizer.render([*prompt, {"role": "assistant", "content": response}])[0]),
        max_len)  # raises when nothing is left
    skipped = {**skipped, **too_long}
    if skipped:
        print(f"{path}: {format_skips(skipped)}")
    return pairs


# ---------------------------------------------------------------------------------------------------------
# The run


def dpo(cfg: DPOConfig) -> Path:
    if not cfg.model or not cfg.data:
        raise BadConfigError("dpo needs --model CHECKPOINT and --data FILE")
    rank, world_size = world_info()
    model, tokenizer, record = load_checkpoint(cfg.model)  # a reward model given here is a clear error
    max_len = cfg.max_len or model.cfg.max_seq_len
    encoded = encode_pairs(load_pairs(cfg.data, tokenizer, max_len, cfg.format), tokenizer)
    valid = encode_pairs(load_pairs(cfg.valid_data, tokenizer, max_len, cfg.format), tokenizer) \
        if cfg.valid_data else []

    def key(data: str) -> str:
        digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()[:16]
        return json.dumps([record.get("config_hash"), record["files"]["model.safetensors"], digest, max_len,
                           cfg.format])

    out = Path(cfg.out)
    reference = _cached_reference(out / "reference_logps.pt", key(cfg.data),
                                  lambda: reference_logprobs(model, encoded, tokenizer.pad_id))
    valid_reference = _cached_reference(out / "reference_logps_valid.pt", key(cfg.valid_data),
                                        lambda: reference_logprobs(model, valid, tokenizer.pad_id)) if valid else None
    if cfg.lora:
        model = add_lora(model, cfg)
    loss_fn = partial(preference_loss, beta=cfg.beta, kind=cfg.loss)

    @torch.no_grad()
    def evaluate(m) -> dict:
        if not valid:
            return {}
        m.eval()
        device = next(m.parameters()).device
        rows = []
        for i in range(0, len(valid), 16):
            batch = collate_pairs(valid, valid_reference, list(range(i, min(i + 16, len(valid)))), tokenizer.pad_id)
            _, metrics = loss_fn(m, {k: v.to(device) for k, v in batch.items()})
            rows.append(metrics)
        return {f"val_{k}": sum(r[k] for r in rows) / len(rows) for k in ("rewards/margins", "rewards/accuracies")}

    configs = {"dpo": asdict(cfg)}
    save = partial(_save, tokenizer=tokenizer, configs=configs, lineage={"stage": "dpo", "parent": str(cfg.model)})
    train(model, example_batches(len(encoded), cfg.train, rank, world_size,
                                 lambda idx: collate_pairs(encoded, reference, idx, tokenizer.pad_id)),
          loss_fn, cfg.train, out, save=save, evaluate=evaluate, load=_load_adapter if cfg.lora else None)
    return out / "final"
