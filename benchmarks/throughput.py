"""Training throughput: lmforge's model vs `transformers`' LlamaForCausalLM of the same shape, side by side.

Both start from the same weights (the lmforge model is saved as a checkpoint and loaded by `transformers`),
train on the same random batches with the same AdamW settings, under bf16 autocast on CUDA and fp32 on CPU.
Single steps alternate between the two so that machine noise hits both alike; the figure is the median step.

    python benchmarks/throughput.py --preset micro --seq-len 128 --batch-size 16          # CPU
    python benchmarks/throughput.py --preset gpt3-small --seq-len 1024 --batch-size 16 --compile   # GPU

Prints tokens/s for each, their ratio (lmforge / transformers), and MFU on CUDA (DESIGN §6: 6N + 12·L·d·T
FLOPs per token against 989 TFLOP/s dense bf16 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from lmforge.checkpoint import save_checkpoint
from lmforge.model import Transformer, flops_per_token, get_preset
from lmforge.tokenizer import train_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="micro")
    p.add_argument("--vocab-size", type=int, default=0, help="0: the preset's (tiny presets: 1024)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = get_preset(args.preset)
    vocab = args.vocab_size or (preset.vocab_size if preset.vocab_size > 1024 else 1024)
    cfg = replace(preset, vocab_size=vocab, max_seq_len=max(args.seq_len, preset.max_seq_len))

    # --- the same weights in both implementations ----------------------------------------------------------
    tokenizer = train_tokenizer(["benchmark text"] * 10, vocab_size=300)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, ours, tokenizer)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa")
    models = {"lmforge": ours.to(device).train(), "transformers": theirs.to(device).train()}
    forward = {
        "lmforge": lambda m, x: m(x),
        "transformers": lambda m, x: m(input_ids=x, use_cache=False).logits,
    }
    if args.compile:
        models = {k: torch.compile(m) for k, m in models.items()}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda") for k, m in models.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=g) for _ in range(2)]
    batches = [b.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else b for b in batches]

    def train_steps(name: str, n: int) -> tuple[float, list[float]]:
        model, opt, losses = models[name], optimizers[name], []
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(n):
            b = batches[i % len(batches)]
            with autocast:
                logits = forward[name](model, b[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, vocab), b[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, [x.item() for x in losses]

    # --- warm up (compilation, allocator), then alternate single steps A B B A ... and take the median -----
    # This machine's speed drifts by several percent over seconds; timing one step of each in turn, with the
    # order flipped every time, puts the drift on both sides alike.
    first = {name: train_steps(name, 2)[1] for name in models}
    step_seconds: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(args.rounds * args.steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            step_seconds[name].append(train_steps(name, 1)[0])
    rates = {name: args.batch_size * args.seq_len / statistics.median(v) for name, v in step_seconds.items()}

    result = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "seq_len": args.seq_len, "batch_size": args.batch_size,
        "compile": args.compile, "torch": torch.__version__, "transformers": transformers.__version__,
        "first_step_loss": {k: v[0] for k, v in first.items()},
        "steps_timed": args.rounds * args.steps, "tokens_per_s": rates,
    }
    result["ratio_lmforge_over_transformers"] = result["tokens_per_s"]["lmforge"] / result["tokens_per_s"]["transformers"]
    if device.type == "cuda":
        fpt = flops_per_token(cfg, args.seq_len)
        result["mfu"] = {k: v * fpt / 989e12 for k, v in result["tokens_per_s"].items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
