"""Synthetic data: Self-Instruct with the run's SFT model, AlpaGasus curation, and "less but better data".

    lmforge experiment synthetic-data --run runs/world

- **Seeds.** A few human (world-written) tasks per *held-in* cluster; the clusters in `--heldout-clusters` get
  none and measure what the data teaches beyond its own tasks.
- **Instructions** come from the SFT model continuing numbered lists of seed and earlier machine instructions
  (raw text, T 0.7, top-p 0.5, presence penalty 2), through Self-Instruct's filters: length, blacklist, bad
  starts, and ROUGE-L > 0.7 against every seed and kept instruction.
- **Instances.** A 1M-parameter model cannot invent a believable review or biography, so inputs are drawn from
  the world's training records of the task type the instruction belongs to (the cluster of its most similar
  seed, by ROUGE-L): output-first for classification (a label is drawn first, then an input with that label,
  which keeps the labels balanced), input-first otherwise. The output is the SFT model's greedy answer to the
  synthetic instruction and that input, so it can be wrong: the world's scorer says whether it is
  (`gold_correct`), which no curator sees.
- **Curation.** A rater (the SFT model fine-tuned on its own sampled answers to other training records,
  labelled 5 when the world's scorer accepts them and 1 when not) scores every synthetic example 0-5 with
  the compact AlpaGasus prompt; examples at or above `--threshold` are kept; unparseable ratings are counted.
- **Four fresh SFT runs** from the pretrained model, the same steps, batch and learning rate: (a) the seeds
  only, (b) all synthetic data, (c) the curated subset, (d) a random subset of the size of (c). Each is
  measured on the world's test records, held-in and held-out clusters, with 95% intervals, and the paired
  difference (c) - (b) with a bootstrap interval over the same test records.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lmforge.errors import BadConfigError

CLASSIFICATION_CLUSTERS = ("sentiment", "entailment")


@dataclass(frozen=True)
class Config:
    run: str = "runs/world"
    """Run directory (`lmforge run`): its pretrained and SFT models and the world's task records are reused."""
    quick: bool = False
    """A few of everything: checks the machinery, no finding promised."""
    heldout_clusters: tuple[str, ...] = ("translation", "extraction")
    """Clusters with no seed task: their accuracy measures transfer."""
    seeds_per_cluster: int = 4
    n_instructions: int = 150
    """Synthetic instructions to keep (generation stops there, or after --max-rounds)."""
    max_rounds: int = 200
    n_context: int = 4
    """Instructions shown per generation prompt (the world's 256-token models hold about four)."""
    instances_per_instruction: int = 3
    rater_examples: int = 600
    rater_steps: int = 150
    threshold: float = 4.5
    sft_steps: int = 200
    sft_batch_size: int = 16
    sft_lr: float = 1e-3
    n_eval_per_cluster: int = 40
    seed: int = 0
    progress: bool = True


QUICK = dict(seeds_per_cluster=2, n_instructions=8, max_rounds=12, instances_per_instruction=2, rater_examples=24,
             rater_steps=3, sft_steps=3, sft_batch_size=4, n_eval_per_cluster=2)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def choose_seeds(train: list[dict], clusters: list[str], per_cluster: int, rng: random.Random) -> list[dict]:
    """`per_cluster` training records of each cluster, with distinct instructions where the cluster has them."""
    seeds = []
    for cluster in clusters:
        pool = [r for r in train if r["meta"]["cluster"] == cluster]
        rng.shuffle(pool)
        distinct = list({r["instruction"]: r for r in pool}.values())
        seeds += (distinct + [r for r in pool if r not in distinct])[:per_cluster]
    return seeds


# ---------------------------------------------------------------------------------------------------------
# Step 1: instructions from the SFT model, filtered


