"""`lmforge experiment flan-heldout | flan-clusters | flan-form | flan-scale`: FLAN's findings, measured.

FLAN ("Finetuned Language Models Are Zero-Shot Learners", Wei et al. 2021) instruction-tunes a pretrained model
on many task clusters and evaluates it zero-shot on a cluster that was left out of tuning, so the score measures
whether following instructions transfers to tasks the model was never tuned on. Its findings: (1) the more
training clusters, the better on the held-out ones; (2) this only helps above some model scale (8B and smaller
models got worse on held-out tasks, the 68B and 137B ones much better); (3) natural-language instructions work
best (held-out average 55.2 trained and evaluated with instructions, 46.6 trained with dataset names and
evaluated with instructions, 47.0 with dataset names for both, 37.3 without instructions).

The protocol here, shared by the four experiments (everything reuses the world, tokenizer and pretrained model
of an `lmforge run` directory, `--run`):

- **Held-out clusters need answer options** for rank classification (`answer_options`): sentiment ->
  positive / negative; entailment -> yes / no / it is not possible to tell; closed-book QA and extraction (field
  questions; summaries have no options and are skipped) -> the answer and three other values of the same
  relation from the world ("cat" among pets, a town among towns), so chance is 1/2, 1/3 and 1/4. (Holding out
  closed-book QA keeps `forbidden`, whose requests share its wordings and are answered by refusing.)
- **Two ways of scoring** the same test records (test-split entities, so no answer was seen in SFT):
  *rank classification*, FLAN's and lm-eval's multiple-choice scorer: the option with the highest summed
  log-likelihood `loglikelihood(prompt, option)` is the answer (no length normalisation); and *generation*: the
  greedy answer judged by the world's scorer (`world_tasks.score`). The base model is asked in its corpus's
  dialogue layout (`User: ...\\nAssistant:`, the option after a space), tuned models through the chat template
  (the option is the assistant turn's content).
- **Instruction tuning** is the run's own SFT (`train/sft.py`: packing, its learning rate and batch size) from the
  run's pretrained checkpoint, on the world's training records of the chosen clusters (`task_records`; in the
  instruction form these are the run's own `tasks/train` records), for `--sft-steps` steps. Every tuned model is
  cached under RUN/experiments/flan-sft/, keyed by its data and settings, so a rerun, or another experiment
  with the same condition, reuses it.
- **Intervals**: each accuracy has a Wilson 95% interval and states n and chance; a difference between two
  models on the same records has a paired 95% interval (mean of per-record differences +- 1.96 standard errors).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import tomllib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from lmforge.data.world import World, build_world
from lmforge.data.world_tasks import (
    ENTAILMENT_LABELS, TOWN_RELATIONS, all_clusters, chat_record, prompt_text, score, task_records,
)
from lmforge.errors import BadConfigError, BadFileError

# ---------------------------------------------------------------------------------------------------------
# The run an experiment builds on


@dataclass(frozen=True)
class RunStages:
    """What an experiment reuses from `lmforge run --out DIR`, and the run's SFT recipe."""
    dir: Path
    seed: int
    sft_lr: float
    sft_batch_size: int
    pretrained: Path
    tokenizer: Path
    corpus: Path
    valid_corpus: Path

    @property
    def world(self) -> World:
        return build_world(self.seed)


def open_run(run: str) -> RunStages:
    run_dir = Path(run)
    needed = [run_dir / "config.toml", run_dir / "world" / "corpus" / "train.jsonl",
              run_dir / "tokenizer" / "tokenizer.json", run_dir / "pretrain" / "final" / "lmforge.json"]
    missing = [path for path in needed if not path.is_file()]
    if missing:
        raise BadFileError(f"--run {run}: {missing[0]} is missing; point --run at the directory of a finished "
                           f"`lmforge run` (or make one: lmforge run --out {run})")
    recipe = tomllib.loads(needed[0].read_text(encoding="utf-8"))
    return RunStages(dir=run_dir, seed=int(recipe.get("seed", 0)), sft_lr=float(recipe.get("sft_lr", 1e-3)),
                     sft_batch_size=int(recipe.get("sft_batch_size", 16)), pretrained=run_dir / "pretrain" / "final",
                     tokenizer=run_dir / "tokenizer", corpus=needed[1],
                     valid_corpus=run_dir / "world" / "corpus" / "valid.jsonl")


def resolve_quick(cfg, quick: dict):
    """The config with its `--quick` sizes when asked for (they check the machinery; no quality promised)."""
    return replace(cfg, **quick) if cfg.quick else cfg


