"""`lmforge experiment emergence`: in-context learning and chain of thought, measured against model size.

The lecture's claim: past some scale a model suddenly shows abilities it did not have, such as in-context
learning (doing a new task from a description and a few solved examples; GPT-3, Brown et al. 2020) and
step-by-step reasoning (chain-of-thought prompting pays only from about 100B parameters; Wei et al. 2022).

For each size of the scaling sweep (`lmforge experiment scaling`), pretrained for the same budget and with
its checkpoint reused when the sweep has made it, base models only (never instruction-tuned):

- **in-context learning**: the world's task clusters asked zero-shot and k-shot in the corpus's dialogue layout
  (`evaluate/world_tasks.py`), answers generated greedily and judged strictly by the world's scorer; and, for
  the clusters with a fixed label set (sentiment, entailment), the label the model ranks first by
  log-likelihood after the same prompt (GPT-3's way to score classification). The ranked measure needs no
  exact stop after the answer, so it shows a partial ability the strict one counts as zero; and the expected
  answer's loss in nats per token, a continuous score that moves before any answer is exactly right. Whether
  an ability "emerges" depends on the metric as well as on the model (Schaeffer et al. 2023);
- **chain of thought**: the world's arithmetic problems of 1-3 steps asked few-shot with bare answers and
  few-shot with worked steps (`evaluate/prompting.py`; zero-shot, zero-shot CoT and self-consistency are
  measured too), overall and by number of steps.

Every accuracy has a 95% Wilson score interval with its n; a difference of two accuracies has Newcombe's
interval (built from the two Wilson intervals, treating the two measurements as independent: conservative,
since they share their items). Curves are drawn against N (non-embedding parameters) and C = 6·N·D.

    lmforge experiment emergence --run runs/world            # after `lmforge experiment scaling`, or alone
    lmforge experiment emergence --run runs/world --device cuda --sizes micro tiny small 384x8 512x8 --steps 2000 \\
        --batch-size 32 --data runs/world-big/corpus/train.jsonl --valid-data runs/world-big/corpus/valid.jsonl \\
        --tokenizer runs/world/tokenizer                    # the GPU sweep's models (see `experiment scaling`)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lmforge.checkpoint import load_checkpoint
from lmforge.data.world_tasks import ENTAILMENT_LABELS, all_clusters, score
from lmforge.errors import BadConfigError, BadFileError
from lmforge.evaluate.prompting import PromptingConfig, arithmetic_prompting
from lmforge.evaluate.world_tasks import cluster_accuracy, prompts_for, sample_per_cluster
from lmforge.experiments import save_results, scaling
from lmforge.infer.scoring import loglikelihood_tokens
from lmforge.train.loop import pick_device


@dataclass(frozen=True)
class Config:
    run: str = "runs/world"
    """Run directory (`lmforge run`): its world corpus, tokenizer and task files; results go to RUN/experiments/."""
    quick: bool = False
    """The scaling sweep's quick sizes and a few records: checks the machinery in well under a minute."""
    sizes: tuple[str, ...] = scaling.Config.sizes
    """Model sizes, at least 3: preset names or shapes DxL, as in `lmforge experiment scaling`."""
    steps: int = max(scaling.Config.steps)
    """Pretraining steps of every size; the scaling sweep's longest budget, so its checkpoints are reused."""
    batch_size: int = 16
    seq_len: int = 0
    """Training window; 0: the run's pretraining window. Batch, window, learning rate and seed must match the
    scaling sweep's for its checkpoints to be reused."""
    lr: float = 3e-3
    seed: int = 0
    data: tuple[str, ...] = ()
    """Pretraining text instead of the run's world corpus, as in `experiment scaling` (e.g. a larger export of the
    same world, whose tasks these are)."""
    valid_data: tuple[str, ...] = ()
    tokenizer: str = ""
    """Tokenizer directory for --data; default: a byte-level BPE of --vocab-size trained on --data."""
    vocab_size: int = 1024
    clusters: tuple[str, ...] = ("sentiment", "entailment", "closed_book_qa", "translation", "extraction")
    """World task clusters for in-context learning (arithmetic is the chain-of-thought part)."""
    n_per_cluster: int = 100
    """Records per cluster, from the validation and test splits (the base models were tuned on none)."""
    k: int = 3
    """Solved examples in a few-shot prompt (from the training split, same cluster)."""
    n_arithmetic: int = 99
    """Arithmetic problems (validation and test splits; they cycle through 1, 2 and 3 steps)."""
    device: str = "auto"
    progress: bool = True


