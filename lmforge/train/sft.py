"""Supervised fine-tuning (instruction tuning): the first step of alignment.

The model keeps its next-token objective, but only on the assistant's tokens: each example is a
conversation rendered with the chat template, and `loss_mask` (from `Tokenizer.render`) is 1 on assistant
content and the EOS that ends each assistant turn, 0 on the system and user parts. The model learns to answer
and to stop, never to write the user's side.

    lmforge sft --model runs/world/pretrain/final --data runs/world/world/tasks/train.chat.jsonl --out runs/sft
    lmforge sft --model M --data alpaca_en_demo.json --lora --lora-rank 8 --out runs/lora    # merged on save
    lmforge sft --model M --data ChatbotData.csv --columns instruction=Q output=A --out runs/ko

Batches, two ways:
- **padding** (default): each row one example, right-padded; padded targets are ignored (-100);
- **packing** (`--packing`): several examples per row, each with positions restarting at 0 and a
  block-diagonal causal mask, so no example attends to another; the per-example losses equal the unpacked
  ones (a test holds them within 1e-5), with far less padding.

Batches are a function of the step (a seeded permutation per epoch), so resume is exact as in pretraining.
LoRA goes through `peft` on the native model (`q_proj` ... `down_proj`); checkpoints are saved merged, so
they load in `transformers` as plain Llama, with the adapter beside them (`adapter/`).

`--model` may also be a local Llama-family `transformers` directory: it is imported natively (same logits) and
keeps its own tokenizer and chat template, which renders the conversations; the mask comes from rendering each
prefix of a conversation, so it is exact for any template that only appends.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_checkpoint
from lmforge.data.instructions import load_sft_dataset
from lmforge.errors import BadConfigError
from lmforge.hf import HFCausalLM, load_model
from lmforge.train.loop import TrainConfig, micro_batch_count, train, world_info

IGNORE = -100  # target id cross-entropy skips


@dataclass(frozen=True)
class SFTConfig:
    model: str = ""
    """Checkpoint to fine-tune (usually a pretrained one)."""
    data: str = ""
    """Instruction data: Alpaca JSON/JSONL, chat JSONL, prompt/completion JSONL, or CSV/JSONL with --columns."""
    valid_data: str = ""
    """Validation examples (their loss is logged); default: none."""
    format: str = "auto"
    columns: tuple[str, ...] = ()
    """Column mapping for other files, as field=column pairs, e.g. instruction=Q output=A."""
    out: str = "runs/sft"
    packing: bool = False
    """Pack several examples per row (block-diagonal attention) instead of padding each."""
    lora: bool = False
    """Train low-rank adapters (peft) instead of all weights; the saved checkpoint is merged."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    max_len: int = 0
    """Longest example in tokens (longer ones are dropped and counted); 0: the model's context."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, batch_size=16, lr=1e-3,
                                                                   warmup_steps=30, eval_every=100))


# ---------------------------------------------------------------------------------------------------------
# Batches


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded rows: input_ids = ids[:-1], targets = ids[1:] where the mask is 1, else IGNORE."""
    width = max(len(ids) for ids, _ in examples) - 1
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        input_ids[row, :len(ids) - 1] = ids_t[:-1]
        targets[row, :len(ids) - 1] = torch.where(mask_t[1:], ids_t[1:], IGNORE)
    return {"input_ids": input_ids, "targets": targets}


def pack_rows(examples: list[tuple[list[int], list[int]]], order: np.ndarray, row_len: int) -> list[list[int]]:
    """Greedy first-fit in the given order: lists of example indices whose (len - 1) fit in row_len."""
    rows, current, used = [], [], 0
    for i in order:
        n = len(examples[i][0]) - 1
        if current and used + n > row_len:
            rows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        rows.append(current)
    return rows


def packed_batch(examples, rows: list[list[int]], row_len: int, pad_id: int) -> dict:
    """Rows of several examples: positions restart at each example, and the mask is causal within an example
    and closed between examples (B, 1, T, T), so packing changes no example's logits."""
    B = len(rows)
    input_ids = torch.full((B, row_len), pad_id, dtype=torch.long)
    targets = torch.full((B, row_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, row_len), dtype=torch.long)
    segment = torch.full((B, row_len), -1, dtype=torch.long)  # which example each position belongs to
    for b, members in enumerate(rows):
        start = 0
        for k, i in enumerate(members):
            ids, mask = examples[i]
            ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
            n = len(ids) - 1
            input_ids[b, start:start + n] = ids_t[:-1]
            targets[b, start:start + n] = torch.where(mask_t[1:], ids_t[1:], IGNORE)
            position_ids[b, start:start + n] = torch.arange(n)
            segment[b, start:start + n] = k
            start += n
    causal = torch.ones(row_len, row_len, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    # Padding positions attend to themselves only, so no row of the mask is empty (SDPA would give NaN).
    attn_mask = (same & causal) | torch.eye(row_len, dtype=torch.bool)
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids, "attn_mask": attn_mask[:, None]}