# ---------------------------------------------------------------------------------------------------------
# Intervals


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n: unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is
    not empty at 0 or n successes (0 of 20 correct: [0%, 16%])."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(correct: Sequence[bool], chance: float) -> dict:
    """{"accuracy", "low", "high", "n", "chance"} of a list of per-record verdicts."""
    k, n = sum(bool(c) for c in correct), len(correct)
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else 0.0, "low": low, "high": high, "n": n, "chance": chance}


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Accuracy of a minus accuracy of b on the same records, with a 95% normal interval of the mean per-record
    difference (each -1, 0 or +1): pairing removes the records both get right or both get wrong."""
    if len(a) != len(b):
        raise ValueError(f"paired difference of {len(a)} and {len(b)} verdicts")
    diffs = [int(bool(x)) - int(bool(y)) for x, y in zip(a, b)]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = 1.96 * math.sqrt(var / n) if n else 0.0
    return {"difference": mean, "low": mean - half, "high": mean + half, "n": n}


def direction(diff: dict) -> str:
    """'higher', 'lower' or 'indistinguishable': whether the 95% interval of a difference excludes zero."""
    return "higher" if diff["low"] > 0 else "lower" if diff["high"] < 0 else "indistinguishable"


# ---------------------------------------------------------------------------------------------------------
# Records and their answer options

DEFAULT_HELDOUT = ("sentiment", "entailment", "extraction")
LABEL_CLUSTERS = {"sentiment": ("positive", "negative"), "entailment": ENTAILMENT_LABELS}
VALUE_CLUSTERS = ("closed_book_qa", "extraction")  # options: the answer + N_VALUE_OPTIONS - 1 others
RANKED_CLUSTERS = (*LABEL_CLUSTERS, *VALUE_CLUSTERS)
N_VALUE_OPTIONS = 4
OPTIONS_DESCRIPTION = {
    "sentiment": "positive / negative",
    "entailment": "yes / no / it is not possible to tell",
    "closed_book_qa": f"the answer + {N_VALUE_OPTIONS - 1} other values of the asked relation",
    "extraction": f"field questions: the answer + {N_VALUE_OPTIONS - 1} other values of the field",
}
SHORT_ANSWER_TOKENS = 24  # the longest answer of a ranked cluster ("it is not possible to tell", a full name)


def check_clusters(clusters: Sequence[str], flag: str, ranked: bool = True) -> None:
    allowed = RANKED_CLUSTERS if ranked else all_clusters()
    bad = [c for c in clusters if c not in allowed]
    if bad or not clusters:
        raise BadConfigError(f"{flag}: expected one or more of {', '.join(allowed)}, got {', '.join(clusters) or 'none'}"
                             + (" (held-out clusters need answer options for rank classification)" if ranked else ""))
    if len(set(clusters)) != len(clusters):
        raise BadConfigError(f"{flag}: a cluster is named twice ({', '.join(clusters)})")


def relation_values(world: World, relation: str) -> list[str]:
    """Every value the world gives `relation` (a town relation over towns, a person relation over people)."""
    entities = world.towns if relation in TOWN_RELATIONS else world.people
    return sorted({str(getattr(e, relation)) for e in entities if getattr(e, relation) not in ("", None)})


def answer_options(world: World, record: dict) -> tuple[str, ...]:
    """The options rank classification chooses among; () for a record without options. Value options are the
    answer and others of the same relation drawn with a seed from the request, so they never change."""
    meta = record["meta"]
    cluster = meta["cluster"]
    if cluster in LABEL_CLUSTERS:
        return LABEL_CLUSTERS[cluster]
    relation = meta.get("relation") if cluster == "closed_book_qa" else meta.get("field")
    if cluster not in VALUE_CLUSTERS or relation in (None, "summary"):
        return ()
    answer = str(meta["answer"])
    others = [v for v in relation_values(world, relation) if v != answer]
    rng = random.Random(f"options/{world.seed}/{prompt_text(record)}")
    options = rng.sample(others, N_VALUE_OPTIONS - 1) + [answer]
    rng.shuffle(options)
    return tuple(options)


def evaluation_records(world: World, clusters: Sequence[str], n: int, form: str = "instruction", seed: int = 0,
                 keep: Callable[[dict], bool] = lambda record: True) -> list[dict]:
    """n test-split records of each cluster in `form` that `keep` accepts (fewer only if the world runs out)."""
    out = []
    for cluster in clusters:
        asked = n
        while True:
            mine = [r for r in task_records(world, "test", asked, seed, forms=(form,))
                    if r["meta"]["cluster"] == cluster and keep(r)]
            if len(mine) >= n or asked >= 16 * n:
                break
            asked *= 2
        out += mine[:n]
    return out


def ranked_records(world: World, clusters: Sequence[str], n: int, form: str = "instruction", seed: int = 0) -> list[dict]:
    """Test records with their answer options under "options"."""
    records = evaluation_records(world, clusters, n, form, seed, keep=lambda r: bool(answer_options(world, r)))
    return [{**r, "options": list(answer_options(world, r))} for r in records]


def training_records(world: World, clusters: Sequence[str], form: str, n_per_cluster: int, seed: int) -> list[dict]:
    return [r for r in task_records(world, "train", n_per_cluster, seed, forms=(form,))
            if r["meta"]["cluster"] in clusters]


def rank_chance(records: Sequence[dict]) -> float:
    return sum(1 / len(r["options"]) for r in records) / len(records) if records else 0.0


def generation_chance(records: Sequence[dict]) -> float:
    """A random label for sentiment and entailment; free-text answers are never matched by chance (~0)."""
    return sum(1 / len(LABEL_CLUSTERS[r["meta"]["cluster"]]) if r["meta"]["cluster"] in LABEL_CLUSTERS else 0.0
               for r in records) / len(records) if records else 0.0


# ---------------------------------------------------------------------------------------------------------
# Asking a model: rank classification and generation


def rank_classify(model, tokenizer, records: Sequence[dict], mode: str) -> list[int]:
    """Index of the option with the highest log-likelihood for each record (ties: the first). mode "chat": the
    request through the chat template, the option as the assistant's content; "zero_shot": the base model's
    dialogue layout, the option after a space (lm-eval's target delimiter)."""
    from lmforge.evaluate.world_tasks import TEXT_FORMAT
    from lmforge.infer.scoring import loglikelihood_tokens, split_context

    pairs = []
    for record in records:
        request = prompt_text(record)
        for option in record["options"]:
            if mode == "chat":
                pairs.append((tokenizer.render_prompt([{"role": "user", "content": request}]), tokenizer.encode(option)))
            else:
                pairs.append(split_context(tokenizer, TEXT_FORMAT.text({"request": request}),
                                           TEXT_FORMAT.target_delimiter + option))
    logprobs = [logprob for logprob, _ in loglikelihood_tokens(model, pairs, tokenizer.pad_id)]
    picks, start = [], 0
    for record in records:  # the pairs of one record are consecutive
        n = len(record["options"])
        mine = logprobs[start:start + n]
        picks.append(max(range(n), key=lambda j: (mine[j], -j)))
        start += n
    return picks


def generate_answers(model, tokenizer, records: Sequence[dict], mode: str, max_new_tokens: int) -> list[tuple[str, bool]]:
    """(greedy answer, whether it ended by itself) per record: by EOS in the chat layout, at the end of the line in
    the base model's dialogue layout; False when cut by `max_new_tokens`."""
    from lmforge.evaluate.world_tasks import prompts_for
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    engine = Engine(model, tokenizer, max_batch_size=16)
    keep = engine.max_len - max_new_tokens
    prompts = [p[-keep:] for p in prompts_for(list(records), tokenizer, mode)]
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, stop=() if mode == "chat" else ("\n",))
    return [(out.text.strip(), out.finish_reason == "stop") for out in engine.generate(prompts, params)]


def ask(model, tokenizer, records: Sequence[dict], mode: str) -> list[dict]:
    """Per record: the option rank classification picks, the greedy answer, and whether each is right."""
    model.eval()
    picks = rank_classify(model, tokenizer, records, mode)
    answers = generate_answers(model, tokenizer, records, mode, SHORT_ANSWER_TOKENS)
    return [{"cluster": r["meta"]["cluster"], "choice": r["options"][pick],
             "rank": r["options"][pick] == str(r["meta"]["answer"]), "response": text,
             "generation": bool(score(r, text)["correct"])}
            for r, pick, (text, _) in zip(records, picks, answers)]