QUICK = dict(sizes=scaling.QUICK["sizes"], steps=max(scaling.QUICK["steps"]), n_per_cluster=4, n_arithmetic=6)
# Clusters whose answer is one of a fixed set of labels: these can also be scored by ranking the labels.
LABELS = {"sentiment": ("positive", "negative"), "entailment": ENTAILMENT_LABELS}
Z95 = 1.959964


def resolve(cfg: Config) -> Config:
    return replace(cfg, **QUICK) if cfg.quick else cfg


# ---------------------------------------------------------------------------------------------------------
# Intervals


def wilson(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, where the normal one is not)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside, despite rounding


def difference_interval(a: dict, b: dict) -> tuple[float, float]:
    """95% interval of accuracy a minus accuracy b (Newcombe's hybrid score interval, method 10)."""
    pa, pb = a["correct"] / max(a["n"], 1), b["correct"] / max(b["n"], 1)
    (la, ua), (lb, ub) = wilson(a["correct"], a["n"]), wilson(b["correct"], b["n"])
    d = pa - pb
    return d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2), d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2)


def tally(correct: int, n: int) -> dict:
    low, high = wilson(correct, n)
    return {"correct": int(correct), "n": int(n), "accuracy": correct / n if n else 0.0, "low": low, "high": high}


# ---------------------------------------------------------------------------------------------------------
# Measurements of one model


def answer_likelihoods(model, tokenizer, records: list[dict], prompts: list[list[int]]) -> dict:
    """Two likelihood measures on the same prompts, one forward pass per (prompt, continuation):

    - "ranked": {cluster: tally} for the label clusters, correct when the right label (" positive", " it is not
      possible to tell") has the highest summed log-likelihood as the prompt's continuation (lm-eval's acc);
    - "answer_loss": {cluster: {"mean", "low", "high", "n"}}, the expected answer's loss in nats per token
      (normal 95% interval over records): a continuous score of how well the prompt has taught the answer's
      form and content, which moves before any answer is exactly right.
    """
    pairs, owners = [], []
    for i, (record, prompt) in enumerate(zip(records, prompts)):
        pairs.append((prompt, tokenizer.encode(" " + record["output"])))
        owners.append((i, None))
        for label in LABELS.get(record["meta"]["cluster"], ()):
            pairs.append((prompt, tokenizer.encode(" " + label)))
            owners.append((i, label))
    scores = loglikelihood_tokens(model, pairs, tokenizer.pad_id) if pairs else []
    best: dict[int, tuple[float, str]] = {}
    losses: dict[str, list[float]] = {}
    for (i, label), (logp, _), (_, continuation) in zip(owners, scores, pairs):
        cluster = records[i]["meta"]["cluster"]
        if label is None:
            losses.setdefault(cluster, []).append(-logp / len(continuation))
        elif i not in best or logp > best[i][0]:
            best[i] = (logp, label)
    counts: dict[str, list[int]] = {}
    for i, (_, label) in best.items():
        tally_of = counts.setdefault(records[i]["meta"]["cluster"], [0, 0])
        tally_of[0] += label == records[i]["meta"]["answer"]
        tally_of[1] += 1
    ranked = {c: tally(*counts[c]) for c in sorted(counts)}
    if counts:
        ranked["_all"] = tally(sum(v[0] for v in counts.values()), sum(v[1] for v in counts.values()))
        ranked["_all"]["chance"] = sum(v[1] / len(LABELS[c]) for c, v in counts.items()) / ranked["_all"]["n"]
    losses["_all"] = [x for c in sorted(losses) for x in losses[c]]
    return {"ranked": ranked, "answer_loss": {c: mean_interval(v) for c, v in losses.items()}}


