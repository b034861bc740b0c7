"""`lmforge run`: the recipe, stage by stage, on the embedded world, ending in a report.

    runs/NAME/config.toml         the resolved recipe
    runs/NAME/world/              the exported world (corpus, facts)
    runs/NAME/tokenizer/          byte-level BPE trained on the world corpus
    runs/NAME/pretrain/final/     the pretrained checkpoint (and metrics.jsonl beside it)
    runs/NAME/sft/final/          the instruction-tuned checkpoint (world task clusters, chat template)
    runs/NAME/preferences/        SFT samples ranked by the world's oracle (train: noisy; held-out: gold)
    runs/NAME/reward/final/       the reward model (LlamaForSequenceClassification)
    runs/NAME/dpo/final/          the SFT model after DPO on every pair of the ranked samples
    runs/NAME/eval/results.json   perplexity vs a unigram baseline, greedy samples, 4-gram overlap,
                                  accuracy per task cluster: base zero-/few-shot vs SFT zero-shot,
                                  decoding strategies (quality vs diversity), prompting methods on arithmetic,
                                  reward model accuracy and DPO vs SFT, every checkpoint compared, contamination
    runs/NAME/eval/samples_*.jsonl every test prompt, answer and verdict of the task table
    runs/NAME/report.md           everything above for a reader, with the loss curves and charts as pictures
    runs/NAME/report.html         the same, self-contained (pictures embedded)

Each stage records the config it ran with; a stage whose record matches the current config is skipped, so a
stopped run resumes at the first unfinished stage (and pretraining resumes from its last checkpoint).
`--quick` runs every stage at the smallest size, to check the machinery in about a minute.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.data.corpus import read_documents
from lmforge.data.world import export_world
from lmforge.data.world_tasks import score
from lmforge.data.preferences import write_jsonl
from lmforge.data.world_tasks import prompt_text
from lmforge.evaluate.arena import leaderboard
from lmforge.evaluate.contamination import build_ngram_index, contamination
from lmforge.evaluate.decoding import decoding_tradeoffs
from lmforge.evaluate.preferences import (best_of_n_kl, compare_policies, greedy_answers, kl_to_reference,
                                          oracle_battles, reward_model_accuracy)
from lmforge.evaluate.prompting import PromptingConfig, arithmetic_prompting
from lmforge.evaluate.world_tasks import cluster_accuracy, sample_per_cluster
from lmforge.evaluate.perplexity import perplexity, unigram_perplexity
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.pretrain import PretrainConfig, pretrain
from lmforge.train.dpo import DPOConfig, dpo
from lmforge.train.ppo import PPOConfig, ppo
from lmforge.train.rejection import RejectionConfig, best_of_n, rejection_sampling
from lmforge.train.reward import RewardConfig, train_reward
from lmforge.train.sample_preferences import SampleConfig, sample_preferences
from lmforge.train.sft import SFTConfig, sft


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/world"
    """Run directory; rerunning with the same settings skips finished stages."""
    quick: bool = False
    """Smallest sizes everywhere: checks the whole recipe in about a minute, no quality promised."""
    seed: int = 0
    preset: str = "micro"
    vocab_size: int = 1024
    seq_len: int = 256
    pretrain_steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    n_train_docs: int = 9000
    n_samples: int = 60
    """Greedy continuations of world prompts scored for 4-gram overlap (the first 12 are shown)."""
    sft_steps: int = 600
    sft_batch_size: int = 16
    sft_lr: float = 1e-3
    n_eval_per_cluster: int = 40
    """Test records per task cluster scored for the accuracy table."""
    n_decoding_per_cluster: int = 5
    """Test records per cluster decoded by every strategy (greedy, beam, sampling...) for the trade-off table."""
    n_prompting: int = 48
    """Arithmetic test problems (a third each of 1, 2 and 3 steps) asked five ways, base and SFT model."""
    preference_k: int = 4
    """Responses the SFT model samples per training prompt for the preference data."""
    preference_noise: float = 0.1
    """Probability that the oracle flips a comparison (a careless annotator)."""
    n_preference_prompts: int = 0
    """Training prompts for preference data (0: all open-ended and forbidden training prompts)."""
    reward_steps: int = 30
    """Reward model steps of 16 ranked prompts (it fits its training comparisons within ~40)."""
    dpo_steps: int = 60
    dpo_beta: float = 0.5
    """Measured on the world: beta 0.1 at lr 1e-4 for 150 steps moved the policy away from SFT and lost."""
    dpo_lr: float = 5e-5
    ppo_iterations: int = 20
    """PPO rounds of 32 rollouts on the preference training prompts, 2 epochs of minibatches of 16."""
    ppo_kl_coef: float = 0.05
    ppo_lr: float = 3e-5
    rs_n: int = 4
    """Rejection sampling and best-of-n: responses per prompt the reward model chooses among."""
    rs_rounds: int = 2
    rs_steps: int = 60
    """SFT steps of each rejection-sampling round."""
    n_kl_prompts: int = 100
    """Held-out prompts sampled to measure each aligned model's KL to the SFT model."""
    n_heldout_forbidden: int = 120
    """Held-out forbidden requests in the comparison (SFT refuses them all; they guard the leak rate)."""
    n_heldout_prompts: int = 0
    """Held-out prompts in the comparisons after that (0: all, ~440 of them; --quick uses fewer)."""
    progress: bool = True