def cluster_table(records: Sequence[dict], verdicts: Sequence[dict]) -> dict:
    """{cluster: {"rank": summary, "generation": summary}} plus "_all" over every record."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["meta"]["cluster"], []).append(i)
    groups["_all"] = list(range(len(records)))
    return {cluster: {"rank": summarize([verdicts[i]["rank"] for i in idx], rank_chance([records[i] for i in idx])),
                      "generation": summarize([verdicts[i]["generation"] for i in idx],
                                              generation_chance([records[i] for i in idx]))}
            for cluster, idx in groups.items()}


def differences(a: Sequence[dict], b: Sequence[dict]) -> dict:
    """Paired differences a - b, rank and generation, on the same records in the same order."""
    return {way: paired_difference([v[way] for v in a], [v[way] for v in b]) for way in ("rank", "generation")}


def examples(records: Sequence[dict], verdicts: Sequence[dict], k: int = 2) -> list[dict]:
    return [{"request": prompt_text(r)[:160], "options": r["options"], "expected": str(r["meta"]["answer"]),
             "choice": v["choice"], "response": v["response"][:120]} for r, v in list(zip(records, verdicts))[:k]]


# ---------------------------------------------------------------------------------------------------------
# Training: the run's SFT on a chosen set of records, cached by data and settings


def sft_on(run: RunStages, records: Sequence[dict], steps: int, label: str, model: Path | None = None,
           folder: str = "flan-sft", progress: bool = True) -> Path:
    """Instruction-tune `model` (default: the run's pretrained one) on `records` with the run's SFT recipe;
    returns the final checkpoint. Kept under RUN/experiments/FOLDER/LABEL-KEY, KEY a hash of the data and the
    settings, so the same condition is trained once whichever experiment asks for it."""
    from lmforge.checkpoint import read_record
    from lmforge.pipeline import mark_done, stage_done, start_stage
    from lmforge.train.loop import TrainConfig
    from lmforge.train.sft import SFTConfig, sft

    if not records:
        raise BadConfigError(f"{label}: no training records (check the clusters and --n-train-per-cluster)")
    model = Path(model or run.pretrained)
    lines = "".join(json.dumps(chat_record(r), ensure_ascii=False) + "\n" for r in records)
    train_cfg = TrainConfig(steps=steps, batch_size=run.sft_batch_size, lr=run.sft_lr,
                            warmup_steps=max(1, steps // 20), eval_every=steps, seed=run.seed, progress=progress)
    # The model by its weights' size and hash (lmforge.json), so the cache survives moving the run directory.
    weights = read_record(model).get("files", {}).get("model.safetensors") or str(model.resolve())
    settings = {"data_sha256": hashlib.sha256(lines.encode()).hexdigest(), "model": weights,
                "train": {k: v for k, v in asdict(train_cfg).items() if k != "progress"}, "packing": True}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    for done in sorted((run.dir / "experiments" / folder).glob(f"*-{key}")):  # another experiment's label
        if stage_done(done, settings):
            return done / "final"
    out = run.dir / "experiments" / folder / f"{label}-{key}"
    start = time.perf_counter()
    start_stage(out, settings)
    data = out / "data.chat.jsonl"
    tmp = data.with_suffix(".tmp")
    tmp.write_text(lines, encoding="utf-8")
    tmp.replace(data)
    sft(SFTConfig(model=str(model), data=str(data), out=str(out), packing=True, train=train_cfg),
        lineage={"stage": "sft", "parent": str(model), "experiment": label})
    mark_done(out, settings, time.perf_counter() - start, label=label, n_records=len(records))
    return out / "final"


def load_model(path: Path):
    from lmforge.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(path)
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------
# Report pieces: table cells and charts


def cell(s: dict) -> str:
    return f"{s['accuracy']:.0%} [{s['low']:.0%}, {s['high']:.0%}]"


def diff_cell(d: dict) -> str:
    return f"{d['difference'] * 100:+.0f} pts [{d['low'] * 100:+.0f}, {d['high'] * 100:+.0f}]"


def chance_cell(s: dict) -> str:
    return f"{s['chance']:.0%}" if s["chance"] >= 0.005 else "~0%"


def chance_pair(entry: dict) -> str:
    """Chance by rank classification / by generation (free-text answers are ~0% by generation)."""
    return f"{chance_cell(entry['rank'])} / {chance_cell(entry['generation'])}"


def save_figure(fig, picture: Path) -> None:
    from lmforge.evaluate import report

    report.save_figure(fig, picture, bbox_inches="tight")


def plot_bars(picture: Path, groups: list[str], series: dict[str, list[dict]], chance: list[float], ylabel: str) -> None:
    """Grouped bars with 95% interval whiskers and each group's chance level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    width = 0.8 / max(len(series), 1)
    for i, (name, summaries) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ys = [s["accuracy"] for s in summaries]
        err = [[y - s["low"] for y, s in zip(ys, summaries)], [s["high"] - y for y, s in zip(ys, summaries)]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=name)
    for g, level in enumerate(chance):
        ax.hlines(level, g - width / 2, g + width * (len(series) - 0.5), colors="k", linestyles="dashed", lw=1,
                  label="chance" if g == 0 else None)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, picture)


