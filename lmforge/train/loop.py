"""The one optimization loop. Every training method (pretraining, SFT, reward model, DPO, PPO's updates) is a
loss function handed to `train`; none has a loop of its own.

    loss_fn(model, batch) -> (loss, metrics)      the method
    get_micro_batches(step) -> [batch, ...]       this rank's micro-batches of optimizer step `step`

What the loop does, in order, each step: set the learning rate (linear warmup, then cosine decay to
`min_lr_ratio * lr`), run the micro-batches (forward under bf16 autocast on CUDA, fp32 on CPU; backward of
loss / n_micro so the accumulated gradient is that of the mean), stop on a non-finite loss or gradient, clip
the gradient norm, take an AdamW step, log, evaluate, checkpoint.

Exact resume. Batches are a function of the step number alone (the data modules build them from a generator
seeded by (seed, step)), so the data position *is* the step. A checkpoint holds the weights (safetensors) and
`trainer_state.pt`: optimizer moments, step, and the RNG states of torch, numpy and Python. Resuming loads
all of them and repeats nothing, so the per-step losses are bitwise those of an uninterrupted run on CPU.

Data parallelism. Under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, NCCL on GPU), gradients are averaged across ranks, and only rank 0 logs and writes checkpoints. For the
largest presets, wrap with FSDP instead of DDP in `_wrap_distributed` (fully_shard per Block, then the root):
the rest of the loop is unchanged, but checkpoints must then be gathered with `get_model_state_dict`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lmforge.errors import BadConfigError, MismatchError, UserError


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per optimizer step, across all ranks and micro-steps."""
    micro_batch_size: int = 0
    """Sequences per forward pass on one rank; 0 means batch_size / world size (no accumulation)."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    eval_every: int = 100
    save_every: int = 0
    """Write a resumable checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    """torch.compile the model (GPU speed; slow to start on CPU)."""
    device: str = "auto"
    """auto: CUDA when available, else CPU."""
    progress: bool = True


class NonFiniteError(UserError):
    """The loss or gradient stopped being a finite number (usually a learning rate that is too high)."""


# ---------------------------------------------------------------------------------------------------------
# Pieces used by the loop (and tested on their own)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms' gains and embeddings' rows toward 0 hurts
    (GPT-2/3 practice). Fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def world_info() -> tuple[int, int]:
    """(rank, world_size), initialising the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world_size


def micro_batch_count(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, gradient accumulation steps) for this many ranks."""
    if cfg.batch_size % world_size:
        raise BadConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world_size} ranks")
    per_rank = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise BadConfigError(f"batch_size per rank ({per_rank}) is not divisible by micro_batch_size ({micro})")
    return micro, per_rank // micro


def example_batches(n_examples: int, cfg: TrainConfig, rank: int, world_size: int,
                    collate: Callable[[list[int]], dict]) -> Callable[[int], list]:
    """get_micro_batches(step) for methods whose batch is a set of examples (reward model, DPO): step s takes
    the next `batch_size` indices of a seeded permutation per epoch, this rank its slice, `collate` makes each
    micro-batch. A function of the step alone, so resume is exact."""
    micro, n_micro = micro_batch_count(cfg, world_size)
    per_rank = micro * n_micro

    orders: dict[int, np.ndarray] = {}

    def index(position: int) -> int:
        epoch, offset = divmod(position, n_examples)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(n_examples)
        return int(orders[epoch][offset])

    def get_micro_batches(step: int) -> list:
        first = step * cfg.batch_size + rank * per_rank
        chosen = [index(first + i) for i in range(per_rank)]
        return [collate(chosen[m:m + micro]) for m in range(0, per_rank, micro)]

    return get_micro_batches


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints written by the loop: out_dir/checkpoints/step_000100/ (model files + trainer_state.pt)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete step checkpoint. Half-written ones live in hidden temp directories and are never
    candidates; a directory without its trainer state is skipped."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.glob("step_*") if (p / "trainer_state.pt").is_file() and (p / "lmforge.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def _prune_checkpoints(out_dir: Path, keep: int) -> None:
    root = out_dir / "checkpoints"
    steps = sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".step_*"):  # left by a crash in the middle of a write
        shutil.rmtree(tmp, ignore_errors=True)