QUICK = dict(preset="nano", vocab_size=512, seq_len=64, pretrain_steps=150, batch_size=16, n_train_docs=1500,
             n_samples=12, sft_steps=120, sft_batch_size=8, n_eval_per_cluster=4,
             n_decoding_per_cluster=1, n_prompting=6, n_preference_prompts=120, reward_steps=10, dpo_steps=10, ppo_iterations=3,
             rs_rounds=1, rs_steps=3, n_kl_prompts=16, n_heldout_forbidden=20,
             n_heldout_prompts=60)


def resolve(cfg: RunConfig) -> RunConfig:
    return replace(cfg, **QUICK) if cfg.quick else cfg


# ---------------------------------------------------------------------------------------------------------
# Stage bookkeeping: a stage is done when its stamp holds the config it would run with now.


def _stamp_path(stage_dir: Path) -> Path:
    return stage_dir / "stage.json"


def stage_done(stage_dir: Path, config: dict) -> bool:
    stamp = _stamp_path(stage_dir)
    return stamp.is_file() and json.loads(stamp.read_text())["config"] == json.loads(json.dumps(config))


def mark_done(stage_dir: Path, config: dict, seconds: float, **extra) -> None:
    tmp = _stamp_path(stage_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps({"config": config, "seconds": seconds, **extra}, indent=2, default=str))
    tmp.replace(_stamp_path(stage_dir))


def start_stage(stage_dir: Path, config: dict) -> None:
    """Keep a half-finished stage only if it was started with the same config (its checkpoints resume)."""
    started = stage_dir / "stage_started.json"
    if started.is_file() and json.loads(started.read_text()) != json.loads(json.dumps(config)):
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(config, default=str))


