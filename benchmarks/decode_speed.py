"""Decode speed: lmforge's `Engine.generate` vs `transformers`' `generate` on the same model, side by side.

One random-weight lmforge `Transformer` is built from a preset and copied into a `transformers`
`LlamaForCausalLM` in memory (`to_hf_config` / `to_hf_state_dict`); their logits must agree to 1e-4 (fp32)
before anything is timed. Both then decode greedily from the same random prompts (all of one length, so
`transformers` needs no padding) for exactly `--new-tokens` tokens: lmforge with `ignore_eos=True`,
`transformers` with no EOS id at all, so neither can stop early and neither pays for a stopping rule the other
skips. The figure is generated tokens per second of a whole `generate` call (prefill included), the median
over `--repeats` calls; the systems take turns, the order flipped each repeat, so machine drift hits all alike.
lmforge's figure includes what its engine does at every step and `generate` does not: a logprob per token
and the incremental text.

    python benchmarks/decode_speed.py                                   # CPU, micro, batch 1 and 32
    python benchmarks/decode_speed.py --device cuda --dtype bfloat16 --preset gpt3-small

`transformers` runs with its dynamic cache, and on CUDA also with its static cache (`cache_implementation=
"static"`, which it compiles on its own). The last column is lmforge's tokens/s over each system's; the
"same tokens" column is the share of generated tokens equal to lmforge's (random weights have near-tied
logits, so a few flips, mostly in bf16, are expected and do not change the work done).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import replace

import torch

from lmforge.checkpoint import to_hf_config, to_hf_state_dict
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer, get_preset
from lmforge.tokenizer import train_tokenizer


def synthetic_tokenizer(vocab_size: int):
    """A BPE of exactly `vocab_size` tokens trained on random words (a few seconds for 50k): the engine decodes
    its text every step, so it needs a real tokenizer that covers every id the model can emit."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
             for _ in range(max(3000, vocab_size // 2))]
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(max(400, vocab_size // 5))]
    tokenizer = train_tokenizer(texts, vocab_size)
    assert tokenizer.vocab_size == vocab_size, tokenizer.vocab_size
    return tokenizer


def cpu_name() -> str:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="micro")
    p.add_argument("--vocab-size", type=int, default=0, help="0: the preset's (tiny presets: 1024)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed generate calls per system and batch size")
    args = p.parse_args()
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    preset = get_preset(args.preset)
    vocab = args.vocab_size or (preset.vocab_size if preset.vocab_size > 1024 else 1024)
    cfg = replace(preset, vocab_size=vocab, max_seq_len=max(preset.max_seq_len, args.prompt_len + args.new_tokens))

    # --- the same weights in both implementations, checked in fp32 -----------------------------------------
    tokenizer = synthetic_tokenizer(cfg.vocab_size)
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    hf_config = transformers.LlamaConfig(**to_hf_config(cfg, None), attn_implementation="sdpa")
    theirs = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = theirs.load_state_dict(to_hf_state_dict(ours), strict=False)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    # No EOS: generate runs to max_new_tokens without an EOS check (None here is not overridden by defaults).
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = tokenizer.pad_id
    probe = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(probe) - theirs(input_ids=probe).logits).abs().max().item()
    assert diff < 1e-4, f"logits differ by {diff}"
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)

    # --- the systems --------------------------------------------------------------------------------------
    def run_lmforge(prompts: torch.Tensor) -> list[list[int]]:
        engine = Engine(ours, tokenizer, max_batch_size=len(prompts))
        params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
        return [o.token_ids for o in engine.generate(prompts.tolist(), params)]

    def run_transformers(cache: str):
        def run(prompts: torch.Tensor) -> list[list[int]]:
            x = prompts.to(device)
            with torch.no_grad():
                out = theirs.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                      max_new_tokens=args.new_tokens, cache_implementation=cache)
            assert out.shape[1] == x.shape[1] + args.new_tokens
            return out[:, x.shape[1]:].tolist()
        return run

    systems = {"lmforge": run_lmforge, "transformers (dynamic cache)": run_transformers("dynamic")}
    if device.type == "cuda":
        systems["transformers (static cache)"] = run_transformers("static")

    def timed(run, prompts):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = run(prompts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, tokens

    # --- warm up (allocator; compilation and CUDA graphs of the static cache), then alternate A B C, C B A, ...
    rows = []
    for batch in batch_sizes:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), generator=g)
        tokens = {name: [timed(run, prompts) for _ in range(2)][-1][1] for name, run in systems.items()}
        seconds: dict[str, list[float]] = {name: [] for name in systems}
        names = list(systems)
        for i in range(args.repeats):
            for name in (names if i % 2 == 0 else names[::-1]):
                seconds[name].append(timed(systems[name], prompts)[0])
        rate = {name: batch * args.new_tokens / statistics.median(s) for name, s in seconds.items()}
        for name in systems:
            same = sum(a == b for x, y in zip(tokens[name], tokens["lmforge"]) for a, b in zip(x, y))
            rows.append(f"| {batch} | {name} | {rate[name]:,.0f} | {rate['lmforge'] / rate[name]:.2f} | "
                        f"{same / (batch * args.new_tokens):.0%} |")

    # --- report, ready to paste into benchmarks/RESULTS.md ------------------------------------------------
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(f"command: `{' '.join(['python', *map(shlex.quote, sys.argv)])}`")
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"machine: {platform.platform()}, {device_name}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, Python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"model: preset {args.preset}, vocab {cfg.vocab_size}, {args.dtype} on {args.device}; prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; median of {args.repeats}; "
          f"logits max |diff| {diff:.1e}")
    print()
    print("| batch | system | new tokens/s | lmforge / system | same tokens |")
    print("|---:|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
