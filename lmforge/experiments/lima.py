"""`lmforge experiment lima`: how much instruction data alignment needs, and of what quality.

LIMA ("LIMA: Less Is More for Alignment", Zhou et al. 2023) aligned a 65B model with about 1,000 curated
examples and proposed the superficial alignment hypothesis: a model's knowledge and abilities come from
pretraining, and alignment mostly teaches the format in which to answer, so a little data of high quality is
enough. The lecture adds the claim (from Microsoft) that higher-quality instruction data lets smaller data sets
and smaller models do well. Here both are measured on the world:

- **The pool.** Collected instruction data is neither balanced nor clean, so the pool imitates such a
  collection: `pool_size` training records in which cluster k of `POOL_ORDER` (open-ended requests first,
  entailment last) is `CLUSTER_DECAY`^k as common as the first, and wording t of a cluster `WORDING_DECAY`^t
  as common as its first; `dirty_share` of the outputs are damaged one of four ways (`DEFECTS`: cut short,
  wrapped in chatter, said twice, or another record's answer; meta `defect` names it, curation never reads
  it). Most of the world's open-ended demonstrations already end with a made-up detail (world_tasks'
  embellishments), which the checks reject too.
- **Training sets.** Random 100 / 300 / 1,000 (the starts of one seeded shuffle, so each holds the smaller
  ones) and the whole pool; and a curated 1,000: only records whose output passes the checks (`is_clean`: the
  world's scorer accepts it and it has its template's answer form), taken in turn from each cluster and, within
  a cluster, from each (subtask, wording), so rare clusters and wordings get as many as the pool has. Every set
  is tuned for the same number of SFT steps (flan.sft_on: the run's recipe from its pretrained model), so the
  sets differ in data, not in compute.
- **Measures**, on the same held-in test records for every set (test-split entities, wordings seen in
  training, every cluster): accuracy by the world's scorer; *ends with EOS* (the answer stops by itself within
  `ANSWER_TOKENS`); *answer form* (`answer_form_ok`: the bare label, value, worked steps, one-sentence summary,
  translation in the target script, several sentences, or the refusal, as its cluster's template answers).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from lmforge.data.world import World
from lmforge.data.world_tasks import all_clusters, normalize, score, task_records
from lmforge.errors import BadConfigError
from lmforge.experiments.flan import (
    LABEL_CLUSTERS, cell, chance_cell, diff_cell, direction, evaluation_records, generate_answers, generation_chance,
    load_model, open_run, paired_difference, plot_lines, resolve_quick, sft_on, summarize,
)

# The pool's clusters from most to least common, as in collected chat data: open-ended requests dominate,
# classification tasks are rare. The k-th is CLUSTER_DECAY^k as common as the first (the last ~8% of it).
POOL_ORDER = ("open_ended", "closed_book_qa", "translation", "arithmetic", "sentiment", "extraction", "forbidden",
              "entailment")
CLUSTER_DECAY = 0.7
WORDING_DECAY = 0.5  # within a cluster, wording t is 0.5^t as common as wording 0
DEFECTS = ("truncated", "chatty", "repeated", "wrong_answer")
ANSWER_TOKENS = 96  # the longest gold answer (a town description) is 76 tokens


# ---------------------------------------------------------------------------------------------------------
# The answer form of each cluster's template


_FILLER_RE = re.compile(r"^(?:sure|of course|certainly|here is|here's)\b|\blet me know\b", re.I)
_SENTENCE_BREAK_RE = re.compile(r"(?<=[.!?])\s+")
_HANGUL_RE = re.compile(r"[\uac00-\ud7a3]")
_LATIN_RE = re.compile(r"[A-Za-z]")
_ARITHMETIC_RE = re.compile(r"(?:-?\d+ [-+*] -?\d+ = -?\d+\. )+The answer is -?\d+\.")
_SUMMARY_RE = re.compile(r"[A-Z][\w'-]*(?: [A-Z][\w'-]*)* is an? [\w -]+ from [A-Z][\w' -]*\.")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_BREAK_RE.split(text.strip()) if s]


def answer_form_ok(record: dict, response: str) -> bool:
    """Whether `response` has the form in which its cluster's template answers, right or wrong: one line, no
    chatter ("Sure! ...", "let me know"), no sentence said twice, and per cluster: a label (sentiment,
    entailment); a bare value of at most four words (closed-book QA, extraction fields); "a op b = c." steps
    ending "The answer is N." (arithmetic); "NAME is a JOB from TOWN." (summaries); the target language's script
    (translation); two or more finished sentences (open-ended); a finished refusal (forbidden)."""
    text = response.strip()
    if not text or "\n" in text or _FILLER_RE.search(text):
        return False
    meta = record["meta"]
    cluster = meta["cluster"]
    parts = sentences(text)
    if len(set(parts)) != len(parts) and cluster != "arithmetic":  # a worked answer may repeat a step ("3 * 5 = 15.")
        return False
    if cluster in LABEL_CLUSTERS:
        return normalize(text) in LABEL_CLUSTERS[cluster]
    if cluster == "arithmetic":
        return _ARITHMETIC_RE.fullmatch(text) is not None
    if cluster == "extraction" and meta.get("field") == "summary":
        return _SUMMARY_RE.fullmatch(text) is not None
    if cluster in ("closed_book_qa", "extraction"):
        return len(text.split()) <= 4 and len(parts) == 1
    if cluster == "translation":
        to_korean = meta["direction"].endswith("ko")
        return bool(_HANGUL_RE.search(text)) != bool(_LATIN_RE.search(text)) and bool(_HANGUL_RE.search(text)) == to_korean
    finished = all(p[-1] in ".!?" for p in parts)
    if cluster == "open_ended":
        return finished and len(parts) >= 2
    if cluster == "forbidden":
        verdict = score(record, text)
        return finished and verdict["refused"] and not verdict["leaked"]
    raise BadConfigError(f"no answer form for cluster {cluster!r}")


def is_clean(record: dict) -> bool:
    """A record a curator keeps: the world's scorer accepts its output, and the output has its answer form."""
    return bool(score(record, record["output"])["correct"]) and answer_form_ok(record, record["output"])