def mean_interval(values: list[float]) -> dict:
    n = len(values)
    mean = float(np.mean(values)) if n else float("nan")
    half = Z95 * float(np.std(values, ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def in_context(model, tokenizer, records, train_records, k: int, seed: int) -> dict:
    """{mode: {"generated": {cluster: tally}, "ranked": {cluster: tally}, "answer_loss": {...}}} for zero-shot
    and k-shot."""
    result = {}
    for mode in ("zero_shot", "few_shot"):
        table = cluster_accuracy(model, tokenizer, records, score, mode, train_records, k=k, seed=seed)
        generated = {c: tally(round(v["accuracy"] * v["n"]), v["n"]) | {"lenient": v["lenient_accuracy"]}
                     for c, v in table.items() if c not in ("_examples", "_samples")}
        prompts = prompts_for(records, tokenizer, mode, train_records, k, seed)  # the prompts cluster_accuracy built
        result[mode] = {"generated": generated, **answer_likelihoods(model, tokenizer, records, prompts),
                        "example": table["_samples"][0] if table["_samples"] else None}
    return result


def chain_of_thought(model, tokenizer, problems, solved, seed: int) -> dict:
    """{method: {"all": tally, "by_steps": {steps: tally}}} for the five prompting methods on arithmetic."""
    measured = arithmetic_prompting(model, tokenizer, problems, solved, chat=False, cfg=PromptingConfig(seed=seed))
    n_by_steps: dict[int, int] = {}
    for p in problems:
        n_by_steps[p["meta"]["steps"]] = n_by_steps.get(p["meta"]["steps"], 0) + 1
    return {method: {"all": tally(round(m["accuracy"] * m["n"]), m["n"]),
                     "by_steps": {str(s): tally(round(m["by_steps"][s] * n_by_steps[s]), n_by_steps[s])
                                  for s in sorted(n_by_steps)},
                     "example": m["example"]}
            for method, m in measured.items()}


# ---------------------------------------------------------------------------------------------------------
# The experiment


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise BadFileError(f"{path}: missing; the run directory needs the world's task files (`lmforge run`)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check(cfg: Config) -> None:
    if len(cfg.sizes) < 3:
        raise BadConfigError(f"--sizes: {len(cfg.sizes)} given; a curve against size needs at least 3")
    unknown = [c for c in cfg.clusters if c not in all_clusters() or c == "arithmetic"]
    if unknown or not cfg.clusters:
        raise BadConfigError(f"--clusters: {unknown or 'none given'}; choose from "
                             f"{', '.join(c for c in all_clusters() if c != 'arithmetic')}")
    for name in ("steps", "batch_size", "n_per_cluster", "k", "n_arithmetic"):
        if getattr(cfg, name) < 1:
            raise BadConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for size in cfg.sizes:
        scaling.model_config(size, 1024, cfg.seq_len or 256)


def run(cfg: Config) -> dict:
    cfg = resolve(cfg)
    check(cfg)
    start = time.perf_counter()
    run_dir = Path(cfg.run)
    name, tokenizer, corpus = scaling.open_corpus(run_dir, cfg.data, cfg.valid_data, tokenizer_dir=cfg.tokenizer,
                                                  vocab_size=cfg.vocab_size, seed=cfg.seed)
    seq_len = cfg.seq_len or scaling.run_seq_len(run_dir)
    sizes = scaling.ordered_sizes(cfg.sizes, tokenizer.vocab_size, seq_len)

    tasks = run_dir / "world" / "tasks"
    held = read_jsonl(tasks / "validation.alpaca.jsonl") + read_jsonl(tasks / "test.alpaca.jsonl")
    train_records = read_jsonl(tasks / "train.alpaca.jsonl")
    records = sample_per_cluster([r for r in held if r["meta"]["cluster"] in cfg.clusters], cfg.n_per_cluster, cfg.seed)
    problems = [r for r in held if r["meta"]["cluster"] == "arithmetic"][:cfg.n_arithmetic]
    solved = [r for r in train_records if r["meta"]["cluster"] == "arithmetic"]

    measured = []
    for size, n in sizes:
        point = scaling.train_point(scaling.point_dir(run_dir, name, size, cfg.steps), corpus, tokenizer, size,
                                    cfg.steps, cfg.batch_size, seq_len, cfg.lr, cfg.seed, cfg.device, cfg.progress)
        model, _, _ = load_checkpoint(point["checkpoint"], device=pick_device(cfg.device))
        model.eval()
        t0 = time.perf_counter()
        row = {key: point[key] for key in ("size", "params", "tokens", "compute", "val_loss", "reused")}
        row["in_context"] = in_context(model, tokenizer, records, train_records, cfg.k, cfg.seed)
        row["chain_of_thought"] = chain_of_thought(model, tokenizer, problems, solved, cfg.seed)
        row["eval_seconds"] = time.perf_counter() - t0
        measured.append(row)
        icl, cot = row["in_context"], row["chain_of_thought"]
        print(f"emergence: {size} ({n:,} parameters): generated zero/few-shot "
              f"{icl['zero_shot']['generated']['_all']['accuracy']:.0%}/{icl['few_shot']['generated']['_all']['accuracy']:.0%}, "
              f"arithmetic few-shot/CoT {cot['few_shot']['all']['accuracy']:.0%}/{cot['few_shot_cot']['all']['accuracy']:.0%}"
              f" ({row['eval_seconds']:.0f} s)", flush=True)

    results = {"config": asdict(cfg), "corpus": name, "seq_len": seq_len, "clusters": list(cfg.clusters),
               "n_records": len(records), "n_problems": len(problems), "sizes": measured,
               "seconds": time.perf_counter() - start}
    results["claims"] = claims(measured)
    plot_emergence(results, run_dir / "experiments" / "emergence.png")
    save_results(cfg.run, "emergence", results)
    return results


# ---------------------------------------------------------------------------------------------------------
# What the curves say


def gap(rows: list[dict], better, worse) -> list[dict]:
    """Per size: accuracy difference better - worse with its interval; better/worse pick a tally from a row."""
    out = []
    for row in rows:
        a, b = better(row), worse(row)
        low, high = difference_interval(a, b)
        out.append({"size": row["size"], "params": row["params"], "difference": a["accuracy"] - b["accuracy"],
                    "low": low, "high": high})
    return out


def loss_gap(rows: list[dict]) -> list[dict]:
    """Per size: zero-shot answer loss minus few-shot answer loss (positive: the examples taught the answer),
    with a normal 95% interval treating the two means as independent."""
    out = []
    for row in rows:
        zero, few = (row["in_context"][mode]["answer_loss"]["_all"] for mode in ("zero_shot", "few_shot"))
        half = math.hypot(zero["high"] - zero["mean"], few["high"] - few["mean"])
        difference = zero["mean"] - few["mean"]
        out.append({"size": row["size"], "params": row["params"], "difference": difference,
                    "low": difference - half, "high": difference + half})
    return out


def trend(gaps: list[dict], target: float | None = 0.2) -> dict:
    """Least-squares slope of the gap per decade of N, and the N at which that line would reach `target`
    (a naive extrapolation: emergence is, by definition, what such a line does not foresee)."""
    x = np.log10([g["params"] for g in gaps])
    y = np.array([g["difference"] for g in gaps])
    slope, intercept = np.polyfit(x, y, 1) if len(set(x)) > 1 else (0.0, float(y.mean()))
    reach = 10 ** ((target - intercept) / slope) if target is not None and slope > 1e-9 else None
    return {"slope_per_decade": float(slope), "target": target, "params_at_target": reach}


def claims(rows: list[dict]) -> dict:
    def pick(mode, measure):
        return lambda row: row["in_context"][mode][measure]["_all"]

    def method(name, steps=None):
        def choose(row):
            measured = row["chain_of_thought"][name]
            return measured["all"] if steps is None else measured["by_steps"].get(steps, tally(0, 0))
        return choose

    out = {"icl_generated": gap(rows, pick("few_shot", "generated"), pick("zero_shot", "generated")),
           "cot": gap(rows, method("few_shot_cot"), method("few_shot")),
           "cot_3_steps": gap(rows, method("few_shot_cot", "3"), method("few_shot", "3"))}
    if rows and rows[0]["in_context"]["few_shot"]["ranked"]:
        out["icl_ranked"] = gap(rows, pick("few_shot", "ranked"), pick("zero_shot", "ranked"))
    out["icl_answer_loss"] = loss_gap(rows)
    for name in list(out):
        out[name] = {"by_size": out[name], "significant": [g["size"] for g in out[name] if g["low"] > 0],
                     "trend": trend(out[name], None if name == "icl_answer_loss" else 0.2)}
    return out


# ---------------------------------------------------------------------------------------------------------
# The report section


def plot_emergence(results: dict, picture: Path) -> None:
    """Against N (top row) and C = 6·N·D (bottom row), with 95% intervals: in-context learning as accuracy,
    in-context learning as the expected answer's loss, and chain of thought on arithmetic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = results["sizes"]
    has_ranked = bool(rows[0]["in_context"]["few_shot"]["ranked"])
    icl_lines = [("zero-shot, generated", "zero_shot", "generated", "o-", "tab:blue"),
                 ("few-shot, generated", "few_shot", "generated", "s-", "tab:orange")]
    if has_ranked:
        icl_lines += [("zero-shot, ranked labels", "zero_shot", "ranked", "o--", "tab:cyan"),
                      ("few-shot, ranked labels", "few_shot", "ranked", "s--", "tab:red")]
    cot_lines = [("chain_of_thought", "zero_shot", "all", "^:", "tab:gray", "zero-shot"),
                 ("chain_of_thought", "few_shot", "all", "o-", "tab:blue", "few-shot"),
                 ("chain_of_thought", "few_shot_cot", "all", "s-", "tab:green", "few-shot chain of thought")]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8), dpi=110)
    for r, (axis_key, axis_label) in enumerate((("params", "non-embedding parameters N"),
                                                 ("compute", "training compute C = 6·N·D (FLOPs)"))):
        x = np.array([row[axis_key] for row in rows], dtype=float)

        def draw(ax, values, low, high, style, color, label, series: int):
            values = np.array(values)
            # Series sit a few percent apart along x, so equal values (all zero, say) do not hide each other.
            ax.errorbar(x * 1.05 ** series, values, yerr=[np.maximum(values - low, 0), np.maximum(np.array(high) - values, 0)],
                        fmt=style, color=color, capsize=3, label=label)

        for series, (label, mode, measure, style, color) in enumerate(icl_lines):
            t = [row["in_context"][mode][measure]["_all"] for row in rows]
            draw(axes[r, 0], [v["accuracy"] for v in t], [v["low"] for v in t], [v["high"] for v in t], style,
                 color, label, series)
        if has_ranked:
            axes[r, 0].axhline(rows[0]["in_context"]["few_shot"]["ranked"]["_all"]["chance"], color="tab:red",
                               lw=0.8, ls=":", label="chance (ranked labels)")
        for series, (mode, style, color) in enumerate((("zero_shot", "o-", "tab:blue"), ("few_shot", "s-", "tab:orange"))):
            t = [row["in_context"][mode]["answer_loss"]["_all"] for row in rows]
            draw(axes[r, 1], [v["mean"] for v in t], [v["low"] for v in t], [v["high"] for v in t], style, color,
                 mode.replace("_", "-"), series)
        for series, (part, name, key, style, color, label) in enumerate(cot_lines):
            t = [row[part][name][key] for row in rows]
            draw(axes[r, 2], [v["accuracy"] for v in t], [v["low"] for v in t], [v["high"] for v in t], style,
                 color, label, series)
        titles = ("in-context learning: accuracy", "in-context learning: expected answer's loss",
                  "chain of thought: arithmetic, 1-3 steps")
        for c, title in enumerate(titles):
            ax = axes[r, c]
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            if c != 1:
                ax.set_ylim(-0.02, 1.02)
            ax.set(xlabel=axis_label, title=title,
                   ylabel="nats per answer token (95% interval)" if c == 1 else "accuracy (95% Wilson interval)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    from lmforge.evaluate.report import save_figure

    save_figure(fig, picture)


def cell(t: dict) -> str:
    return f"{t['accuracy']:.0%} [{t['low']:.0%}, {t['high']:.0%}]"


def verdict(claim: dict, what: str, percent: bool = True) -> str:
    def number(x: float) -> str:
        return f"{x:+.0%}" if percent else f"{x:+.2f}"

    last, significant, t = claim["by_size"][-1], claim["significant"], claim["trend"]
    line = (f"{what}: at the largest size {number(last['difference'])} [{number(last['low'])}, "
            f"{number(last['high'])}]; "
            + (f"above zero (interval excludes it) at {', '.join(f'`{s}`' for s in significant)}" if significant else
               "the interval reaches zero or below at every size")
            + f"; the difference changes by {number(t['slope_per_decade'])}"
            + ("" if percent else " nats/token") + " per decade of N")
    if t["params_at_target"] and last["difference"] < t["target"]:
        line += (f", a line that would reach {number(t['target'])} near N = {t['params_at_target']:.1e} (a naive "
                 "extrapolation: an emergent ability is one that such a line misses)")
    return line + "."


def section(results: dict, run_dir: Path) -> list[str]:
    picture = run_dir / "experiments" / "emergence.png"
    if not picture.is_file():
        plot_emergence(results, picture)
    rows, cfg, claims_ = results["sizes"], results["config"], results["claims"]
    has_ranked = "icl_ranked" in claims_
    ranked_all = rows[0]["in_context"]["few_shot"]["ranked"].get("_all", {})
    reused = sum(r["reused"] for r in rows)
    lines = [
        "## Emergence: in-context learning and chain of thought against model size",
        "",
        f"Base models of {len(rows)} sizes, each pretrained for {rows[0]['tokens']:,} tokens of the "
        f"`{results['corpus']}` corpus "
        f"({reused} of {len(rows)} checkpoints reused from the scaling sweep), never instruction-tuned. In-context "
        f"learning: {results['n_records']} validation and test records of {', '.join(results['clusters'])}, asked "
        f"zero-shot and {cfg['k']}-shot in the corpus's dialogue layout: *generated* = greedy answer judged "
        f"strictly by the world's scorer; *ranked* = the label with the highest log-likelihood, on the "
        f"{ranked_all.get('n', 0)} sentiment and entailment records (chance {ranked_all.get('chance', 0):.0%}); "
        "*answer loss* = the expected answer's loss in nats per token (lower is better). Chain of thought: "
        f"{results['n_problems']} arithmetic problems of 1-3 steps, 2 solved exemplars with bare answers "
        "(few-shot) or worked steps (CoT), greedy. Brackets: 95% intervals (Wilson for accuracies). "
        f"{results['seconds'] / 60:.1f} min{' (quick mode: a few records, no conclusion)' if cfg['quick'] else ''}.",
        "",
        "| size | N | C (FLOPs) | generated, zero-shot | generated, few-shot |"
        + (" ranked, zero-shot | ranked, few-shot |" if has_ranked else "")
        + " answer loss, zero-shot | answer loss, few-shot |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|" if has_ranked else "") + "---:|---:|",
    ]
    for r in rows:
        icl = r["in_context"]
        cells = [cell(icl["zero_shot"]["generated"]["_all"]), cell(icl["few_shot"]["generated"]["_all"])]
        if has_ranked:
            cells += [cell(icl["zero_shot"]["ranked"]["_all"]), cell(icl["few_shot"]["ranked"]["_all"])]
        cells += [f"{v['mean']:.2f} [{v['low']:.2f}, {v['high']:.2f}]"
                  for v in (icl[mode]["answer_loss"]["_all"] for mode in ("zero_shot", "few_shot"))]
        lines.append(f"| {r['size']} | {r['params']:,} | {r['compute']:.2g} | " + " | ".join(cells) + " |")
    clusters = results["clusters"]
    lines += ["", "By cluster, zero-shot → few-shot: generated accuracy (answer loss) "
              f"(n = {rows[0]['in_context']['few_shot']['generated'][clusters[0]]['n']} per cluster):", "",
              "| size | " + " | ".join(c.replace("_", " ") for c in clusters) + " |", "|---|" + "---:|" * len(clusters)]
    for r in rows:
        g = r["in_context"]
        lines.append(f"| {r['size']} | " + " | ".join(
            f"{g['zero_shot']['generated'][c]['accuracy']:.0%} → {g['few_shot']['generated'][c]['accuracy']:.0%} "
            f"({g['zero_shot']['answer_loss'][c]['mean']:.2f} → {g['few_shot']['answer_loss'][c]['mean']:.2f})"
            for c in clusters) + " |")
    lines += ["", "| size | zero-shot | few-shot | few-shot CoT | CoT - few-shot | few-shot by steps 1 / 2 / 3 | "
              "CoT by steps 1 / 2 / 3 |", "|---|---:|---:|---:|---:|---|---|"]
    for r, g in zip(rows, claims_["cot"]["by_size"]):
        cot = r["chain_of_thought"]
        steps = sorted(cot["few_shot"]["by_steps"])
        lines.append(f"| {r['size']} | {cell(cot['zero_shot']['all'])} | {cell(cot['few_shot']['all'])} | "
                     f"{cell(cot['few_shot_cot']['all'])} | {g['difference']:+.0%} [{g['low']:+.0%}, {g['high']:+.0%}] | "
                     + " / ".join(f"{cot['few_shot']['by_steps'][s]['accuracy']:.0%}" for s in steps) + " | "
                     + " / ".join(f"{cot['few_shot_cot']['by_steps'][s]['accuracy']:.0%}" for s in steps) + " |")
    lines += ["", "![emergence](experiments/emergence.png)", "",
              "What the curves say about the lecture's claims (differences with 95% intervals: Newcombe's for "
              "accuracies):", ""]
    lines.append("- " + verdict(claims_["icl_generated"], "*Few-shot beats zero-shot*, generated answers"))
    if has_ranked:
        lines.append("- " + verdict(claims_["icl_ranked"], "*Few-shot beats zero-shot*, ranked labels"))
    lines.append("- " + verdict(claims_["icl_answer_loss"], "*The examples teach the answer*, answer loss zero-shot "
                                "minus few-shot", percent=False))
    lines.append("- " + verdict(claims_["cot"], "*Chain of thought pays*, CoT minus few-shot on all problems"))
    lines.append("- " + verdict(claims_["cot_3_steps"], "*... most on longer problems*, the same on 3-step problems"))
    lines += ["", scale_summary(rows, claims_)]
    return lines


def scale_summary(rows: list[dict], claims_: dict) -> str:
    """Which claims the largest model reproduces, and where the lecture's models showed the rest."""
    names = {"icl_generated": "few-shot accuracy above zero-shot (generated)",
             "icl_ranked": "few-shot accuracy above zero-shot (ranked labels)",
             "icl_answer_loss": "few-shot examples lowering the answer's loss",
             "cot": "chain of thought above plain few-shot"}
    largest = rows[-1]["size"]
    shown = [text for key, text in names.items() if key in claims_ and largest in claims_[key]["significant"]]
    missing = [text for key, text in names.items() if key in claims_ and largest not in claims_[key]["significant"]]
    params = rows[-1]["params"]
    return (f"**At this scale** (largest model {params:,} non-embedding parameters): "
            + (f"reproduced: {'; '.join(shown)}. " if shown else "no claim is reproduced. ")
            + (f"Not reproduced: {'; '.join(missing)}. " if missing else "")
            + f"The lecture's models showed few-shot prompting clearly beating zero-shot from about 1B parameters "
            f"(GPT-3's curves; {math.log10(1e9 / params):.1f} decades above this model) and chain of thought paying "
            f"from about 100B ({math.log10(1e11 / params):.1f} decades above); an ability that is flat at zero "
            "across this range gives no trend to extrapolate from, so these runs can say only that it lies beyond "
            "them. Larger sizes are flags (`--device cuda --sizes ...`).")