def _toml(cfg: RunConfig) -> str:
    lines = ["# resolved recipe of this run (lmforge run)"]
    for k, v in asdict(cfg).items():
        lines.append(f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Measurements the report shows


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def ngram_overlap(continuations: list[str], corpus_texts: list[str], n: int = 4) -> float:
    """Share of the word n-grams in `continuations` that occur somewhere in the corpus: near 1 for a model
    that writes the world's language, near 0 for one that writes noise."""
    known = {g for text in corpus_texts for g in word_ngrams(text, n)}
    grams = [g for text in continuations for g in word_ngrams(text, n)]
    return sum(g in known for g in grams) / len(grams) if grams else 0.0


MAX_SAMPLE_TOKENS = 64


def complete_words(sample: dict) -> str:
    """A continuation cut by the token limit may end inside a word; that fragment is the limit's doing, not
    the model's, so it is left out of the n-gram count."""
    text = sample["continuation"]
    return text if sample["finished"] else text.rsplit(" ", 1)[0]


def sample_prompts(texts: list[str], n: int, n_words: int = 5) -> list[str]:
    """The first words of validation documents, one of each kind in turn (documents alternate kinds)."""
    step = max(1, len(texts) // max(n, 1))
    return [" ".join(texts[i].split()[:n_words]) for i in range(0, step * n, step)][:n]


PREFERENCE_CLUSTERS = ("open_ended", "forbidden")  # no single right answer, or one that must be refused
PREFERENCE_HELD_OUT = 0.8  # of the training split's prompts (the rest is the preference data's)


def preference_prompts(seed: int, n_train: int = 0, n_heldout_forbidden: int = 0, n_heldout: int = 0
                       ) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts) for preference learning, each prompt text once: every entity with
    every seen wording, enumerated from the world. Held out: PREFERENCE_HELD_OUT of the training split's prompts
    (by a hash of the prompt text) and every validation and test prompt. The share is large because the world
    has ~380 open-ended prompts in all, and the DPO comparison needs at least 300 held-out ones on which SFT is
    not already right; the preference data still gets ~70 open-ended prompts, each sampled K times."""
    from lmforge.data.world_tasks import _world, task_records

    world = _world(seed)

    def unique(split: str) -> list[dict]:
        seen: dict[str, dict] = {}
        for r in task_records(world, split, 4000, seed=seed, clusters=PREFERENCE_CLUSTERS):
            seen.setdefault(prompt_text(r), r)
        return list(seen.values())

    def held(record) -> bool:
        return int(hashlib.sha256(prompt_text(record).encode()).hexdigest(), 16) % 100 < 100 * PREFERENCE_HELD_OUT

    train = unique("train")
    heldout = [r for r in train if held(r)] + unique("validation") + unique("test")
    train = [r for r in train if not held(r)]
    if n_heldout_forbidden:  # every open-ended prompt, a sample of the (many, easy) forbidden ones
        forbidden = [r for r in heldout if r["meta"]["forbidden"]]
        keep = {id(r) for r in random.Random(seed).sample(forbidden, min(n_heldout_forbidden, len(forbidden)))}
        heldout = [r for r in heldout if not r["meta"]["forbidden"] or id(r) in keep]
    if n_heldout and n_heldout < len(heldout):
        keep = {id(r) for r in random.Random(seed).sample(heldout, n_heldout)}
        heldout = [r for r in heldout if id(r) in keep]
    if n_train:  # the same share of each cluster
        by_cluster = [[r for r in train if r["meta"]["cluster"] == c] for c in PREFERENCE_CLUSTERS]
        train = [r for group in zip(*by_cluster) for r in group][:n_train]
    return train, heldout


# ---------------------------------------------------------------------------------------------------------
# The run


def run(cfg: RunConfig) -> dict:
    cfg = resolve(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(_toml(cfg))
    timings: dict[str, float] = {}

    # --- world --------------------------------------------------------------------------------------------
    world_dir = out / "world"
    world_cfg = {"seed": cfg.seed, "n_train_docs": cfg.n_train_docs, "n_valid_docs": 300, "tasks": 1}
    t0 = time.perf_counter()
    if not stage_done(world_dir, world_cfg):
        export_world(world_dir, cfg.seed, cfg.n_train_docs, 300)
        mark_done(world_dir, world_cfg, time.perf_counter() - t0)
    timings["world"] = time.perf_counter() - t0
    train_file, valid_file = world_dir / "corpus" / "train.jsonl", world_dir / "corpus" / "valid.jsonl"

    # --- tokenizer ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tok_dir = out / "tokenizer"
    tok_cfg = {"vocab_size": cfg.vocab_size, "world": world_cfg}
    if not stage_done(tok_dir, tok_cfg):
        shutil.rmtree(tok_dir, ignore_errors=True)
        tokenizer = train_tokenizer(read_documents(train_file), cfg.vocab_size)
        tokenizer.save(tok_dir)
        mark_done(tok_dir, tok_cfg, time.perf_counter() - t0)
    timings["tokenizer"] = time.perf_counter() - t0

    # --- pretraining --------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    pre_dir = out / "pretrain"
    pre_cfg = PretrainConfig(
        data=(str(train_file),), valid_data=(str(valid_file),), tokenizer=str(tok_dir), preset=cfg.preset,
        seq_len=cfg.seq_len, out=str(pre_dir),
        train=TrainConfig(steps=cfg.pretrain_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                          warmup_steps=max(1, cfg.pretrain_steps // 10), eval_every=max(1, cfg.pretrain_steps // 4),
                          save_every=max(1, cfg.pretrain_steps // 4), seed=cfg.seed, progress=cfg.progress),
    )
    stage_cfg = {"pretrain": asdict(pre_cfg), "tokenizer": tok_cfg}
    if not stage_done(pre_dir, stage_cfg):
        start_stage(pre_dir, stage_cfg)
        pretrain(pre_cfg, lineage={"stage": "pretrain", "parent": None, "run": str(out)})
        mark_done(pre_dir, stage_cfg, time.perf_counter() - t0)
    timings["pretrain"] = time.perf_counter() - t0

    # --- evaluation: perplexity against a unigram model, greedy samples ----------------------------------
    t0 = time.perf_counter()
    eval_dir = out / "eval"
    eval_dir.mkdir(exist_ok=True)
    model, tokenizer, record = load_checkpoint(pre_dir / "final")
    train_texts = list(read_documents(train_file))
    valid_texts = list(read_documents(valid_file))
    with torch.no_grad():
        model_ppl = perplexity(model, tokenizer, valid_texts)
    unigram_ppl = unigram_perplexity(train_texts, valid_texts, tokenizer)
    prompts = sample_prompts(valid_texts, cfg.n_samples)
    outputs = Engine(model, tokenizer).generate(prompts, SamplingParams(temperature=0, max_new_tokens=MAX_SAMPLE_TOKENS))
    samples = [{"prompt": p, "continuation": o.text, "finished": o.finish_reason == "stop"}
               for p, o in zip(prompts, outputs)]
    overlap = ngram_overlap([complete_words(s) for s in samples], train_texts, n=4)
    results = {
        "perplexity": {"model": model_ppl, "unigram": unigram_ppl,
                       "ratio": model_ppl["perplexity"] / unigram_ppl["perplexity"]},
        "samples": samples, "ngram4_overlap": overlap, "model": str(pre_dir / "final"),
    }
    timings["eval"] = time.perf_counter() - t0

    # --- instruction tuning -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tasks_dir, sft_dir = world_dir / "tasks", out / "sft"
    train_records = read_jsonl(tasks_dir / "train.alpaca.jsonl")
    valid_records = sample_per_cluster(read_jsonl(tasks_dir / "validation.alpaca.jsonl"), 3, cfg.seed)
    sft_cfg = SFTConfig(
        model=str(pre_dir / "final"), data=str(tasks_dir / "train.chat.jsonl"),
        valid_data=str(tasks_dir / "validation.chat.jsonl"), out=str(sft_dir), packing=True,
        train=TrainConfig(steps=cfg.sft_steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                          warmup_steps=max(1, cfg.sft_steps // 20), eval_every=max(1, cfg.sft_steps // 2),
                          save_every=max(1, cfg.sft_steps // 4), seed=cfg.seed, progress=cfg.progress),
    )
    stage_cfg = {"sft": asdict(sft_cfg), "parent": json.loads(json.dumps(asdict(pre_cfg)))}

    def validation_accuracy(model) -> dict:  # handed to the loop: SFT knows nothing of the world's scorer
        acc = cluster_accuracy(model, tokenizer, valid_records, score, "chat", batch_size=8)
        return {"val_accuracy": acc["_all"]["accuracy"]}

    if not stage_done(sft_dir, stage_cfg):
        start_stage(sft_dir, stage_cfg)
        sft(sft_cfg, evaluate=validation_accuracy,
            lineage={"stage": "sft", "parent": str(pre_dir / "final"), "run": str(out)})
        mark_done(sft_dir, stage_cfg, time.perf_counter() - t0)
    timings["sft"] = time.perf_counter() - t0

    # --- task accuracy: base zero-shot and few-shot vs SFT zero-shot -----------------------------------------
    t0 = time.perf_counter()
    test_records = [r for r in read_jsonl(tasks_dir / "test.alpaca.jsonl")
                    if r["meta"].get("template_split", "seen") == "seen"]
    test_records = sample_per_cluster(test_records, cfg.n_eval_per_cluster, cfg.seed)
    sft_model, sft_tokenizer, _ = load_checkpoint(sft_dir / "final")
    results["tasks"] = {
        "base_zero_shot": cluster_accuracy(model, tokenizer, test_records, score, "zero_shot"),
        "base_few_shot": cluster_accuracy(model, tokenizer, test_records, score, "few_shot", train_records,
                                          seed=cfg.seed),
        "sft_zero_shot": cluster_accuracy(sft_model, sft_tokenizer, test_records, score, "chat"),
    }
    timings["task_eval"] = time.perf_counter() - t0

    # --- decoding trade-offs (SFT model) and prompting methods on arithmetic (base and SFT) --------------------
    t0 = time.perf_counter()
    results["decoding"] = decoding_tradeoffs(sft_model, sft_tokenizer,
                                             sample_per_cluster(test_records, cfg.n_decoding_per_cluster, cfg.seed),
                                             score, seed=cfg.seed)
    problems = [r for r in read_jsonl(tasks_dir / "test.alpaca.jsonl") if r["meta"]["cluster"] == "arithmetic"]
    problems = problems[:cfg.n_prompting]  # records cycle through 1, 2 and 3 steps
    solved = [r for r in train_records if r["meta"]["cluster"] == "arithmetic"]
    prompting_cfg = PromptingConfig(seed=cfg.seed)
    results["prompting"] = {
        "base": arithmetic_prompting(model, tokenizer, problems, solved, chat=False, cfg=prompting_cfg),
        "sft": arithmetic_prompting(sft_model, sft_tokenizer, problems, solved, chat=True, cfg=prompting_cfg),
    }
    timings["decoding_prompting"] = time.perf_counter() - t0

    # --- preference learning: SFT samples ranked by the oracle, reward model, DPO, judged by the oracle ------
    t0 = time.perf_counter()
    pref_dir = out / "preferences"
    pref_dir.mkdir(exist_ok=True)
    train_prompts, heldout = preference_prompts(cfg.seed, cfg.n_preference_prompts, cfg.n_heldout_forbidden,
                                                 cfg.n_heldout_prompts)
    write_jsonl(pref_dir / "train_prompts.jsonl", train_prompts)
    write_jsonl(pref_dir / "heldout_prompts.jsonl", heldout)
    sft_final = str(sft_dir / "final")
    answer_tokens = min(96, cfg.seq_len // 2)  # the longest world answers are ~90 tokens; a short context keeps half
    sample_cfgs = {
        "train": SampleConfig(model=sft_final, prompts=str(pref_dir / "train_prompts.jsonl"), out=str(pref_dir / "train"),
                              k=cfg.preference_k, noise=cfg.preference_noise, max_new_tokens=answer_tokens, seed=cfg.seed,
                              progress=cfg.progress),
        # noise-free rankings of held-out prompts: what the reward model's accuracy is measured against
        "heldout": SampleConfig(model=sft_final, prompts=str(pref_dir / "heldout_prompts.jsonl"),
                                out=str(pref_dir / "heldout"), k=cfg.preference_k, noise=0.0, max_new_tokens=answer_tokens,
                                seed=cfg.seed + 1,
                                progress=cfg.progress),
    }
    prompts_hash = hashlib.sha256(json.dumps([prompt_text(r) for r in train_prompts + heldout]).encode()).hexdigest()
    pref_stage = {name: asdict(c) for name, c in sample_cfgs.items()} | {"parent": stage_cfg,  # SFT's stage
                                                                         "prompts": prompts_hash[:16]}
    if not stage_done(pref_dir, pref_stage):
        summaries = {name: sample_preferences(c) for name, c in sample_cfgs.items()}
        mark_done(pref_dir, pref_stage, time.perf_counter() - t0, summaries=summaries)
    timings["preferences"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reward_dir = out / "reward"
    reward_cfg = RewardConfig(model=sft_final, data=str(pref_dir / "train" / "ranked.jsonl"), out=str(reward_dir),
                              train=TrainConfig(steps=cfg.reward_steps, batch_size=16, lr=3e-4,
                                                warmup_steps=max(1, cfg.reward_steps // 10),
                                                eval_every=cfg.reward_steps, seed=cfg.seed, progress=cfg.progress))
    reward_stage = {"reward": asdict(reward_cfg), "parent": pref_stage}
    if not stage_done(reward_dir, reward_stage):
        start_stage(reward_dir, reward_stage)
        train_reward(reward_cfg)
        mark_done(reward_dir, reward_stage, time.perf_counter() - t0)
    timings["reward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    dpo_dir = out / "dpo"
    dpo_cfg = DPOConfig(model=sft_final, data=str(pref_dir / "train" / "ranked.jsonl"), out=str(dpo_dir),  # all pairs
                        beta=cfg.dpo_beta, train=TrainConfig(steps=cfg.dpo_steps, batch_size=16, lr=cfg.dpo_lr,
                                                             warmup_steps=max(1, cfg.dpo_steps // 10),
                                                             eval_every=cfg.dpo_steps, weight_decay=0.0,
                                                             seed=cfg.seed, progress=cfg.progress))
    dpo_stage = {"dpo": asdict(dpo_cfg), "parent": pref_stage}
    if not stage_done(dpo_dir, dpo_stage):
        start_stage(dpo_dir, dpo_stage)
        dpo(dpo_cfg)
        mark_done(dpo_dir, dpo_stage, time.perf_counter() - t0)
    timings["dpo"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ppo_dir = out / "ppo"
    ppo_cfg = PPOConfig(model=sft_final, reward_model=str(reward_dir / "final"),
                        prompts=str(pref_dir / "train_prompts.jsonl"), out=str(ppo_dir),
                        iterations=cfg.ppo_iterations, rollouts=32, epochs=2, kl_coef=cfg.ppo_kl_coef,
                        max_new_tokens=answer_tokens,
                        train=TrainConfig(steps=0, batch_size=16, lr=cfg.ppo_lr, warmup_steps=0, min_lr_ratio=1.0,
                                          weight_decay=0.0, eval_every=10**9, seed=cfg.seed, progress=cfg.progress))
    ppo_stage = {"ppo": asdict(ppo_cfg), "parent": reward_stage}
    if not stage_done(ppo_dir, ppo_stage):
        start_stage(ppo_dir, ppo_stage)
        ppo(ppo_cfg)
        mark_done(ppo_dir, ppo_stage, time.perf_counter() - t0)
    timings["ppo"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rs_dir = out / "rejection"
    rs_cfg = RejectionConfig(model=sft_final, reward_model=str(reward_dir / "final"),
                             prompts=str(pref_dir / "train_prompts.jsonl"), out=str(rs_dir), n=cfg.rs_n,
                             rounds=cfg.rs_rounds, max_new_tokens=answer_tokens, seed=cfg.seed,
                             train=TrainConfig(steps=cfg.rs_steps, batch_size=16, lr=1e-4, warmup_steps=5,
                                               eval_every=10**9, weight_decay=0.0), progress=cfg.progress)
    rs_stage = {"rejection": asdict(rs_cfg), "parent": reward_stage}
    if not stage_done(rs_dir, rs_stage):
        start_stage(rs_dir, rs_stage)
        rejection_sampling(rs_cfg)
        mark_done(rs_dir, rs_stage, time.perf_counter() - t0)
    timings["rejection"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reward_model, _, _ = load_checkpoint(reward_dir / "final", kind="reward_model")
    aligned = {"rs": load_checkpoint(rs_dir / "final")[0], "ppo": load_checkpoint(ppo_dir / "final")[0],
               "dpo": load_checkpoint(dpo_dir / "final")[0]}
    sft_answers = greedy_answers(sft_model, sft_tokenizer, heldout, answer_tokens)
    answers = {name: greedy_answers(model, sft_tokenizer, heldout, answer_tokens) for name, model in aligned.items()}
    t_bon = time.perf_counter()  # best-of-n is inference only: its cost is paid here, at every request
    answers = {"bon": [b["best"] for b in best_of_n(
        sft_model, sft_tokenizer, reward_model, [[{"role": "user", "content": prompt_text(r)}] for r in heldout],
        cfg.rs_n, 1.0, answer_tokens, cfg.seed)], **answers}
    bon_seconds = time.perf_counter() - t_bon
    kl_records = random.Random(cfg.seed).sample(heldout, min(cfg.n_kl_prompts, len(heldout)))
    kl = {"bon": {"kl": best_of_n_kl(cfg.rs_n), "analytic": True},
          **{name: kl_to_reference(model, sft_model, sft_tokenizer, kl_records, answer_tokens, cfg.seed)
             for name, model in aligned.items()}}
    write_jsonl(eval_dir / "answers.jsonl",  # every policy's greedy answer per held-out prompt, for the judge
                [{"prompt": prompt_text(r), "sft": s, **{name: answers[name][i] for name in answers}}
                 for i, (r, s) in enumerate(zip(heldout, sft_answers))])
    results["preferences"] = {
        "data": json.loads((pref_dir / "stage.json").read_text()).get("summaries", {}),
        "reward_model": reward_model_accuracy(reward_model, sft_tokenizer,
                                              read_jsonl(pref_dir / "heldout" / "ranked.jsonl")),
        **{f"{name}_vs_sft": compare_policies(heldout, answers[name], sft_answers, seed=0) for name in answers},
        "kl_to_sft": kl,
        "seconds": {"bon": bon_seconds, **{name: json.loads((stage / "stage.json").read_text())["seconds"]
                                           for name, stage in (("rs", rs_dir), ("ppo", ppo_dir), ("dpo", dpo_dir))}},
        "ppo_iterations": read_jsonl(ppo_dir / "iterations.jsonl"),
        "rs_rounds": read_jsonl(rs_dir / "rounds.jsonl"),
        "examples": [{"prompt": prompt_text(r), "sft": s, **{name: answers[name][i] for name in answers}}
                     for i, (r, s) in enumerate(list(zip(heldout, sft_answers))[:6])],
    }
    # the arena: every checkpoint against every other on the held-out prompts, voted by simulated users
    battles = oracle_battles(heldout, {"sft": sft_answers, **answers}, ["sft", *answers], per_prompt=4,
                             noise=cfg.preference_noise, rng=random.Random(cfg.seed))
    write_jsonl(eval_dir / "arena_battles.jsonl", battles)  # `lmforge arena rate` reads it
    results["preferences"]["arena"] = {"battles": len(battles), "vote_noise": cfg.preference_noise,
                                       "leaderboard": leaderboard(battles, rounds=100, seed=cfg.seed)}
    timings["preference_eval"] = time.perf_counter() - t0

    # --- every checkpoint side by side; the world's test tasks checked for 13-gram overlap with the corpus ------
    t0 = time.perf_counter()
    for name, model in aligned.items():
        results["tasks"][f"{name}_zero_shot"] = cluster_accuracy(model, sft_tokenizer, test_records, score, "chat")
    with torch.no_grad():  # the pretrained model's perplexity is the one measured in the eval stage
        fits = {"pretrain": model_ppl, "sft": perplexity(sft_model, tokenizer, valid_texts),
                **{name: perplexity(model, tokenizer, valid_texts) for name, model in aligned.items()}}
    modes = {"pretrain": "base_zero_shot", "sft": "sft_zero_shot", **{name: f"{name}_zero_shot" for name in aligned}}
    results["checkpoints"] = {
        name: {"perplexity": fits[name], "task_accuracy": results["tasks"][mode]["_all"]["accuracy"]}
        for name, mode in modes.items()}
    index = build_ngram_index(train_texts, n=13)
    by_cluster: dict[str, list[str]] = {}
    for r in test_records:
        by_cluster.setdefault(r["meta"]["cluster"], []).append(prompt_text(r) + " " + r["output"])
    results["contamination"] = {c: {k: v for k, v in contamination(items, index).items() if k != "clean_ids"}
                                for c, items in sorted(by_cluster.items())}
    timings["checkpoints_contamination"] = time.perf_counter() - t0

    for mode, table in results["tasks"].items():  # per-example records beside the summary
        write_jsonl(eval_dir / f"samples_{mode}.jsonl", table.pop("_samples"))
    tmp = eval_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    tmp.replace(eval_dir / "results.json")
    (eval_dir / "timings.json").write_text(json.dumps(timings, indent=2))

    # --- report -------------------------------------------------------------------------------------------
    from lmforge.evaluate.report import write_report

    write_report(out, cfg, results, timings, record)
    print(f"report: {out / 'report.md'}")
    return results