def make_batcher(examples, cfg: SFTConfig, row_len: int, pad_id: int, rank: int, world_size: int) -> Callable:
    """get_micro_batches(step) for this rank: rows of the global batch, cut into micro-batches."""
    micro, n_micro = micro_batch_count(cfg.train, world_size)
    per_rank = micro * n_micro
    seed = cfg.train.seed
    packs: dict[int, list[list[int]]] = {}

    def units(epoch: int) -> list[list[int]]:
        """The rows of one epoch: one example each, or packs of several (their count varies by epoch)."""
        if epoch not in packs:
            order = epoch_order(len(examples), seed, epoch)
            packs[epoch] = pack_rows(examples, order, row_len) if cfg.packing else [[int(i)] for i in order]
        return packs[epoch]

    def row_at(index: int) -> list[int]:
        epoch, start = 0, 0
        while index >= start + len(units(epoch)):
            start += len(units(epoch))
            epoch += 1
        return units(epoch)[index - start]

    def get_micro_batches(step: int):
        chosen = [row_at(step * cfg.train.batch_size + row) for row in range(rank * per_rank, (rank + 1) * per_rank)]
        batches = []
        for m in range(0, per_rank, micro):
            group = chosen[m:m + micro]
            if cfg.packing:
                batches.append(packed_batch(examples, group, row_len, pad_id))
            else:
                batches.append(pad_batch([examples[g[0]] for g in group], pad_id))
        return batches

    return get_micro_batches


# ---------------------------------------------------------------------------------------------------------
# The loss


def sft_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the trained (assistant) tokens of the micro-batch."""
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"), attn_mask=batch.get("attn_mask"))
    targets = batch["targets"]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
    return loss, {"n_tokens": int((targets != IGNORE).sum())}


@torch.no_grad()
def example_losses(model, examples, pad_id: int) -> list[float]:
    """Per-example mean loss on trained tokens, one example at a time (the reference packing must match)."""
    out = []
    for ex in examples:
        batch = pad_batch([ex], pad_id)
        out.append(sft_loss(model, batch)[0].item())
    return out


@torch.no_grad()
def validation_loss(model, examples, pad_id: int, batch_size: int = 16) -> float:
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = pad_batch(examples[i:i + batch_size], pad_id)
        logits = model(batch["input_ids"].to(device)).float()
        targets = batch["targets"].to(device)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------------
# LoRA through peft


def add_lora(model, cfg: SFTConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise BadConfigError("--lora needs peft: pip install 'lmforge[hf]'") from None
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=list(cfg.lora_targets), bias="none")
    return get_peft_model(model, config)


def merged_copy(model):
    """The native model with adapters folded into the weights (W + B·A·alpha/r); the original keeps training."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()


def _save(directory, model, *, tokenizer, configs, lineage, trainer_state=None, metrics=None):
    merged = merged_copy(model)
    path = save_checkpoint(directory, merged, tokenizer, configs=configs, lineage=lineage,
                           trainer_state=trainer_state, metrics=metrics)
    if hasattr(model, "save_pretrained"):  # the adapter alone, for peft users
        model.save_pretrained(str(path / "adapter"))
    return path


def _load_adapter(model, directory: Path) -> None:
    """Resume a LoRA run: the frozen base comes from --model, only the adapter weights are restored."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(directory / "adapter" / "adapter_model.safetensors")))


# ---------------------------------------------------------------------------------------------------------
# The run


def parse_columns(pairs: tuple[str, ...]) -> dict[str, str] | None:
    if not pairs:
        return None
    mapping = {}
    for pair in pairs:
        name, sep, column = pair.partition("=")
        if not sep or not name or not column:
            raise BadConfigError(f"--columns: expected field=column, got {pair!r}")
        mapping[name] = column
    return mapping


def sft(cfg: SFTConfig, evaluate: Callable | None = None, lineage: dict | None = None) -> Path:
    """Fine-tune cfg.model on cfg.data; returns OUT/final. `evaluate(model) -> metrics` (e.g. task accuracy)
    is called every eval_every steps beside the validation loss."""
    if not cfg.model or not cfg.data:
        raise BadConfigError("sft needs --model CHECKPOINT and --data FILE")
    rank, world_size = world_info()
    model, tokenizer = load_model(cfg.model)
    if isinstance(model, HFCausalLM):
        raise BadConfigError(f"{cfg.model}: fine-tuning needs an lmforge checkpoint or a Llama-family `transformers` "
                             "model (imported natively); this one can only be evaluated")
    if not tokenizer.has_chat_template:
        raise BadConfigError(f"{Path(cfg.model) / 'tokenizer_config.json'}: no chat_template; chat fine-tuning "
                             "needs one so that `transformers` renders conversations the same way")
    max_len = cfg.max_len or model.cfg.max_seq_len
    if max_len > model.cfg.max_seq_len:
        raise BadConfigError(f"--max-len {max_len} is longer than the model's context ({model.cfg.max_seq_len})")
    columns = parse_columns(cfg.columns)
    examples, stats = load_sft_dataset(cfg.data, tokenizer, max_len, format=cfg.format, columns=columns)
    valid = load_sft_dataset(cfg.valid_data, tokenizer, max_len, format=cfg.format, columns=columns)[0] \
        if cfg.valid_data else []
    if stats.get("dropped_too_long"):
        print(f"sft: dropped {stats['dropped_too_long']} of {stats['read']} examples longer than {max_len} tokens "
              f"(the longest has {stats['longest']})")

    if cfg.lora:
        model = add_lora(model, cfg)
    configs = {"sft": asdict(cfg)}
    lineage = lineage or {"stage": "sft", "parent": str(cfg.model)}
    save = partial(_save, tokenizer=tokenizer, configs=configs, lineage=lineage)

    def evaluate_all(m):
        metrics = {"val_loss": validation_loss(m, valid, tokenizer.pad_id)} if valid else {}
        if evaluate is not None:
            metrics.update(evaluate(m))
        return metrics

    train(model, make_batcher(examples, cfg, max_len, tokenizer.pad_id, rank, world_size), sft_loss, cfg.train,
          cfg.out, save=save, evaluate=evaluate_all, load=_load_adapter if cfg.lora else None)
    return Path(cfg.out) / "final"
