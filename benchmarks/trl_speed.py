"""DPO and SFT step time: lmforge against TRL's DPOTrainer and SFTTrainer, same model, data and settings.

    python benchmarks/trl_speed.py --preset tiny                                  # CPU
    python benchmarks/trl_speed.py --preset gpt3-small --pairs 8 --length 512     # GPU (bf16 autocast)

One lmforge checkpoint is saved and loaded by both sides (TRL through `transformers`). The data is `--pairs`
chat preference pairs of about `--length` tokens each side (prompt ~1/4, responses the rest), the SFT data the
prompt with its chosen response, assistant tokens only on both sides (TRL: conversational prompt-completion).
Both DPO runs use sigmoid loss, beta 0.1, reference log-probs computed once before training (TRL:
`precompute_ref_log_probs=True`), AdamW, one optimizer step per batch of all pairs, no gradient accumulation,
no packing. A step's time is the time between the starts of two optimizer steps, measured by a callback in TRL
and by the batch function of lmforge's loop, so both include the loop's own bookkeeping; the figure is the
median over the timed steps after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.data.preferences import Pair
from lmforge.model import Transformer, get_preset
from lmforge.tokenizer import train_tokenizer
from lmforge.train.dpo import collate_pairs, encode_pairs, preference_loss, reference_logprobs
from lmforge.train.loop import TrainConfig, train
from lmforge.train.sft import pad_batch, sft_loss

WORDS = ("the cat sat on a mat while rain fell over old towns and rivers near hills where people sold wool "
         "bread salt and honey at markets").split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_pairs(n: int, length: int, tokenizer, seed: int = 0) -> list[Pair]:
    """n pairs whose rendered chosen and rejected sides each come close to `length` tokens."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt_words, response_words = length // 8, length // 3
        prompt = [{"role": "user", "content": text(rng, prompt_words)}]
        pair = Pair(prompt, text(rng, response_words), text(rng, response_words), "benchmark")
        while len(tokenizer.render([*prompt, {"role": "assistant", "content": pair.chosen}])[0]) > length:
            response_words -= 4
            pair = Pair(prompt, text(rng, response_words), text(rng, response_words), "benchmark")
        pairs.append(pair)
    return pairs


class StepClock:
    """Times between the starts of consecutive optimizer steps."""

    def __init__(self):
        self.starts: list[float] = []

    def tick(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def median_step(self, warmup: int) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]
        return statistics.median(gaps)


def lmforge_dpo(directory: Path, pairs: list[Pair], steps: int, out: Path):
    model, tokenizer, _ = load_checkpoint(directory)
    encoded = encode_pairs(pairs, tokenizer)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = reference_logprobs(model.to(device), encoded, tokenizer.pad_id)
    clock, indices = StepClock(), list(range(len(encoded)))

    def batches(step):
        clock.tick()
        return [collate_pairs(encoded, reference, indices, tokenizer.pad_id)]

    cfg = TrainConfig(steps=steps + 1, batch_size=len(encoded), lr=1e-6, warmup_steps=0, weight_decay=0.0,
                      eval_every=10**9, log_every=10**9, progress=False)
    train(model, batches, partial(preference_loss, beta=0.1, kind="sigmoid"), cfg, out, resume=False)
    return clock


def lmforge_sft(directory: Path, pairs: list[Pair], steps: int, out: Path):
    model, tokenizer, _ = load_checkpoint(directory)
    examples = [tokenizer.render([*p.prompt, {"role": "assistant", "content": p.chosen}]) for p in pairs]
    clock = StepClock()

    def batches(step):
        clock.tick()
        return [pad_batch(examples, tokenizer.pad_id)]

    cfg = TrainConfig(steps=steps + 1, batch_size=len(examples), lr=1e-5, warmup_steps=0, weight_decay=0.0,
                      eval_every=10**9, log_every=10**9, progress=False)
    train(model, batches, sft_loss, cfg, out, resume=False)
    return clock


def trl_runs(directory: Path, pairs: list[Pair], steps: int, length: int, out: Path) -> dict:
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    on_gpu = torch.cuda.is_available()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    clocks = {}

    class Clock(transformers.TrainerCallback):
        def __init__(self, clock):
            self.clock = clock

        def on_step_begin(self, args, state, control, **kwargs):
            self.clock.tick()

    common = dict(max_steps=steps + 1, per_device_train_batch_size=len(pairs), gradient_accumulation_steps=1,
                  logging_steps=10**9, save_strategy="no", report_to=[], bf16=on_gpu, use_cpu=not on_gpu,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, dataloader_num_workers=0,
                  seed=0, disable_tqdm=True)
    dpo_data = Dataset.from_list([{"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                                   "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    clocks["dpo"] = StepClock()
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=str(out / "trl_dpo"), learning_rate=1e-6, beta=0.1,
                                                     precompute_ref_log_probs=True, max_length=length + 8, **common),
                         train_dataset=dpo_data, processing_class=tokenizer, callbacks=[Clock(clocks["dpo"])])
    trainer.train()

    sft_data = Dataset.from_list([{"prompt": p.prompt, "completion": [{"role": "assistant", "content": p.chosen}]}
                                  for p in pairs])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    clocks["sft"] = StepClock()
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(out / "trl_sft"), learning_rate=1e-5,
                                                     max_length=length + 8, packing=False, **common),
                         train_dataset=sft_data, processing_class=tokenizer, callbacks=[Clock(clocks["sft"])])
    trainer.train()
    return clocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--length", type=int, default=512, help="tokens per rendered side (prompt + response)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    import transformers
    import trl

    preset = get_preset(args.preset)
    cfg = replace(preset, vocab_size=preset.vocab_size if preset.vocab_size > 1024 else 1024,
                  max_seq_len=max(args.length + 16, preset.max_seq_len))
    tokenizer = train_tokenizer([" ".join(WORDS)] * 50, vocab_size=300)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(tmp / "model", Transformer(cfg), tokenizer)
        pairs = make_pairs(args.pairs, args.length, tokenizer)
        steps = args.warmup + args.steps
        times = {"lmforge_dpo": lmforge_dpo(tmp / "model", pairs, steps, tmp / "dpo").median_step(args.warmup),
                 "lmforge_sft": lmforge_sft(tmp / "model", pairs, steps, tmp / "sft").median_step(args.warmup)}
        clocks = trl_runs(tmp / "model", pairs, steps, args.length, tmp)
        times |= {f"trl_{k}": c.median_step(args.warmup) for k, c in clocks.items()}
    lengths = [len(tokenizer.render([*x.prompt, {"role": "assistant", "content": x.chosen}])[0]) for x in pairs]
    result = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(), "pairs": args.pairs, "tokens_per_side": [min(lengths), max(lengths)],
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "ms_per_step": {k: round(v * 1000, 1) for k, v in times.items()},
        "speedup": {"dpo": times["trl_dpo"] / times["lmforge_dpo"], "sft": times["trl_sft"] / times["lmforge_sft"]},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
