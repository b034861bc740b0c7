"""A tiny training run driven by the loop, for tests that need a separate process (SIGKILL, torchrun).

    python tests/train_script.py OUT [--steps N] [--save-every K] [--kill-at-step S]
                                     [--crash-in FUNCTION --crash-call N] [--dump-grads FILE] [--nan-at-step S]

Data is synthetic and stateless: the batch of step s is drawn from a generator seeded with (seed, s), and
each rank takes its rows of the global batch, as the real data modules do.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge import checkpoint  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402
from lmforge.train.loop import TrainConfig, micro_batch_count, train, world_info  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--kill-at-step", type=int, default=-1)
    p.add_argument("--crash-in", default="")
    p.add_argument("--crash-call", type=int, default=1)
    p.add_argument("--nan-at-step", type=int, default=-1)
    p.add_argument("--dump-grads", default="")
    args = p.parse_args()
    torch.set_num_threads(1)

    tokenizer = train_tokenizer(["hello world, the cat sat on the mat 123"] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_seq_len=32))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                      lr=1e-2, warmup_steps=3, save_every=args.save_every, keep_checkpoints=3, log_every=1,
                      eval_every=1000, progress=False)
    rank, world_size = world_info()
    micro, n_micro = micro_batch_count(cfg, world_size)
    per_rank = micro * n_micro

    def get_micro_batches(step: int):
        if step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        g = torch.Generator().manual_seed(1000 + step)
        data = torch.randint(0, tokenizer.vocab_size, (cfg.batch_size, 17), generator=g)
        data = data[rank * per_rank:(rank + 1) * per_rank]
        return [(data[i:i + micro, :-1], data[i:i + micro, 1:]) for i in range(0, per_rank, micro)]

    def loss_fn(m, batch):
        x, y = batch
        loss = F.cross_entropy(m(x).view(-1, tokenizer.vocab_size), y.reshape(-1))
        if loop_state["step_calls"] // n_micro == args.nan_at_step:
            loss = loss * float("nan")
        loop_state["step_calls"] += 1
        return loss, {}

    loop_state = {"step_calls": 0}
    if args.crash_in:
        # SIGKILL ourselves inside the N-th call of one of the functions a checkpoint write goes through.
        module, name = {"save_file": (checkpoint, "save_file"), "torch.save": (torch, "save"),
                        "_write_json": (checkpoint, "_write_json"), "os.replace": (os, "replace"),
                        "_fsync_tree": (checkpoint, "_fsync_tree")}[args.crash_in]
        original, calls = getattr(module, name), {"n": 0}

        def crashing(*a, **k):
            calls["n"] += 1
            if calls["n"] == args.crash_call:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **k)

        setattr(module, name, crashing)

    if args.dump_grads:
        original_clip = torch.nn.utils.clip_grad_norm_

        def recording_clip(params, max_norm):
            params = list(params)
            if not getattr(recording_clip, "done", False) and rank == 0:
                torch.save([q.grad.clone() for q in params], args.dump_grads)
                recording_clip.done = True
            return original_clip(params, max_norm)

        torch.nn.utils.clip_grad_norm_ = recording_clip

    save = partial(checkpoint.save_checkpoint, tokenizer=tokenizer, configs={"test": True})
    train(model, get_micro_batches, loss_fn, cfg, args.out, save=save)


if __name__ == "__main__":
    main()