# ---------------------------------------------------------------------------------------------------------
# The pool, and the training sets drawn from it


def corrupt(record: dict, defect: str, donor: dict) -> dict:
    """The record with its output damaged by `defect` (meta "defect" says which). `donor`, another record of the
    same cluster, gives the wrong answer. Worked example for "truncated": 'The answer is 13.' -> 'The answer i'
    (two thirds of the characters, trailing punctuation dropped, so the cut always shows)."""
    output = record["output"]
    if defect == "truncated":
        damaged = output[:max(1, len(output) * 2 // 3)].rstrip(" .!?")
    elif defect == "chatty":
        damaged = f"Sure! {output} Let me know if you need anything else."
    elif defect == "repeated":
        damaged = f"{output} {output}"
    elif defect == "wrong_answer":
        damaged = donor["output"]
    else:
        raise BadConfigError(f"unknown defect {defect!r}; choose one of {', '.join(DEFECTS)}")
    return {**record, "output": damaged, "meta": {**record["meta"], "defect": defect}}


def _weighted_sample(rng: random.Random, items: list[dict], weights: list[float], k: int) -> list[dict]:
    """k items without replacement, item i chosen with weight w_i (Efraimidis-Spirakis: the k largest u^(1/w))."""
    keys = [rng.random() ** (1 / w) for w in weights]
    order = sorted(range(len(items)), key=lambda i: keys[i], reverse=True)
    return [items[i] for i in sorted(order[:k])]


def collected_pool(world: World, size: int, dirty_share: float, seed: int = 0) -> list[dict]:
    """`size` training records, skewed across clusters and wordings, `dirty_share` of them damaged; see the
    module docstring. Deterministic in (world, size, dirty_share, seed)."""
    clusters = POOL_ORDER
    weights = [CLUSTER_DECAY ** k for k in range(len(clusters))]
    counts = [int(size * w / sum(weights)) for w in weights]
    counts[0] += size - sum(counts)  # rounding goes to the most common cluster
    candidates = task_records(world, "train", 2 * max(counts), seed)
    rng = random.Random(f"lima-pool/{world.seed}/{seed}")
    pool = []
    for cluster, count in zip(clusters, counts):
        mine = [r for r in candidates if r["meta"]["cluster"] == cluster]
        pool += _weighted_sample(rng, mine, [WORDING_DECAY ** r["meta"]["template_id"] for r in mine], count)
    rng.shuffle(pool)
    pool = [{**r, "meta": {**r["meta"], "defect": None}} for r in pool]
    for i in sorted(rng.sample(range(len(pool)), round(dirty_share * len(pool)))):
        record = pool[i]
        donors = [r for r in pool if r["meta"]["cluster"] == record["meta"]["cluster"] and r["output"] != record["output"]]
        first = rng.randrange(len(DEFECTS))
        # A damage that leaves a valid answer (another record's identical refusal) is no damage: try the next.
        for defect in DEFECTS[first:] + DEFECTS[:first]:
            damaged = corrupt(record, defect, rng.choice(donors) if donors else record)
            if not is_clean(damaged):
                pool[i] = damaged
                break
    return pool


def _interleave(groups: list[list[dict]]) -> list[dict]:
    """Round robin: the first of each group, then the second of each, ... ([[a1, a2], [b1]] -> a1, b1, a2)."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def wording(record: dict) -> tuple:
    return record["meta"]["cluster"], record["meta"]["subtask"], record["meta"]["template_id"]


def curate(pool: Sequence[dict], size: int, seed: int = 0) -> list[dict]:
    """`size` clean records of the pool, spread as evenly as it allows: in turn over clusters, and within a
    cluster in turn over its (subtask, wording) pairs."""
    rng = random.Random(f"lima-curate/{seed}")
    by_cluster: dict[str, dict[tuple, list[dict]]] = {}
    for record in pool:
        if is_clean(record):
            by_cluster.setdefault(record["meta"]["cluster"], {}).setdefault(wording(record), []).append(record)
    per_cluster = []
    for cluster in all_clusters():
        groups = [by_cluster.get(cluster, {})[key] for key in sorted(by_cluster.get(cluster, {}), key=str)]
        for group in groups:
            rng.shuffle(group)
        per_cluster.append(_interleave(groups))
    chosen = _interleave(per_cluster)
    if len(chosen) < size:
        raise BadConfigError(f"--curated-size {size}: the pool has only {len(chosen)} clean records")
    return chosen[:size]


def diversity(records: Sequence[dict]) -> dict:
    """What a training set covers: clusters, (cluster, subtask, wording) triples, its smallest cluster; and its
    share of outputs damaged in the pool, and of outputs that fail the checks (damaged, or a demonstration that
    itself invents a fact)."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r["meta"]["cluster"]] = counts.get(r["meta"]["cluster"], 0) + 1
    return {"n": len(records), "clusters": len(counts), "wordings": len({wording(r) for r in records}),
            "smallest_cluster": min(counts.get(c, 0) for c in all_clusters()),
            "damaged_share": sum(r["meta"].get("defect") is not None for r in records) / max(len(records), 1),
            "unclean_share": sum(not is_clean(r) for r in records) / max(len(records), 1)}


# ---------------------------------------------------------------------------------------------------------
# The experiment


@dataclass(frozen=True)
class Config:
    run: str = "runs/world"
    """The `lmforge run` directory whose world, tokenizer and pretrained model are reused."""
    sizes: tuple[int, ...] = (100, 300, 1000)
    """Random training sets drawn from the pool (the whole pool is always added)."""
    curated_size: int = 1000
    """Size of the curated set (clean outputs, spread over clusters and wordings)."""
    pool_size: int = 2000
    """Records in the collected pool (skewed over clusters and wordings; see the module docstring)."""
    dirty_share: float = 0.25
    """Share of the pool's outputs that are damaged (cut short, chatty, repeated or wrong)."""
    sft_steps: int = 200
    """SFT steps for every training set (the run's batch size and learning rate, packed)."""
    n_eval: int = 40
    """Held-in test records per cluster (8 clusters)."""
    seed: int = 0
    """Seed of the task records, the pool, its damage and the random draws."""
    quick: bool = False
    """Smallest sizes: checks the machinery in seconds, no quality promised."""
    progress: bool = True
    """Show progress bars while training."""


QUICK = dict(sizes=(20, 60), curated_size=60, pool_size=240, sft_steps=10, n_eval=4)


def measure(model, tokenizer, records: Sequence[dict]) -> list[dict]:
    """Per record, the greedy chat answer and its verdicts: correct (the world's scorer), eos (it stopped by
    itself), form (`answer_form_ok`), format (both eos and form)."""
    answers = generate_answers(model, tokenizer, records, "chat", ANSWER_TOKENS)
    out = []
    for record, (text, finished) in zip(records, answers):
        form = answer_form_ok(record, text)
        out.append({"cluster": record["meta"]["cluster"], "response": text, "eos": finished, "form": form,
                    "correct": bool(score(record, text)["correct"]), "format": finished and form})
    return out


MEASURES = ("correct", "eos", "form", "format")
ALIGNED = 0.5  # a model that ends and shapes at least half its answers as asked counts as aligned in the findings


def run(cfg: Config) -> dict:
    from lmforge.experiments import save_results

    cfg = resolve_quick(cfg, QUICK)
    if not cfg.sizes or any(k < 1 or k > cfg.pool_size for k in cfg.sizes):
        raise BadConfigError(f"--sizes: each must be between 1 and --pool-size {cfg.pool_size}, got {cfg.sizes}")
    if not 0 <= cfg.dirty_share < 1:
        raise BadConfigError(f"--dirty-share must be in [0, 1), got {cfg.dirty_share}")
    if cfg.curated_size < 1:
        raise BadConfigError(f"--curated-size must be positive, got {cfg.curated_size}")
    start = time.perf_counter()
    stages = open_run(cfg.run)
    world = stages.world

    # --- the pool and the training sets ----------------------------------------------------------------------
    pool = collected_pool(world, cfg.pool_size, cfg.dirty_share, cfg.seed)
    shuffled = random.Random(f"lima-order/{cfg.seed}").sample(pool, len(pool))
    sets = [("random", k, shuffled[:k]) for k in sorted(set(cfg.sizes))] + [("all", len(pool), pool)]
    sets.append(("curated", cfg.curated_size, curate(pool, cfg.curated_size, cfg.seed)))

    # --- tune on each, answer the same held-in test records ---------------------------------------------------
    records = evaluation_records(world, all_clusters(), cfg.n_eval, seed=cfg.seed,
                                 keep=lambda r: r["meta"]["template_split"] == "seen")
    chance = generation_chance(records)
    conditions, verdicts = [], {}
    for kind, n, data in sets:
        name = f"{kind} {n}"
        model, tokenizer = load_model(sft_on(stages, data, cfg.sft_steps, f"{kind}-{n}", folder="lima-sft",
                                             progress=cfg.progress))
        verdicts[name] = measure(model, tokenizer, records)
        by_cluster = {}
        for c in all_clusters():
            mine = [i for i, r in enumerate(records) if r["meta"]["cluster"] == c]
            by_cluster[c] = summarize([verdicts[name][i]["correct"] for i in mine],
                                      generation_chance([records[i] for i in mine]))
        conditions.append({"name": name, "kind": kind, "data": diversity(data), "by_cluster": by_cluster,
                           **{m: summarize([v[m] for v in verdicts[name]], chance if m == "correct" else 0.0)
                              for m in MEASURES}})

    # --- the comparisons LIMA's claims are about ------------------------------------------------------------------
    def compare(a: str, b: str) -> dict:
        return {"a": a, "b": b, **{m: paired_difference([v[m] for v in verdicts[a]], [v[m] for v in verdicts[b]])
                                   for m in MEASURES}}

    curated, everything = f"curated {cfg.curated_size}", f"all {len(pool)}"
    smallest = f"random {min(cfg.sizes)}"
    comparisons = {"curated_vs_all": compare(curated, everything), "smallest_vs_all": compare(smallest, everything)}
    if cfg.curated_size in cfg.sizes:
        comparisons["curated_vs_random"] = compare(curated, f"random {cfg.curated_size}")
    results = {"config": asdict(cfg), "sft_steps": cfg.sft_steps, "pool": diversity(pool),
               "n_eval": len(records), "chance": chance, "conditions": conditions, "comparisons": comparisons,
               "seconds": time.perf_counter() - start}
    save_results(cfg.run, "lima", results)
    return results


# ---------------------------------------------------------------------------------------------------------
# The report section


def section(results: dict, run_dir: Path) -> list[str]:
    conditions = results["conditions"]
    randoms = [c for c in conditions if c["kind"] in ("random", "all")]
    curated = next(c for c in conditions if c["kind"] == "curated")
    plot_lines(Path(run_dir) / "experiments" / "lima.png", [c["data"]["n"] for c in randoms],
               {"held-in accuracy (random sets, whole pool)": [c["correct"] for c in randoms],
                "ends with EOS and has the answer form (same)": [c["format"] for c in randoms]},
               results["chance"], "chance (accuracy)", "SFT examples", xlabels=[str(c["data"]["n"]) for c in randoms],
               extra_points={f"accuracy, {curated['name']}": (curated["data"]["n"], curated["correct"]),
                             f"format, {curated['name']}": (curated["data"]["n"], curated["format"])})
    pool = results["pool"]
    n = results["n_eval"]
    lines = [
        "## LIMA: how much instruction data, and of what quality",
        "",
        f"The pool: {pool['n']} training records skewed as collected data is (clusters in the order "
        f"{', '.join(c.replace('_', ' ') for c in POOL_ORDER)}, each {CLUSTER_DECAY}x as common as the one before; "
        f"within a cluster each wording {WORDING_DECAY}x as common as the one before; the smallest cluster has "
        f"{pool['smallest_cluster']} records), {pool['damaged_share']:.0%} of outputs damaged (cut short, chatty, "
        f"said twice or wrong); with the world's open-ended demonstrations that end in a made-up detail, "
        f"{pool['unclean_share']:.0%} fail the checks. Random sets are nested starts of one shuffle; the curated "
        "set keeps only outputs that pass the world's scorer and the answer-form check, spread evenly over clusters "
        f"and wordings. Every set is tuned for {results['sft_steps']} SFT steps from the run's pretrained model. "
        f"Measured on the same {n} held-in test records (all clusters, wordings seen in training); chance level of "
        f"accuracy {results['chance']:.0%} (a random label for sentiment and entailment, ~0 for free-text answers); "
        "the format measures have no chance "
        "level (they describe the text, not a choice). Cells: share [Wilson 95% interval].",
        "",
        "| training set | examples | fail the checks | clusters | wordings | smallest cluster | n | accuracy "
        "| ends with EOS | answer form | EOS and form |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conditions:
        d = c["data"]
        lines.append(f"| {c['name']} | {d['n']} | {d['unclean_share']:.0%} | {d['clusters']} | {d['wordings']} | "
                     f"{d['smallest_cluster']} | {c['correct']['n']} | {cell(c['correct'])} | {cell(c['eos'])} | "
                     f"{cell(c['form'])} | {cell(c['format'])} |")
    clusters = list(conditions[0]["by_cluster"])
    first = conditions[0]["by_cluster"]
    lines += ["", "Accuracy per cluster (n and chance under each name):", "",
              "| training set | " + " | ".join(f"{c.replace('_', ' ')} (n {first[c]['n']}, chance {chance_cell(first[c])})"
                                             for c in clusters) + " |",
              "|---|" + "---:|" * len(clusters)]
    for c in conditions:
        lines.append(f"| {c['name']} | " + " | ".join(cell(c["by_cluster"][k]) for k in clusters) + " |")
    lines += ["", "![LIMA: data size and curation](experiments/lima.png)", ""]
    lines += findings(results)
    return lines + [""]


def overall(diffs) -> str:
    """'higher' or 'lower' when some measure moves that way and none the other, 'mixed' when both happen."""
    seen = {direction(d) for d in diffs} - {"indistinguishable"}
    return seen.pop() if len(seen) == 1 else "mixed" if seen else "indistinguishable"


def superficial_reading(small: dict, pool: dict) -> str:
    """Whether format comes from fewer examples than accuracy: the share of the pool's score the small set
    reaches on each (100 examples at 70% format against the pool's 80%, and 14% accuracy against 29%: 88% of
    the format, 48% of the accuracy)."""
    if pool["format"]["accuracy"] < ALIGNED:
        return (f"The whole pool itself gives the answer form on only {pool['format']['accuracy']:.0%} of answers at "
                "this budget, so the hypothesis is not put to the test here.")
    share_format = small["format"]["accuracy"] / pool["format"]["accuracy"]
    share_correct = small["correct"]["accuracy"] / pool["correct"]["accuracy"] if pool["correct"]["accuracy"] else 1.0
    shares = (f"{small['data']['n']} examples reach {share_format:.0%} of the pool's format score and "
              f"{share_correct:.0%} of its accuracy")
    if share_format > share_correct:
        return f"{shares}: format comes from fewer examples than accuracy, as the hypothesis says."
    return f"{shares}: format does not come sooner than accuracy here, unlike what the hypothesis says."


def findings(results: dict) -> list[str]:
    """LIMA's and the lecture's claims, each beside the numbers that bear on it."""
    cmp = results["comparisons"]
    by_name = {c["name"]: c for c in results["conditions"]}
    small, full = cmp["smallest_vs_all"], cmp["curated_vs_all"]
    words = {"higher": "higher than", "lower": "lower than", "indistinguishable": "indistinguishable from"}
    lines = ["**Beside LIMA's claims:**", ""]
    a, b = by_name[small["a"]], by_name[small["b"]]
    lines.append(
        f"- *Superficial alignment* (format is learned from few examples, knowledge comes from pretraining): with "
        f"{a['data']['n']} random examples the format score (EOS and answer form) is {cell(a['format'])}, "
        f"{words[direction(small['format'])]} the whole pool's {cell(b['format'])} ({diff_cell(small['format'])}); "
        f"accuracy is {cell(a['correct'])} against {cell(b['correct'])} ({diff_cell(small['correct'])}). "
        + superficial_reading(a, b))
    c, p = by_name[full["a"]], by_name[full["b"]]
    lines.append(
        f"- *About 1,000 curated examples suffice*: {c['name']} against all {p['data']['n']} pool examples "
        f"({p['data']['unclean_share']:.0%} failing the checks): accuracy {diff_cell(full['correct'])}, format "
        f"{diff_cell(full['format'])}: the curated set is {words[direction(full['correct'])]} the pool on accuracy "
        f"and {words[direction(full['format'])]} it on format; "
        + ("the larger pool still buys accuracy here." if direction(full["correct"]) == "lower" else
           "the larger pool still buys format here." if direction(full["format"]) == "lower" else
           "consistent with LIMA: fewer, clean examples do as well as all of them or better."
           if c["format"]["accuracy"] >= ALIGNED else
           f"but the curated set gives the answer form on only {c['format']['accuracy']:.0%} of answers, so neither "
           "set is aligned enough for the comparison to say much."))
    if "curated_vs_random" in cmp:
        q = cmp["curated_vs_random"]
        lines.append(
            f"- *Quality and diversity over quantity* (LIMA's ablations; the lecture's claim that better instruction "
            f"data lets smaller data do well): curated against random at the same size: accuracy "
            f"{diff_cell(q['correct'])}, format {diff_cell(q['format'])} (n = {q['correct']['n']}); "
            + {"higher": "reproduced.", "lower": "reversed: the random set does better here.",
               "mixed": "mixed: one measure is higher and the other lower.",
               "indistinguishable": "not reproduced at this scale."}[overall((q["correct"], q["format"]))])
    return lines