def _load_weights(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import load_file

    state = {k.removeprefix("model."): v for k, v in load_file(str(directory / "model.safetensors")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # a tied head is not saved
    if missing or unexpected:
        raise MismatchError(f"{directory}: weights do not fit the model being trained "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, forget what the stopped run logged after the checkpoint it resumes from."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= upto_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# The loop


# Settings that may change between a run and its resumption without changing its numbers.
_FREE_ON_RESUME = {"progress", "device", "compile", "eval_every", "log_every", "save_every", "keep_checkpoints"}

SaveFn = Callable[..., Path]  # save(directory, model, trainer_state=None, metrics=None) -> directory


def train(
    model: torch.nn.Module,
    get_micro_batches: Callable[[int], list],
    loss_fn: Callable,
    cfg: TrainConfig,
    out_dir: str | Path,
    save: SaveFn | None = None,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    flops_per_token: float = 0.0,
    resume: bool = True,
    load: Callable[[torch.nn.Module, Path], None] | None = None,
) -> dict:
    """Train `model` in place for `cfg.steps` optimizer steps and return the last logged metrics.

    `save(directory, model, trainer_state=..., metrics=...)` writes a checkpoint (the method knows the
    tokenizer and the configs); `evaluate(model) -> metrics` runs on rank 0 every `eval_every` steps;
    `flops_per_token` turns tokens/s into MFU on CUDA; `load(model, checkpoint_dir)` restores weights on
    resume when the trained model is not the saved one (LoRA adapters), default: the checkpoint's weights.
    """
    out_dir = Path(out_dir)
    rank, world_size = world_info()
    is_main = rank == 0
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    micro_size, n_micro = micro_batch_count(cfg, world_size)
    model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    metrics_path = out_dir / "metrics.jsonl"

    # --- resume -----------------------------------------------------------------------------------------
    start_step = 0
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
        changed = sorted(k for k, v in asdict(cfg).items()
                         if k not in _FREE_ON_RESUME and state["config"].get(k) != v)
        if changed:
            raise MismatchError(f"{checkpoint}: was trained with other settings ({', '.join(changed)}); "
                                "resume with the same ones, or use a new output directory")
        (load or _load_weights)(model, checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        if is_main:
            _rewrite_metrics(metrics_path, start_step)
    elif is_main and resume is False and metrics_path.exists():
        metrics_path.unlink()

    trained = model
    if cfg.compile:
        trained = torch.compile(model)
    if world_size > 1:
        trained = _wrap_distributed(trained, device)

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    peak_flops = 989e12 if device.type == "cuda" else 0.0  # H100 SXM dense bf16 (DESIGN §6)

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(metrics_path, "a") if is_main else None
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (is_main and cfg.progress), desc="train",
               dynamic_ncols=True)
    last: dict = {}
    tokens_since, time_since = 0, time.perf_counter()

    def write_checkpoint(step: int, directory: Path, metrics: dict) -> None:
        if save is None:
            return
        trainer_state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                         "config": asdict(cfg)}
        save(directory, model, trainer_state=trainer_state, metrics=metrics)

    try:
        for step in range(start_step, cfg.steps):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()

            # --- forward and backward over the micro-batches ---------------------------------------------
            step_metrics: dict[str, float] = {}
            loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per micro-step
            batches = get_micro_batches(step)
            if len(batches) != n_micro:
                raise BadConfigError(f"step {step}: got {len(batches)} micro-batches, expected {n_micro}")
            for micro_step, batch in enumerate(batches):
                sync = micro_step == n_micro - 1
                with (contextlib.nullcontext() if sync or world_size == 1 else trained.no_sync()):
                    with autocast:
                        loss, metrics = loss_fn(trained, _to_device(batch, device))
                    (loss / n_micro).backward()
                loss_sum += loss.detach().float() / n_micro
                for k, v in metrics.items():
                    if k == "n_tokens":
                        continue
                    step_metrics[k] = step_metrics.get(k, 0.0) + float(v) / n_micro
                tokens_since += int(metrics.get("n_tokens", _count_tokens(batch)))

            # --- stop before a bad update can reach the weights ------------------------------------------
            step_metrics["loss"] = loss_sum.item()
            if world_size > 1:
                step_metrics = _mean_across_ranks(step_metrics, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            if not math.isfinite(step_metrics["loss"]) or not torch.isfinite(grad_norm):
                what = "loss" if not math.isfinite(step_metrics["loss"]) else "gradient norm"
                raise NonFiniteError(
                    f"step {step + 1}: the {what} is not finite; stopped"
                    + (f" (last good checkpoint: {latest_checkpoint(out_dir)})" if latest_checkpoint(out_dir) else "")
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # --- log, evaluate, checkpoint ---------------------------------------------------------------
            done = step + 1
            row = {"step": done, "lr": lr, "grad_norm": grad_norm.item(), **step_metrics}
            if done % cfg.log_every == 0 or done == cfg.steps or done == start_step + 1:
                elapsed = time.perf_counter() - time_since
                row["tokens_per_s"] = tokens_since * world_size / max(elapsed, 1e-9)
                if peak_flops and flops_per_token:
                    row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak_flops * world_size)
                tokens_since, time_since = 0, time.perf_counter()
            if evaluate is not None and is_main and (done % cfg.eval_every == 0 or done == cfg.steps):
                model.eval()
                with torch.no_grad(), autocast:
                    row.update(evaluate(model))
            if is_main:
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "tokens_per_s", "mfu", "val_loss") if k in row})
            last = row
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                if is_main:
                    write_checkpoint(done, out_dir / "checkpoints" / f"step_{done:06d}", row)
                    _prune_checkpoints(out_dir, cfg.keep_checkpoints)
                if world_size > 1:
                    dist.barrier()
        if is_main:
            write_checkpoint(cfg.steps, out_dir / "final", last)
    finally:
        bar.close()
        if log_file:
            log_file.close()
    return last


def _wrap_distributed(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _mean_across_ranks(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _count_tokens(batch) -> int:
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"].numel()
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    return 0