def generate_instructions(complete_fn, seed_instructions: list[str], cfg: Config, rng: random.Random,
                          progress: bool) -> tuple[list[dict], Counter]:
    """Kept instructions ({instruction, most_similar, rouge_l}) and the funnel of every candidate's fate."""
    from tqdm import tqdm

    from lmforge.apps.self_instruct import (InstructionPool, filter_instruction, instruction_prompt,
                                            parse_instructions)
    from lmforge.infer.sampling import SamplingParams

    pool, kept, funnel = InstructionPool(seed_instructions), [], Counter()
    params = SamplingParams(temperature=0.7, top_p=0.5, presence_penalty=2.0, max_new_tokens=64, stop=("\n\n",),
                            seed=cfg.seed)
    bar = tqdm(total=cfg.n_instructions, desc="synthetic instructions", disable=not progress)
    for round_ in range(cfg.max_rounds):
        prompts = [instruction_prompt(seed_instructions, [k["instruction"] for k in kept], rng, cfg.n_context,
                                      n_machine=min(2, cfg.n_context // 2)) for _ in range(8)]
        for text, finish in complete_fn(prompts, replace(params, seed=cfg.seed + 1000 * round_)):
            for candidate in parse_instructions(text):
                funnel["generated"] += 1
                reason = "truncated" if finish == "length" else filter_instruction(candidate)
                if reason is None:
                    nearest, similarity = pool.most_similar(candidate)
                    reason = "similar" if similarity > 0.7 else None
                if reason is None and len(kept) >= cfg.n_instructions:
                    reason = "surplus"
                if reason:
                    funnel[reason] += 1
                    continue
                funnel["kept"] += 1
                kept.append({"instruction": candidate, "most_similar": nearest, "rouge_l": similarity})
                pool.add(candidate)
                bar.update(1)
        if len(kept) >= cfg.n_instructions:
            break
    bar.close()
    return kept, funnel


# ---------------------------------------------------------------------------------------------------------
# Step 2: instances, with world inputs and the SFT model's outputs


def task_type(instruction: str, seeds: list[dict]) -> str:
    """The cluster of the seed whose instruction is most similar (ROUGE-L) to this one."""
    from lmforge.apps.self_instruct import rouge_l

    return max(seeds, key=lambda s: rouge_l(instruction, s["instruction"]))["meta"]["cluster"]


def draw_inputs(cluster: str, train: list[dict], k: int, rng: random.Random) -> list[dict]:
    """k source records of the cluster: for classification a label first, then a record with that label."""
    pool = [r for r in train if r["meta"]["cluster"] == cluster]
    if cluster not in CLASSIFICATION_CLUSTERS:
        return rng.sample(pool, min(k, len(pool)))
    labels = sorted({str(r["meta"]["answer"]) for r in pool})
    chosen = []
    for _ in range(k):
        label = rng.choice(labels)
        chosen.append(rng.choice([r for r in pool if str(r["meta"]["answer"]) == label]))
    return chosen


def synthetic_examples(model, tokenizer, instructions: list[dict], seeds: list[dict], train: list[dict],
                       cfg: Config, rng: random.Random) -> tuple[list[dict], Counter]:
    """Alpaca records {instruction, input, output, meta} with the SFT model's answers, the instance filters
    applied; meta keeps the source record's task metadata and whether the world's scorer accepts the output."""
    from lmforge.apps.self_instruct import clean_instances
    from lmforge.data.world_tasks import score
    from lmforge.evaluate.preferences import greedy_answers

    jobs = []
    for item in instructions:
        cluster = task_type(item["instruction"], seeds)
        for source in draw_inputs(cluster, train, cfg.instances_per_instruction, rng):
            jobs.append((item, cluster, source))
    asked = [{**source, "instruction": item["instruction"]} for item, _, source in jobs]
    answers = greedy_answers(model, tokenizer, asked, min(96, model.cfg.max_seq_len // 2)) if asked else []
    records, fates, seen = [], Counter(), set()
    for (item, cluster, source), answer in zip(jobs, answers):
        pairs, counts = clean_instances([(source["input"], answer)], was_truncated=False)
        fates.update(counts)
        key = (item["instruction"], source["input"])
        if not pairs or key in seen:
            fates["dropped" if not pairs else "duplicate"] += 1
            continue
        seen.add(key)
        records.append({"instruction": item["instruction"], "input": source["input"], "output": answer,
                        "meta": {**source["meta"], "cluster": cluster, "source_instruction": source["instruction"],
                                 "gold_correct": bool(score(source, answer)["correct"])}})
    return records, fates


# ---------------------------------------------------------------------------------------------------------
# Step 3: the rater and curation


def rater_examples(model, tokenizer, train: list[dict], n: int, seed: int) -> list[dict]:
    """The SFT model's sampled answers to training records, as chat examples of the compact rating prompt
    answered "5" (the world's scorer accepts the answer) or "1" (it does not)."""
    from lmforge.apps.curate import compact_rating_prompt
    from lmforge.data.world_tasks import score
    from lmforge.train.sample_preferences import sample_responses
    from lmforge.data.world_tasks import prompt_text

    records = random.Random(seed).sample(train, min(n, len(train)))
    prompts = [[{"role": "user", "content": prompt_text(r)}] for r in records]
    responses = sample_responses(model, tokenizer, prompts, k=1, temperature=1.0, top_p=1.0,
                                 max_new_tokens=min(96, model.cfg.max_seq_len // 2), seed=seed)
    examples = []
    for record, (answer,) in zip(records, responses):
        rating = "5" if score(record, answer)["correct"] else "1"
        examples.append({"messages": [
            {"role": "user", "content": compact_rating_prompt(record["instruction"], record["input"], answer)},
            {"role": "assistant", "content": rating}]})
    return examples


def train_sft(start: Path, data: list[dict], out: Path, steps: int, batch_size: int, lr: float, cfg: Config) -> float:
    """Fine-tune `start` on `data` into `out`; returns the wall time in seconds."""
    from lmforge.train.loop import TrainConfig
    from lmforge.train.sft import SFTConfig, sft

    _write_jsonl(out / "data.jsonl", data)
    t0 = time.perf_counter()
    sft(SFTConfig(model=str(start), data=str(out / "data.jsonl"), out=str(out),
                  train=TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                                    eval_every=10**9, seed=cfg.seed, progress=cfg.progress)))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# Step 4: four SFT runs and their accuracy


def accuracy_with_interval(correct: list[bool], seed: int) -> dict:
    from lmforge.evaluate.judge import bootstrap_interval

    low, high = bootstrap_interval([float(c) for c in correct], seed=seed)
    return {"accuracy": sum(correct) / max(len(correct), 1), "interval": [low, high], "n": len(correct)}


def run(cfg: Config) -> dict:
    from lmforge.apps.curate import compact_rating_prompt, curate
    from lmforge.apps.self_instruct import model_complete_fn
    from lmforge.checkpoint import load_checkpoint
    from lmforge.data.world_tasks import score
    from lmforge.evaluate.judge import bootstrap_interval, model_reply_fn
    from lmforge.evaluate.world_tasks import cluster_accuracy, sample_per_cluster
    from lmforge.experiments import save_results

    cfg = replace(cfg, **QUICK) if cfg.quick else cfg
    run_dir = Path(cfg.run)
    base_dir, sft_dir = run_dir / "pretrain" / "final", run_dir / "sft" / "final"
    tasks_dir = run_dir / "world" / "tasks"
    for path in (base_dir, sft_dir, tasks_dir / "train.alpaca.jsonl", tasks_dir / "test.alpaca.jsonl"):
        if not path.exists():
            raise BadConfigError(f"{path}: missing; run `lmforge run --out {run_dir}` first")
    train = [r for r in _read_jsonl(tasks_dir / "train.alpaca.jsonl") if r["meta"]["form"] == "instruction"]
    test = _read_jsonl(tasks_dir / "test.alpaca.jsonl")
    clusters = sorted({r["meta"]["cluster"] for r in train})
    unknown = [c for c in cfg.heldout_clusters if c not in clusters]
    if unknown:
        raise BadConfigError(f"--heldout-clusters: {', '.join(unknown)} not among the world's clusters "
                             f"({', '.join(clusters)})")
    held_in = [c for c in clusters if c not in cfg.heldout_clusters]
    work = run_dir / "experiments" / "synthetic_data"
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    seconds: dict[str, float] = {}

    # --- seeds and synthetic instructions ---------------------------------------------------------------
    t0 = time.perf_counter()
    seeds = choose_seeds(train, held_in, cfg.seeds_per_cluster, rng)
    sft_model, tokenizer, _ = load_checkpoint(sft_dir)
    sft_model.eval()
    complete_fn = model_complete_fn(sft_model, tokenizer)
    instructions, funnel = generate_instructions(complete_fn, [s["instruction"] for s in seeds], cfg, rng,
                                                 cfg.progress)
    synthetic, instance_fates = synthetic_examples(sft_model, tokenizer, instructions, seeds, train, cfg, rng)
    if not synthetic:
        raise BadConfigError(f"no synthetic example survived the filters ({dict(funnel)}); try more --max-rounds")
    _write_jsonl(work / "synthetic.jsonl", synthetic)
    seconds["generate"] = time.perf_counter() - t0

    # --- the rater, then curation -------------------------------------------------------------------------
    t0 = time.perf_counter()
    used = {(r["input"]) for r in synthetic}
    rater_pool = [r for r in train if r["input"] not in used and r["meta"]["cluster"] in held_in]
    examples = rater_examples(sft_model, tokenizer, rater_pool, cfg.rater_examples, cfg.seed)
    train_sft(sft_dir, examples, work / "rater", cfg.rater_steps, 16, 3e-4, cfg)
    rater, _, _ = load_checkpoint(work / "rater" / "final")
    curated, summary = curate(model_reply_fn(rater.eval(), tokenizer, max_new_tokens=4), synthetic, cfg.threshold,
                              compact_rating_prompt)
    gold_all = [r["meta"]["gold_correct"] for r in synthetic]
    gold_kept = [r["meta"]["gold_correct"] for r in curated]
    rater_labels = Counter(e["messages"][1]["content"] for e in examples)
    seconds["curate"] = time.perf_counter() - t0

    # --- four SFT runs with one budget ----------------------------------------------------------------------
    strip = lambda rows: [{k: r[k] for k in ("instruction", "input", "output")} for r in rows]
    random_subset = random.Random(cfg.seed + 1).sample(synthetic, len(curated))
    variants = {"seeds": strip(seeds), "all": strip(synthetic), "curated": strip(curated),
                "random": strip(random_subset)}
    eval_records = sample_per_cluster(test, cfg.n_eval_per_cluster, cfg.seed)
    results_by_variant, correct_by_variant = {}, {}
    for name, data in variants.items():
        if not data:
            results_by_variant[name] = {"examples": 0}
            continue
        train_seconds = train_sft(base_dir, data, work / name, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_lr, cfg)
        model, _, _ = load_checkpoint(work / name / "final")
        table = cluster_accuracy(model.eval(), tokenizer, eval_records, score, "chat")
        samples = table.pop("_samples")
        correct_by_variant[name] = [s["correct"] for s in samples]
        held = [s["correct"] for s in samples if s["cluster"] in held_in]
        out = [s["correct"] for s in samples if s["cluster"] not in held_in]
        results_by_variant[name] = {
            "examples": len(data), "train_seconds": train_seconds,
            "held_in": accuracy_with_interval(held, cfg.seed), "held_out": accuracy_with_interval(out, cfg.seed),
            "clusters": {c: v["accuracy"] for c, v in table.items() if not c.startswith("_")}}
    clusters_of = [r["meta"]["cluster"] for r in eval_records]
    comparison = {}
    if "curated" in correct_by_variant and "all" in correct_by_variant:
        for part, keep in (("held_in", lambda c: c in held_in), ("held_out", lambda c: c not in held_in)):
            diff = [float(a) - float(b) for a, b, c in zip(correct_by_variant["curated"], correct_by_variant["all"],
                                                           clusters_of) if keep(c)]
            low, high = bootstrap_interval(diff, seed=cfg.seed)
            comparison[part] = {"difference": sum(diff) / max(len(diff), 1), "interval": [low, high],
                                "n": len(diff)}
    seconds["sft_and_eval"] = sum(v.get("train_seconds", 0.0) for v in results_by_variant.values())

    held_in_cmp = comparison.get("held_in", {"interval": [0.0, 0.0]})
    results = {
        "config": asdict(cfg), "held_in_clusters": held_in, "seeds": len(seeds),
        "instruction_funnel": dict(funnel), "instance_fates": dict(instance_fates),
        "truncated_prompts": complete_fn.truncated,
        "synthetic": len(synthetic), "examples_of_synthetic": synthetic[:6],
        "synthetic_task_types": dict(Counter(r["meta"]["cluster"] for r in synthetic)),
        "rater": {"examples": len(examples), "labels": dict(rater_labels)},
        "curation": summary,
        "gold_correct": {"all": sum(gold_all) / len(gold_all),
                         "curated": sum(gold_kept) / len(gold_kept) if gold_kept else None,
                         "dropped": (sum(gold_all) - sum(gold_kept)) / max(len(gold_all) - len(gold_kept), 1)},
        "variants": results_by_variant, "curated_minus_all": comparison,
        "finding": {"curated_beats_all_held_in": held_in_cmp["interval"][0] > 0,
                    "all_beats_curated_held_in": held_in_cmp["interval"][1] < 0},
        "seconds": seconds,
    }
    save_results(run_dir, "synthetic-data", results)
    return results


# ---------------------------------------------------------------------------------------------------------
# Report section


def _acc(block: dict) -> str:
    low, high = block["interval"]
    return f"{100 * block['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] (n={block['n']})"


def section(results: dict, run_dir: Path) -> list[str]:
    cfg, funnel, cur = results["config"], results["instruction_funnel"], results["curation"]
    gold = results["gold_correct"]
    lines = [
        "## Experiment: synthetic instructions (Self-Instruct) and curation (AlpaGasus)", "",
        f"{results['seeds']} world-written seed tasks from the held-in clusters ({', '.join(results['held_in_clusters'])}); "
        f"held out: {', '.join(cfg['heldout_clusters'])}. The SFT model continued numbered instruction lists: "
        + ", ".join(f"{k} {v}" for k, v in funnel.items())
        + f". {results['synthetic']} synthetic examples (world inputs, the SFT model's answers), typed by their nearest "
        "seed as " + ", ".join(f"{k} {v}" for k, v in results.get("synthetic_task_types", {}).items())
        + f"; the world's scorer accepts {100 * gold['all']:.1f}% of their outputs.", "",
        f"Curation: a rater trained on {results['rater']['examples']} of the SFT model's own answers labelled by the "
        f"world's scorer ({results['rater']['labels']}) scored every example; {cur['kept']} kept at >= {cur['threshold']:g}, "
        f"{cur['dropped']} dropped, {cur['unparseable']} unparseable. Outputs the scorer accepts: "
        + (f"{100 * gold['curated']:.1f}% of the kept" if gold["curated"] is not None else "none kept")
        + f", {100 * gold['dropped']:.1f}% of the dropped.", "",
        f"Four fresh SFT runs from the pretrained model, {cfg['sft_steps']} steps of {cfg['sft_batch_size']} each "
        "(the same budget), scored on the world's test records (95% bootstrap intervals):", "",
        "| data | examples | held-in accuracy | held-out accuracy | training time |", "|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        if not v.get("examples"):
            lines.append(f"| {name} | 0 | — | — | — |")
            continue
        lines.append(f"| {name} | {v['examples']} | {_acc(v['held_in'])} | {_acc(v['held_out'])} | "
                     f"{v['train_seconds']:.0f} s |")
    named = [n for n, v in results["variants"].items() if v.get("examples")]
    if named:
        clusters = list(results["variants"][named[0]]["clusters"])
        lines += ["", "Per cluster (held-out clusters marked *):", "",
                  "| data | " + " | ".join(c + ("" if c in results["held_in_clusters"] else "*") for c in clusters) + " |",
                  "|---" * (len(clusters) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(f"{100 * results['variants'][n]['clusters'][c]:.0f}%" for c in clusters)
                  + " |" for n in named]
        missing = [c for c in results["held_in_clusters"] if c not in results.get("synthetic_task_types", {c: 1})]
        if missing:
            lines += ["", f"No synthetic example was typed as {', '.join(missing)}, so the synthetic variants never "
                      "saw such a task; the seeds did."]
    cmp_ = results["curated_minus_all"]
    if cmp_:
        h, o = cmp_["held_in"], cmp_["held_out"]
        verdict = ("Curated data beats all data held-in at the same budget" if results["finding"]["curated_beats_all_held_in"]
                   else "All data beats curated data held-in at the same budget"
                   if results["finding"]["all_beats_curated_held_in"]
                   else "Curated and all data do not differ measurably held-in at the same budget")
        lines += ["", f"{verdict}: curated - all = {100 * h['difference']:+.1f} points "
                  f"[{100 * h['interval'][0]:+.1f}, {100 * h['interval'][1]:+.1f}] held-in, "
                  f"{100 * o['difference']:+.1f} points [{100 * o['interval'][0]:+.1f}, {100 * o['interval'][1]:+.1f}] "
                  "held-out (paired over the same test records). The curated set is smaller, so each of its examples "
                  "is seen more often within the budget."]
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items()) + ".", ""]
    return lines