def plot_lines(picture: Path, xs: list[float], series: dict[str, list[dict]], chance: float, chance_label: str,
               xlabel: str, xlabels: list[str] | None = None,
               extra_points: dict[str, tuple[float, dict]] | None = None) -> None:
    """Accuracy against x with a 95% band per series, chance dashed; extra_points are single marked points.
    With `xlabels` the x axis is logarithmic, ticked at xs with those labels (sizes that grow by multiples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for name, summaries in series.items():
        line, = ax.plot(xs, [s["accuracy"] for s in summaries], "o-", label=name)
        ax.fill_between(xs, [s["low"] for s in summaries], [s["high"] for s in summaries], alpha=0.15,
                        color=line.get_color())
    for name, (x, s) in (extra_points or {}).items():
        ax.errorbar([x], [s["accuracy"]], yerr=[[s["accuracy"] - s["low"]], [s["high"] - s["accuracy"]]], fmt="*",
                    markersize=12, capsize=3, label=name)
    ax.axhline(chance, color="k", ls="--", lw=1, label=chance_label)
    if xlabels:
        ax.set_xscale("log")
        ax.set_xticks(xs, xlabels)
        ax.minorticks_off()
    else:
        ax.set_xticks(xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of test records")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, picture)


INTERVALS_NOTE = ("Cells: accuracy [Wilson 95% interval]; differences: paired over the same records, "
                  "[95% interval]. Rank classification picks the option with the highest log-likelihood; "
                  "generation is the greedy answer judged by the world's scorer.")


def options_lines(clusters: Sequence[str]) -> list[str]:
    return ["Answer options (rank classification): " + "; ".join(f"{c.replace('_', ' ')}: {OPTIONS_DESCRIPTION[c]}"
                                                                for c in clusters) + "."]


# =========================================================================================================
# flan-heldout: each cluster held out of SFT in turn, zero-shot on it


@dataclass(frozen=True)
class FlanHeldoutConfig:
    run: str = "runs/world"
    """The `lmforge run` directory whose world, tokenizer and pretrained model are reused."""
    clusters: tuple[str, ...] = DEFAULT_HELDOUT
    """Clusters to hold out, one SFT run each (each needs answer options: sentiment, entailment, closed_book_qa,
    extraction)."""
    sft_steps: int = 200
    """SFT steps of every tuned model (the run's batch size and learning rate, packed)."""
    n_eval: int = 150
    """Test records per held-out cluster."""
    n_train_per_cluster: int = 400
    """Training records per cluster (the run exports 400)."""
    seed: int = 0
    """Seed of the task records (0: the run's own training records)."""
    quick: bool = False
    """Smallest sizes: checks the machinery in seconds, no quality promised."""
    progress: bool = True
    """Show progress bars while training."""


FLAN_HELDOUT_QUICK = dict(clusters=("sentiment", "entailment"), sft_steps=10, n_eval=8, n_train_per_cluster=30)


def run_flan_heldout(cfg: FlanHeldoutConfig) -> dict:
    from lmforge.experiments import save_results

    cfg = resolve_quick(cfg, FLAN_HELDOUT_QUICK)
    check_clusters(cfg.clusters, "--clusters")
    start = time.perf_counter()
    run = open_run(cfg.run)
    world = run.world
    records = ranked_records(world, cfg.clusters, cfg.n_eval, seed=cfg.seed)
    train = training_records(world, all_clusters(), "instruction", cfg.n_train_per_cluster, cfg.seed)

    # --- the base model, and SFT on every cluster (the cluster included) ----------------------------------
    base_model, tokenizer = load_model(run.pretrained)
    base = ask(base_model, tokenizer, records, "zero_shot")
    included_model, _ = load_model(sft_on(run, train, cfg.sft_steps, "all-clusters", progress=cfg.progress))
    included = ask(included_model, tokenizer, records, "chat")

    # --- one SFT run per held-out cluster, without it ------------------------------------------------------
    clusters = {}
    for cluster in cfg.clusters:
        without = [r for r in train if r["meta"]["cluster"] != cluster]
        model, _ = load_model(sft_on(run, without, cfg.sft_steps, f"without-{cluster}", progress=cfg.progress))
        idx = [i for i, r in enumerate(records) if r["meta"]["cluster"] == cluster]
        mine = [records[i] for i in idx]
        heldout = ask(model, tokenizer, mine, "chat")
        base_mine, included_mine = [base[i] for i in idx], [included[i] for i in idx]
        clusters[cluster] = {
            "options": OPTIONS_DESCRIPTION[cluster], "n_train": len(without),
            "base": cluster_table(mine, base_mine)[cluster], "heldout": cluster_table(mine, heldout)[cluster],
            "included": cluster_table(mine, included_mine)[cluster],
            "heldout_minus_base": differences(heldout, base_mine),
            "included_minus_heldout": differences(included_mine, heldout),
            "examples": examples(mine, heldout),
        }
    results = {"config": asdict(cfg), "sft_steps": cfg.sft_steps, "n_train_all": len(train), "clusters": clusters,
               "seconds": time.perf_counter() - start}
    save_results(cfg.run, "flan-heldout", results)
    return results


def section_flan_heldout(results: dict, run_dir: Path) -> list[str]:
    clusters = results["clusters"]
    names = list(clusters)
    plot_bars(Path(run_dir) / "experiments" / "flan-heldout.png", [c.replace("_", " ") for c in names],
              {label: [clusters[c][key]["rank"] for c in names]
               for key, label in (("base", "base model"), ("heldout", "SFT without the cluster"),
                                  ("included", "SFT with it"))},
              [clusters[c]["base"]["rank"]["chance"] for c in names], "zero-shot accuracy (rank classification)")
    lines = [
        "## FLAN: zero-shot accuracy on a cluster held out of instruction tuning",
        "",
        f"For each cluster, one SFT run on every other cluster ({results['sft_steps']} steps, the run's SFT recipe), "
        "then zero-shot on the held-out cluster's test records. Compared with the pretrained base model (its "
        "dialogue layout) and with SFT on all clusters, the held-out one included (same steps). "
        + INTERVALS_NOTE,
        "",
        *options_lines(names),
        "",
        "| cluster | way | n | chance | base model | SFT without the cluster | SFT with it | without − base |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in names:
        row = clusters[c]
        for way in ("rank", "generation"):
            lines.append(f"| {c.replace('_', ' ')} | {way} | {row['base'][way]['n']} | {chance_cell(row['base'][way])} | "
                         f"{cell(row['base'][way])} | {cell(row['heldout'][way])} | {cell(row['included'][way])} | "
                         f"{diff_cell(row['heldout_minus_base'][way])} |")
    lines += ["", "![held-out accuracy](experiments/flan-heldout.png)", "", "**Beside FLAN's claim** (tuning on "
              "other clusters makes a model better zero-shot on an unseen one; FLAN 137B gained on most held-out "
              "tasks):", ""]
    for c in names:
        row = clusters[c]
        d, gap = row["heldout_minus_base"]["rank"], row["included_minus_heldout"]["rank"]
        verdict = {"higher": "reproduced: held-out SFT beats the base model",
                   "lower": "reversed: held-out SFT is worse than the base model (as FLAN saw for its 8B and "
                            "smaller models)",
                   "indistinguishable": "not reproduced: held-out SFT and the base model cannot be told apart"}
        lines.append(f"- {c.replace('_', ' ')}: {verdict[direction(d)]} ({diff_cell(d)} by rank classification, "
                     f"{diff_cell(row['heldout_minus_base']['generation'])} by generation, n = {d['n']}, chance "
                     f"{chance_cell(row['base']['rank'])}); including the cluster in SFT adds {diff_cell(gap)}.")
    if any(direction(clusters[c]["heldout_minus_base"]["rank"]) != "higher" for c in names):
        lines += ["", scale_note(run_dir)]
    shown = [(c, ex) for c in names for ex in clusters[c]["examples"][:1]]
    lines += ["", "Held-out SFT answers (request → generated; rank-classification choice; expected):", ""]
    lines += [f"- *{c.replace('_', ' ')}*: {ex['request'].splitlines()[0][:80]} → **{ex['response'][:60]}**; "
              f"choice *{ex['choice']}*; expected *{ex['expected']}*" for c, ex in shown]
    return lines + [""]


# =========================================================================================================
# flan-clusters: held-out accuracy as the number of training clusters grows


@dataclass(frozen=True)
class FlanClustersConfig:
    run: str = "runs/world"
    """The `lmforge run` directory whose world, tokenizer and pretrained model are reused."""
    heldout: tuple[str, ...] = DEFAULT_HELDOUT
    """Clusters never tuned on, where accuracy is measured (each needs answer options)."""
    training_clusters: tuple[str, ...] = ()
    """The order in which training clusters are added; default: every other cluster in the world's order."""
    n_clusters: tuple[int, ...] = (1, 2, 3, 5)
    """Numbers of training clusters to tune on (the first k of the order); 0, the base model, is always shown."""
    sft_steps: int = 200
    """SFT steps of every tuned model (the run's batch size and learning rate, packed)."""
    n_eval: int = 150
    """Test records per held-out cluster."""
    n_train_per_cluster: int = 400
    """Training records per cluster (the run exports 400)."""
    seed: int = 0
    """Seed of the task records (0: the run's own training records)."""
    quick: bool = False
    """Smallest sizes: checks the machinery in seconds, no quality promised."""
    progress: bool = True
    """Show progress bars while training."""


FLAN_CLUSTERS_QUICK = dict(heldout=("sentiment", "entailment"), n_clusters=(1, 3), sft_steps=10, n_eval=8,
                           n_train_per_cluster=30)


def training_order(heldout: Sequence[str], given: Sequence[str]) -> list[str]:
    order = list(given) or [c for c in all_clusters() if c not in heldout]
    check_clusters(order, "--training-clusters", ranked=False)
    overlap = [c for c in order if c in heldout]
    if overlap:
        raise BadConfigError(f"--training-clusters: {', '.join(overlap)} is also held out")
    return order


def run_flan_clusters(cfg: FlanClustersConfig) -> dict:
    from lmforge.experiments import save_results

    cfg = resolve_quick(cfg, FLAN_CLUSTERS_QUICK)
    check_clusters(cfg.heldout, "--heldout")
    order = training_order(cfg.heldout, cfg.training_clusters)
    if not cfg.n_clusters or any(k < 1 or k > len(order) for k in cfg.n_clusters):
        raise BadConfigError(f"--n-clusters: each must be between 1 and {len(order)} (the training clusters), "
                             f"got {cfg.n_clusters}")
    start = time.perf_counter()
    run = open_run(cfg.run)
    world = run.world
    records = ranked_records(world, cfg.heldout, cfg.n_eval, seed=cfg.seed)
    train = training_records(world, order, "instruction", cfg.n_train_per_cluster, cfg.seed)

    base_model, tokenizer = load_model(run.pretrained)
    base = ask(base_model, tokenizer, records, "zero_shot")
    points = [{"n_clusters": 0, "clusters": [], "n_train": 0, "accuracy": cluster_table(records, base)}]
    verdicts = {0: base}
    for k in sorted(set(cfg.n_clusters)):
        chosen = order[:k]
        data = [r for r in train if r["meta"]["cluster"] in chosen]
        model, _ = load_model(sft_on(run, data, cfg.sft_steps, f"{k}-clusters", progress=cfg.progress))
        verdicts[k] = ask(model, tokenizer, records, "chat")
        points.append({"n_clusters": k, "clusters": chosen, "n_train": len(data),
                       "accuracy": cluster_table(records, verdicts[k]),
                       "minus_base": differences(verdicts[k], base)})
    # the biggest point against the smallest tuned one (against the base model when only one was tuned)
    most, fewest = max(verdicts), min(k for k in verdicts if k > 0) if len(verdicts) > 2 else 0
    results = {"config": asdict(cfg), "heldout": list(cfg.heldout), "order": order, "sft_steps": cfg.sft_steps,
               "points": points, "most_minus_fewest": {"most": most, "fewest": fewest,
                                                        **differences(verdicts[most], verdicts[fewest])},
               "seconds": time.perf_counter() - start}
    save_results(cfg.run, "flan-clusters", results)
    return results


def section_flan_clusters(results: dict, run_dir: Path) -> list[str]:
    points, heldout = results["points"], results["heldout"]
    xs = [p["n_clusters"] for p in points]
    base = points[0]["accuracy"]
    plot_lines(Path(run_dir) / "experiments" / "flan-clusters.png", xs,
               {"held-out average, rank classification": [p["accuracy"]["_all"]["rank"] for p in points],
                "held-out average, generation": [p["accuracy"]["_all"]["generation"] for p in points]},
               base["_all"]["rank"]["chance"], "chance (rank classification)", "training clusters (0 = base model)")
    lines = [
        "## FLAN: held-out accuracy against the number of training clusters",
        "",
        f"Held out of every SFT run: {', '.join(c.replace('_', ' ') for c in heldout)}. Training clusters are added "
        f"in this order: {', '.join(c.replace('_', ' ') for c in results['order'])}; each point is one SFT run "
        f"({results['sft_steps']} steps) on the first k. The average is over all held-out records (equal n per "
        f"cluster). {INTERVALS_NOTE}",
        "",
        *options_lines(heldout),
        "",
        "| training clusters | SFT records | " + " | ".join(f"{c.replace('_', ' ')} (rank)" for c in heldout)
        + " | average (rank) | average (generation) | average rank − base |",
        "|---|---:|" + "---:|" * (len(heldout) + 3),
        "| chance (n) | | " + " | ".join(f"{chance_cell(base[c]['rank'])} ({base[c]['rank']['n']})" for c in heldout)
        + f" | {chance_cell(base['_all']['rank'])} ({base['_all']['rank']['n']}) | "
          f"{chance_cell(base['_all']['generation'])} ({base['_all']['generation']['n']}) | |",
    ]
    for p in points:
        acc = p["accuracy"]
        name = "0 (base model)" if p["n_clusters"] == 0 else f"{p['n_clusters']}: +{p['clusters'][-1].replace('_', ' ')}"
        lines.append(f"| {name} | {p['n_train']} | " + " | ".join(cell(acc[c]["rank"]) for c in heldout)
                     + f" | {cell(acc['_all']['rank'])} | {cell(acc['_all']['generation'])} | "
                     + (diff_cell(p["minus_base"]["rank"]) if "minus_base" in p else "") + " |")
    d = results["most_minus_fewest"]
    ranks = [p["accuracy"]["_all"]["rank"]["accuracy"] for p in points if p["n_clusters"] > 0]
    steps = ("rises at every step" if all(b > a for a, b in zip(ranks, ranks[1:])) else
             "never falls" if all(b >= a for a, b in zip(ranks, ranks[1:])) else "falls at some step")
    verdict = {"higher": "reproduced: more training clusters give higher held-out accuracy",
               "lower": "reversed: more training clusters give lower held-out accuracy",
               "indistinguishable": "not reproduced at this scale: the held-out average does not change measurably"}
    lines += ["", "![held-out accuracy against training clusters](experiments/flan-clusters.png)", "",
              "**Beside FLAN's claim** (held-out performance rises with every added cluster): "
              f"{verdict[direction(d['rank'])]} "
              f"({d['most']} clusters − {d['fewest']}: {diff_cell(d['rank'])} by rank classification, "
              f"{diff_cell(d['generation'])} by generation, n = {d['rank']['n']}; the rank-classification average "
              f"{steps}).", ""]
    if direction(d["rank"]) != "higher":
        lines += [scale_note(run_dir), ""]
    return lines


# =========================================================================================================
# flan-form: instructions vs dataset names vs no instruction


FORM_CONDITIONS = (  # (trained with, evaluated with, FLAN's held-out average)
    ("instruction", "instruction", 55.2),
    ("name_only", "instruction", 46.6),
    ("name_only", "name_only", 47.0),
    ("no_instruction", "no_instruction", 37.3),
)
FORM_NAMES = {"instruction": "instruction", "name_only": "dataset name", "no_instruction": "no instruction"}


@dataclass(frozen=True)
class FlanFormConfig:
    run: str = "runs/world"
    """The `lmforge run` directory whose world, tokenizer and pretrained model are reused."""
    heldout: tuple[str, ...] = DEFAULT_HELDOUT
    """Clusters never tuned on, where accuracy is measured (each needs answer options)."""
    sft_steps: int = 200
    """SFT steps of every tuned model (one per training form)."""
    n_eval: int = 150
    """Test records per held-out cluster."""
    n_train_per_cluster: int = 400
    """Training records per cluster (the run exports 400)."""
    seed: int = 0
    """Seed of the task records (0: the run's own training records)."""
    quick: bool = False
    """Smallest sizes: checks the machinery in seconds, no quality promised."""
    progress: bool = True
    """Show progress bars while training."""


FLAN_FORM_QUICK = dict(heldout=("sentiment", "entailment"), sft_steps=10, n_eval=8, n_train_per_cluster=30)


def run_flan_form(cfg: FlanFormConfig) -> dict:
    from lmforge.experiments import save_results

    cfg = resolve_quick(cfg, FLAN_FORM_QUICK)
    check_clusters(cfg.heldout, "--heldout")
    start = time.perf_counter()
    run = open_run(cfg.run)
    world = run.world
    order = [c for c in all_clusters() if c not in cfg.heldout]
    # The examples do not depend on the form (task_records), so every condition answers the same questions and
    # differences between conditions are paired.
    records = {form: ranked_records(world, cfg.heldout, cfg.n_eval, form, cfg.seed)
               for form in {evaluated for _, evaluated, _ in FORM_CONDITIONS}}
    base_model, tokenizer = load_model(run.pretrained)
    base = ask(base_model, tokenizer, records["instruction"], "zero_shot")
    conditions, verdicts = [], {}
    for trained, evaluated, flan_score in FORM_CONDITIONS:
        data = training_records(world, order, trained, cfg.n_train_per_cluster, cfg.seed)
        model, _ = load_model(sft_on(run, data, cfg.sft_steps, f"form-{trained}", progress=cfg.progress))
        verdicts[(trained, evaluated)] = ask(model, tokenizer, records[evaluated], "chat")
        conditions.append({"trained": trained, "evaluated": evaluated, "flan_heldout_average": flan_score,
                           "n_train": len(data), "example_request": prompt_text(data[0])[:120],
                           "accuracy": cluster_table(records[evaluated], verdicts[(trained, evaluated)]),
                           "minus_base": differences(verdicts[(trained, evaluated)], base)})
    best = verdicts[FORM_CONDITIONS[0][:2]]
    for condition in conditions[1:]:
        condition["instruction_minus_this"] = differences(best, verdicts[(condition["trained"], condition["evaluated"])])
    results = {"config": asdict(cfg), "heldout": list(cfg.heldout), "training_clusters": order,
               "sft_steps": cfg.sft_steps, "base": cluster_table(records["instruction"], base),
               "conditions": conditions, "seconds": time.perf_counter() - start}
    save_results(cfg.run, "flan-form", results)
    return results


def form_label(condition: dict) -> str:
    return f"{FORM_NAMES[condition['trained']]} / {FORM_NAMES[condition['evaluated']]}"


def section_flan_form(results: dict, run_dir: Path) -> list[str]:
    heldout, conditions = results["heldout"], results["conditions"]
    groups = [*heldout, "_all"]
    plot_bars(Path(run_dir) / "experiments" / "flan-form.png",
              [g.replace("_", " ") if g != "_all" else "average" for g in groups],
              {"base model": [results["base"][g]["rank"] for g in groups],
               **{form_label(c): [c["accuracy"][g]["rank"] for g in groups] for c in conditions}},
              [results["base"][g]["rank"]["chance"] for g in groups], "accuracy (rank classification)")
    base = results["base"]["_all"]
    lines = [
        "## FLAN: instructions, dataset names or nothing",
        "",
        f"One SFT run per training form on {', '.join(c.replace('_', ' ') for c in results['training_clusters'])} "
        f"({results['sft_steps']} steps); zero-shot on {', '.join(c.replace('_', ' ') for c in heldout)}, the same "
        "examples in every condition, worded as the condition says (a natural-language instruction, the dataset "
        f"name such as \"sentiment\", or the input alone). {INTERVALS_NOTE}",
        "",
        *options_lines(heldout),
        "",
        "| trained / evaluated with | n | chance (rank / generation) | "
        + " | ".join(f"{c.replace('_', ' ')} (rank)" for c in heldout)
        + " | average (rank) | average (generation) | instruction/instruction − this (rank) | FLAN held-out average |",
        "|---|---:|---:|" + "---:|" * (len(heldout) + 4),
        f"| base model / instruction | {base['rank']['n']} | {chance_pair(base)} | "
        + " | ".join(cell(results["base"][c]["rank"]) for c in heldout)
        + f" | {cell(base['rank'])} | {cell(base['generation'])} | | |",
    ]
    for c in conditions:
        acc = c["accuracy"]
        gap = diff_cell(c["instruction_minus_this"]["rank"]) if "instruction_minus_this" in c else ""
        lines.append(f"| {form_label(c)} | {acc['_all']['rank']['n']} | {chance_pair(acc['_all'])} | "
                     + " | ".join(cell(acc[h]["rank"]) for h in heldout)
                     + f" | {cell(acc['_all']['rank'])} | {cell(acc['_all']['generation'])} | {gap} | "
                       f"{c['flan_heldout_average']} |")
    lines += ["", "![accuracy by instruction form](experiments/flan-form.png)", "",
              "**Beside FLAN's claim** (instructions in training and evaluation are best: 55.2 against 46.6, 47.0 "
              "and 37.3):", ""]
    for c in conditions[1:]:
        d = c["instruction_minus_this"]["rank"]
        words = {"higher": "instruction/instruction is better, as in FLAN",
                 "lower": "instruction/instruction is worse, unlike FLAN",
                 "indistinguishable": "no measurable difference, so FLAN's gap is not reproduced here"}
        lines.append(f"- against {form_label(c)}: {words[direction(d)]} ({diff_cell(d)}, n = {d['n']}).")
    if any(direction(c["instruction_minus_this"]["rank"]) != "higher" for c in conditions[1:]):
        lines += ["", scale_note(run_dir)]
    return lines + [""]


# =========================================================================================================
# flan-scale: the held-out effect across model sizes


@dataclass(frozen=True)
class FlanScaleConfig:
    run: str = "runs/world"
    """The `lmforge run` directory whose world, tokenizer and corpus are reused."""
    sizes: tuple[str, ...] = ("nano", "micro", "tiny")
    """Model presets, smallest first (see `lmforge info`); each is pretrained on the run's corpus unless the run
    has a checkpoint of that preset and budget (its own pretrain/final, or a point of `experiment scaling`)."""
    pretrain_steps: int = 150
    """Pretraining steps of every size (the run's batch size, window and learning rate). 150 keeps tiny within
    the time budget; with the run's own budget (400) micro comes from the run, nano from `experiment scaling`."""
    heldout: tuple[str, ...] = DEFAULT_HELDOUT
    """Clusters never tuned on, where the effect is measured (each needs answer options)."""
    sft_steps: int = 120
    """SFT steps of every size, on all the other clusters."""
    n_eval: int = 120
    """Test records per held-out cluster (and of the held-in control cluster)."""
    n_train_per_cluster: int = 400
    """Training records per cluster (the run exports 400)."""
    seed: int = 0
    """Seed of the task records (0: the run's own training records)."""
    quick: bool = False
    """Smallest sizes: checks the machinery in seconds, no quality promised."""
    progress: bool = True
    """Show progress bars while training."""


FLAN_SCALE_QUICK = dict(pretrain_steps=4, heldout=("sentiment", "entailment"), sft_steps=4, n_eval=6,
                        n_train_per_cluster=20)


def pretraining_recipe(record: dict) -> dict | None:
    """What a pretrained checkpoint was trained with (preset, steps, batch_size, seq_len, lr, seed, corpus files),
    from `lmforge pretrain`'s record or from a point of `lmforge experiment scaling`; None for anything else."""
    configs = record.get("configs", {})
    try:
        if "pretrain" in configs:
            c = configs["pretrain"]
            return {"preset": c["preset"], "steps": c["train"]["steps"], "batch_size": c["train"]["batch_size"],
                    "seq_len": c["seq_len"], "lr": c["train"]["lr"], "seed": c["train"]["seed"], "data": list(c["data"])}
        if "scaling_point" in configs:
            c = configs["scaling_point"]
            return {"preset": c["size"], "steps": c["steps"], "batch_size": c["batch_size"], "seq_len": c["seq_len"],
                    "lr": c["lr"], "seed": c["seed"], "data": [source["path"] for source in c["corpus"]]}
    except (KeyError, TypeError):
        return None
    return None


def find_pretrained(run: RunStages, preset: str, steps: int) -> Path | None:
    """A checkpoint in the run (its pretrain/final, or anywhere under experiments/, e.g. the scaling experiment's
    points) of this preset, pretrained for `steps` steps with the run's batch size, window, learning rate and
    seed on the run's corpus and tokenizer; None when there is none."""
    from lmforge.checkpoint import read_record

    run_record = read_record(run.pretrained)
    wanted = {**pretraining_recipe(run_record), "preset": preset, "steps": steps}
    for record_path in [run.pretrained / "lmforge.json", *sorted((run.dir / "experiments").glob("**/final/lmforge.json"))]:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        got = pretraining_recipe(record)
        if got is None or record.get("tokenizer_fingerprint") != run_record.get("tokenizer_fingerprint"):
            continue
        same_corpus = [Path(p).parts[-3:] for p in got["data"]] == [("world", "corpus", "train.jsonl")]
        if same_corpus and all(got[k] == wanted[k] for k in ("preset", "steps", "batch_size", "seq_len", "lr", "seed")):
            return record_path.parent
    return None


def pretrained_size(run: RunStages, preset: str, steps: int, progress: bool) -> Path:
    """The checkpoint of `preset` pretrained for `steps` steps: found in the run, or trained now under
    RUN/experiments/flan-scale/ (resumed if stopped)."""
    from lmforge.checkpoint import read_record
    from lmforge.model import get_preset
    from lmforge.pipeline import mark_done, start_stage
    from lmforge.train.loop import TrainConfig
    from lmforge.train.pretrain import PretrainConfig, pretrain

    get_preset(preset)  # an unknown name fails here, naming the presets
    found = find_pretrained(run, preset, steps)
    if found is not None:
        return found
    recipe = read_record(run.pretrained)["configs"]["pretrain"]
    out = run.dir / "experiments" / "flan-scale" / f"pretrain-{preset}-{steps}"
    cfg = PretrainConfig(data=(str(run.corpus),), valid_data=(str(run.valid_corpus),), tokenizer=str(run.tokenizer),
                         preset=preset, seq_len=recipe["seq_len"], out=str(out),
                         train=TrainConfig(steps=steps, batch_size=recipe["train"]["batch_size"],
                                           lr=recipe["train"]["lr"], warmup_steps=max(1, steps // 10),
                                           eval_every=steps, save_every=max(50, steps // 4),
                                           seed=recipe["train"]["seed"], progress=progress))
    settings = {k: v for k, v in asdict(cfg).items() if k != "train"} | {
        "train": {k: v for k, v in asdict(cfg.train).items() if k != "progress"}}
    start = time.perf_counter()
    start_stage(out, settings)
    pretrain(cfg, lineage={"stage": "pretrain", "parent": None, "run": str(run.dir), "experiment": "flan-scale"})
    mark_done(out, settings, time.perf_counter() - start)
    return out / "final"


def run_flan_scale(cfg: FlanScaleConfig) -> dict:
    from lmforge.checkpoint import read_record
    from lmforge.experiments import save_results
    from lmforge.model import count_parameters, get_preset

    cfg = resolve_quick(cfg, FLAN_SCALE_QUICK)
    check_clusters(cfg.heldout, "--heldout")
    if len(cfg.sizes) < 1 or len(set(cfg.sizes)) != len(cfg.sizes):
        raise BadConfigError(f"--sizes: give distinct presets, smallest first, got {cfg.sizes}")
    for preset in cfg.sizes:
        get_preset(preset)
    start = time.perf_counter()
    run = open_run(cfg.run)
    world = run.world
    order = [c for c in all_clusters() if c not in cfg.heldout]
    control = next((c for c in order if c in RANKED_CLUSTERS), None)  # a tuned-on cluster: did SFT take at all?
    records = ranked_records(world, cfg.heldout, cfg.n_eval, seed=cfg.seed)
    control_records = ranked_records(world, [control], cfg.n_eval, seed=cfg.seed) if control else []
    train = training_records(world, order, "instruction", cfg.n_train_per_cluster, cfg.seed)

    sizes = []
    for preset in cfg.sizes:
        base_path = pretrained_size(run, preset, cfg.pretrain_steps, cfg.progress)
        record = read_record(base_path)
        base_model, tokenizer = load_model(base_path)
        tuned_model, _ = load_model(sft_on(run, train, cfg.sft_steps, f"scale-{preset}", model=base_path,
                                           progress=cfg.progress))
        base, tuned = ask(base_model, tokenizer, records, "zero_shot"), ask(tuned_model, tokenizer, records, "chat")
        origin = ("the run" if base_path == run.pretrained else
                  "experiment scaling" if "scaling" in base_path.parts else "this experiment")
        size = {"preset": preset, "parameters": count_parameters(base_model.cfg)["total"],
                "pretrained": str(base_path), "pretrained_by": origin,
                "pretrain_val_loss": record.get("metrics", {}).get("val_loss"),
                "base": cluster_table(records, base), "sft": cluster_table(records, tuned),
                "effect": differences(tuned, base)}
        if control:
            base_c = ask(base_model, tokenizer, control_records, "zero_shot")
            tuned_c = ask(tuned_model, tokenizer, control_records, "chat")
            size["control"] = {"base": cluster_table(control_records, base_c)["_all"],
                               "sft": cluster_table(control_records, tuned_c)["_all"],
                               "effect": differences(tuned_c, base_c)}
        sizes.append(size)
    results = {"config": asdict(cfg), "heldout": list(cfg.heldout), "control": control, "training_clusters": order,
               "pretrain_steps": cfg.pretrain_steps, "sft_steps": cfg.sft_steps, "sizes": sizes,
               "trend": effect_trend(sizes), "seconds": time.perf_counter() - start}
    save_results(cfg.run, "flan-scale", results)
    return results


def effect_trend(sizes: list[dict]) -> dict:
    """Least-squares line of the held-out effect (rank classification, SFT - base) against log10(parameters),
    and where it would cross +5 points if it kept its slope: a rough reading from a few tiny models."""
    xs = [math.log10(s["parameters"]) for s in sizes]
    ys = [s["effect"]["rank"]["difference"] for s in sizes]
    if len(xs) < 2 or max(xs) == min(xs):
        return {"slope_per_decade": None, "parameters_for_plus_5_points": None}
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    crossing = None
    if slope > 0:
        crossing = 10 ** (mx + (0.05 - my) / slope)
    return {"slope_per_decade": slope, "parameters_for_plus_5_points": crossing}


def section_flan_scale(results: dict, run_dir: Path) -> list[str]:
    sizes, heldout = results["sizes"], results["heldout"]
    plot_lines(Path(run_dir) / "experiments" / "flan-scale.png", [s["parameters"] for s in sizes],
               {"base model, held-out (rank)": [s["base"]["_all"]["rank"] for s in sizes],
                "SFT without the held-out clusters (rank)": [s["sft"]["_all"]["rank"] for s in sizes]},
               sizes[0]["base"]["_all"]["rank"]["chance"], "chance (rank classification)", "model size",
               xlabels=[f"{s['preset']}\n{s['parameters'] / 1e6:.2f}M" for s in sizes])
    first = sizes[0]["base"]["_all"]["rank"]
    control = results.get("control")
    lines = [
        "## FLAN: the held-out effect against model size",
        "",
        f"Each size is pretrained on the run's corpus for {results['pretrain_steps']} steps (the run's recipe), then "
        f"tuned for {results['sft_steps']} SFT steps on "
        f"{', '.join(c.replace('_', ' ') for c in results['training_clusters'])}. "
        f"The effect is SFT minus base on the held-out clusters ({', '.join(c.replace('_', ' ') for c in heldout)}), "
        f"the same {first['n']} records for every size (chance {chance_cell(first)} by rank classification, "
        f"{chance_cell(sizes[0]['base']['_all']['generation'])} by generation)"
        + (f"; {control.replace('_', ' ')}, which SFT did train on, is the held-in control" if control else "")
        + f". {INTERVALS_NOTE}",
        "",
        *options_lines(heldout),
        "",
        "| size | parameters | pretrained by | pretraining val loss | n | chance (rank / generation) | base (rank) | "
        "SFT (rank) | "
        "effect (rank) | effect (generation) |" + (" held-in control effect (rank) |" if control else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if control else ""),
    ]
    for s in sizes:
        loss = f"{s['pretrain_val_loss']:.3f}" if s.get("pretrain_val_loss") is not None else "—"
        rank = s["base"]["_all"]["rank"]
        row = (f"| {s['preset']} | {s['parameters'] / 1e6:.2f}M | {s['pretrained_by']} | {loss} | {rank['n']} | "
               f"{chance_pair(s['base']['_all'])} | {cell(rank)} | {cell(s['sft']['_all']['rank'])} | "
               f"{diff_cell(s['effect']['rank'])} | "
               f"{diff_cell(s['effect']['generation'])} |")
        if control:
            c = s["control"]
            row += f" {diff_cell(c['effect']['rank'])} (SFT {cell(c['sft']['rank'])}, n {c['sft']['rank']['n']}) |"
        lines.append(row)
    lines += ["", "![held-out accuracy against size](experiments/flan-scale.png)", "",
              f"**Beside FLAN's claim** (instruction tuning hurt held-out tasks at 8B parameters and below and helped "
              f"at 68B and 137B): {scale_reading(results)}", ""]
    return lines


def scale_reading(results: dict) -> str:
    """Where flan-scale saw the held-out effect, and at what size its trend would reach +5 points."""
    sizes, trend = results["sizes"], results["trend"]
    positive = [s["preset"] for s in sizes if direction(s["effect"]["rank"]) == "higher"]
    negative = [s["preset"] for s in sizes if direction(s["effect"]["rank"]) == "lower"]
    where = (f"the held-out effect is measurably positive for {', '.join(positive)}" if positive else
             "no size here shows a measurably positive held-out effect")
    if negative:
        where += f"; it is measurably negative for {', '.join(negative)}"
    if trend["parameters_for_plus_5_points"]:
        reach = (f"The effect grows by {trend['slope_per_decade'] * 100:+.0f} points per tenfold increase in "
                 f"parameters; if that line held, +5 points would come at about "
                 f"{trend['parameters_for_plus_5_points'] / 1e6:.3g}M parameters (a straight line through a few "
                 "tiny models: an order of magnitude at best).")
    elif trend["slope_per_decade"] is not None:
        orders = math.floor(math.log10(8e9 / max(s["parameters"] for s in sizes)))
        reach = (f"The effect does not grow with size here ({trend['slope_per_decade'] * 100:+.0f} points per "
                 "tenfold increase), so these sizes do not say at what scale it would appear; FLAN saw it appear "
                 f"only between 8B and 68B parameters, more than {orders} orders of magnitude above these models.")
    else:
        reach = "One size only: no trend can be read."
    return f"{where[0].upper()}{where[1:]}. {reach}"


def scale_note(run_dir: Path) -> str:
    """For a claim not reproduced here: what flan-scale says about the size it would take, if it has run."""
    from lmforge.experiments import results_path

    path = results_path(run_dir, "flan-scale")
    if not path.is_file():
        return ("Whether a larger model would reproduce it is what `lmforge experiment flan-scale` measures; FLAN "
                "saw held-out gains only at 68B parameters and above, thousands of times these models' size.")
    return "What scale it would take, from `flan-scale`: " + scale_reading(json.loads(path.read_text(encoding="utf-8")))
