"""AI-text detection on lmforge's own models: can the zero-shot scores of `apps/detect.py` tell text the models
wrote from text they did not?

    lmforge experiment detect --run runs/world

The protocol is applications.md §5's:

- **Human side.** (1) *World*: the run's held-out validation documents (world/corpus/valid.jsonl), written by
  the world's generator and never trained on. (2) *Outside text*, from the shared data folder when it is
  present: TinyStories paragraphs and Gutenberg book paragraphs. TinyStories was itself written by GPT-3.5/4,
  so "human" there means "not written by our model"; Gutenberg is human prose.
- **Machine side.** Each human text (cut to --max-tokens) is continued by a model from its first --prompt-tokens
  tokens (at most half the text, so the model writes at least half of each machine text), up to the human
  text's length or EOS; each pair is then trimmed to the same number of tokens (backing off a token where the
  cut would split a UTF-8 character). Pairs whose machine part is shorter than --min-new-tokens are dropped.
  World texts are continued by the base model at T = 1, with top-p and greedily, and by the SFT model at T = 1;
  outside text by the base model at T = 1.
- **Detectors.** Log-likelihood, log-rank, entropy, GLTR's top-10 share, Fast-DetectGPT and a cross-fitted
  GLTR logistic regression under the base (pretrained) model; Binoculars with the base model as observer and
  the SFT model as performer. AUROC with a paired bootstrap interval and TPR at 1% FPR, human 0 / machine 1.

The world models never saw TinyStories or Gutenberg: their continuations of such a prefix fall back towards
world text, which their own scores find far more probable than the foreign prefix around it. The outside
setting therefore measures how a detector reacts to text foreign to its models, not how well it spots fluent
machine text in one domain; the world setting is the like-for-like test.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lmforge.errors import BadConfigError


@dataclass(frozen=True)
class Config:
    run: str = "runs/world"
    """Run directory (`lmforge run`): its base and SFT checkpoints and held-out world documents are used."""
    quick: bool = False
    """A handful of texts per setting: checks the machinery, no finding promised."""
    n_texts: int = 300
    """Human texts per setting (the world has 300 held-out documents in a default run)."""
    prompt_tokens: int = 30
    """Tokens of each human text the model continues (at most half of the text)."""
    max_tokens: int = 128
    """Human texts are cut to this many tokens (and to the model's context)."""
    min_new_tokens: int = 8
    """Pairs whose machine part is shorter than this are dropped."""
    top_p: float = 0.9
    """Nucleus of the base model's second set of world samples."""
    data_dir: str = ""
    """Shared data folder holding pretrain/tinystories and pretrain/gutenberg (default: ../shared/data, or
    $LMFORGE_SHARED/data); the outside-text setting is skipped when they are absent."""
    batch_size: int = 32
    bootstrap_rounds: int = 1000
    seed: int = 0
    progress: bool = True


QUICK = dict(n_texts=16, bootstrap_rounds=50)
PRIMARY = "base, T=1"  # the machine source of the ROC figure and of the example pair in the report


# ---------------------------------------------------------------------------------------------------------
# Human texts


def world_documents(run_dir: Path) -> list[str]:
    path = run_dir / "world" / "corpus" / "valid.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each on one line."""
    text = text.replace("\r\n", "\n").removeprefix("\ufeff")
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def gutenberg_body(text: str) -> str:
    """The book between Project Gutenberg's `*** START OF ...` and `*** END OF ...` lines (the licence is not prose)."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, flags=re.MULTILINE)
    end = re.search(r"^\*\*\* ?END OF.*$", text, flags=re.MULTILINE)
    return text[start.end() if start else 0:end.start() if end else len(text)]


def outside_sources(data_dir: Path) -> dict[str, list[list[str]]]:
    """name -> paragraphs per file, for the outside-text sources present under data_dir/pretrain."""
    sources = {}
    stories = data_dir / "pretrain" / "tinystories" / "tinystories_val.txt"
    if stories.is_file():
        sources["tinystories"] = [paragraphs(stories.read_text(encoding="utf-8"))]
    books = sorted((data_dir / "pretrain" / "gutenberg").glob("*.txt"))
    if books:
        sources["gutenberg"] = [paragraphs(gutenberg_body(b.read_text(encoding="utf-8-sig"))) for b in books]
    return sources


def pick_passages(groups: list[list[str]], tokenizer, n: int, min_tokens: int, seed: int) -> list[str]:
    """n paragraphs of at least min_tokens tokens, drawn at random and taken from each group (book) in turn."""
    rng = random.Random(seed)
    shuffled = [rng.sample(group, len(group)) for group in groups]
    picked = []
    for text in itertools.chain.from_iterable(itertools.zip_longest(*shuffled)):
        if text is not None and len(tokenizer.encode(text)) >= min_tokens:
            picked.append(text)
            if len(picked) == n:
                break
    return picked


# ---------------------------------------------------------------------------------------------------------
# Machine continuations, trimmed into pairs


def _clean_cut(tokenizer, ids: list[int]) -> bool:
    """Whether the ids decode without a split UTF-8 character at the end (byte-level BPE shows one as U+FFFD)."""
    return not tokenizer.decode(ids).endswith("\ufffd")


def continuation_pairs(model, tokenizer, human_texts: list[str], max_tokens: int, prompt_tokens: int,
                       min_new_tokens: int, temperature: float, top_p: float, seed: int,
                       batch_size: int = 32) -> tuple[list[dict], int]:
    """(pairs, dropped): each pair {index (of its human text), human, machine, tokens, prompt_tokens} trimmed to
    one token length, and the number of texts whose continuation was too short to keep."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    max_tokens = min(max_tokens, model.cfg.max_seq_len - 1)  # BOS + the text must fit the context
    humans = [tokenizer.encode(text)[:max_tokens] for text in human_texts]
    cuts = []
    for h in humans:  # a prompt that ends inside a UTF-8 character would leave the model to finish its bytes
        k = min(prompt_tokens, len(h) // 2)
        while k > 1 and not _clean_cut(tokenizer, h[:k]):
            k -= 1
        cuts.append(k)
    params = [SamplingParams(max_new_tokens=len(h) - k, temperature=temperature, top_p=top_p, seed=seed + i)
              for i, (h, k) in enumerate(zip(humans, cuts))]
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    outputs = engine.generate([[tokenizer.bos_id, *h[:k]] for h, k in zip(humans, cuts)], params)
    pairs, dropped = [], 0
    for index, (human, k, out) in enumerate(zip(humans, cuts, outputs)):
        new = list(itertools.takewhile(lambda t: t != tokenizer.eos_id, out.token_ids))
        machine = human[:k] + new
        n = min(len(human), len(machine))
        while n > k and not (_clean_cut(tokenizer, human[:n]) and _clean_cut(tokenizer, machine[:n])):
            n -= 1
        if n - k < min_new_tokens:
            dropped += 1
            continue
        pairs.append({"index": index, "human": tokenizer.decode(human[:n]), "machine": tokenizer.decode(machine[:n]),
                      "tokens": n, "prompt_tokens": k})
    return pairs, dropped


# ---------------------------------------------------------------------------------------------------------
# One comparison: human texts against one machine source


def compare(pairs: list[dict], base, sft, tokenizer, cfg: Config) -> dict:
    """Every detector on the pairs: single-model scores under the base model, Binoculars with the base model
    as observer and the SFT model as performer."""
    from lmforge.apps.detect import GLTR_BUCKETS, evaluate_detectors, score_texts

    texts = [p["human"] for p in pairs] + [p["machine"] for p in pairs]
    rows = score_texts(base, tokenizer, texts, batch_size=cfg.batch_size)
    binoculars = score_texts(sft, tokenizer, texts, observer=base, batch_size=cfg.batch_size)
    for row, b in zip(rows, binoculars):
        row.update(log_ppl=b["log_ppl"], log_xppl=b["log_xppl"], binoculars=b["binoculars"])
    human, machine = rows[:len(pairs)], rows[len(pairs):]
    return {
        "pairs": len(pairs),
        "mean_tokens": float(np.mean([p["tokens"] for p in pairs])),
        "identical": sum(p["human"] == p["machine"] for p in pairs),
        "detectors": evaluate_detectors(human, machine, cfg.bootstrap_rounds, cfg.seed, paired=True),
        "gltr": {side: [float(np.mean([r[b] for r in side_rows])) for b in GLTR_BUCKETS]
                 for side, side_rows in (("human", human), ("machine", machine))},
        "binoculars_terms": {side: {t: float(np.mean([r[t] for r in side_rows])) for t in ("log_ppl", "log_xppl")}
                             for side, side_rows in (("human", human), ("machine", machine))},
        "per_text": {"human": human, "machine": machine},  # for the figure; left out of the saved results
    }


def roc_points(human: np.ndarray, machine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold "flag when value >= t", from flagging nothing to flagging everything."""
    thresholds = np.unique(np.concatenate([human, machine]))[::-1]
    fpr = (human[None, :] >= thresholds[:, None]).mean(1)
    tpr = (machine[None, :] >= thresholds[:, None]).mean(1)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def plot_roc(settings: dict, picture: Path) -> None:
    """ROC curves of every detector on the primary machine source of each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.apps.detect import DETECTORS, detector_values

    shown = {name: s for name, s in settings.items() if "sources" in s and PRIMARY in s["sources"]}
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 4.6), dpi=110, squeeze=False)
    for ax, (name, setting) in zip(axes[0], shown.items()):
        values = setting["sources"][PRIMARY]["per_text"]
        for detector in DETECTORS:
            if DETECTORS[detector][0] in values["human"][0]:
                fpr, tpr = roc_points(detector_values(values["human"], detector),
                                      detector_values(values["machine"], detector))
                auc = setting["sources"][PRIMARY]["detectors"][detector]["auroc"]
                ax.plot(fpr, tpr, label=f"{detector} ({auc:.2f})")
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
        ax.axvline(0.01, color="tab:red", lw=0.8, ls="--")
        ax.set(title=f"{name}: human vs {PRIMARY} samples", xlabel="false-positive rate", ylabel="true-positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    picture.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(picture)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# The experiment


def source_label(generator: str, temperature: float, top_p: float) -> str:
    if temperature == 0:
        return f"{generator}, greedy"
    return f"{generator}, T={temperature:g}" + (f", top-p {top_p:g}" if top_p < 1 else "")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _write_pairs(path: Path, pairs: list[dict]) -> None:
    """The pairs as labelled JSONL that `lmforge detect` reads (human 0, machine 1)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, p in enumerate(pairs):
            for label, key in ((0, "human"), (1, "machine")):
                f.write(json.dumps({"text": p[key], "label": label, "pair": i}, ensure_ascii=False) + "\n")


def run(cfg: Config) -> dict:
    from lmforge.apps.detect import check_same_tokenizer
    from lmforge.checkpoint import load_checkpoint
    from lmforge.evaluate.benchmarks import data_root
    from lmforge.experiments import save_results

    cfg = replace(cfg, **QUICK) if cfg.quick else cfg
    run_dir = Path(cfg.run)
    base_dir, sft_dir = run_dir / "pretrain" / "final", run_dir / "sft" / "final"
    for path in (base_dir, sft_dir, run_dir / "world" / "corpus" / "valid.jsonl"):
        if not path.exists():
            raise BadConfigError(f"{path}: missing; run `lmforge run --out {run_dir}` first")
    work = run_dir / "experiments" / "detect"
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    # --- models: the base model writes and scores; Binoculars adds the SFT model as performer ---------------
    base, tokenizer, _ = load_checkpoint(base_dir)
    sft, sft_tokenizer, _ = load_checkpoint(sft_dir)
    base.eval()
    sft.eval()
    check_same_tokenizer(sft, sft_tokenizer, base, tokenizer, str(sft_dir), str(base_dir))
    generators = {"base": base, "SFT": sft}

    # --- human texts per setting ---------------------------------------------------------------------------
    world = world_documents(run_dir)
    humans = {"world": random.Random(cfg.seed).sample(world, min(cfg.n_texts, len(world)))}
    sources = {"world": [("base", 1.0, 1.0), ("base", 1.0, cfg.top_p), ("base", 0.0, 1.0), ("SFT", 1.0, 1.0)]}
    settings: dict[str, dict] = {}
    data_dir = data_root(cfg.data_dir)
    outside = outside_sources(data_dir)
    for name in ("tinystories", "gutenberg"):
        if name in outside:
            humans[name] = pick_passages(outside[name], tokenizer, cfg.n_texts, 2 * cfg.prompt_tokens, cfg.seed)
            sources[name] = [("base", 1.0, 1.0)]
        else:
            settings[name] = {"skipped": f"{data_dir / 'pretrain' / name} is absent"}

    # --- continue each human text, trim the pairs, score them with every detector -------------------------
    for name, texts in humans.items():
        settings[name] = {"human_texts": len(texts), "sources": {}}
        for generator, temperature, top_p in sources[name]:
            label = source_label(generator, temperature, top_p)
            t0 = time.perf_counter()
            pairs, dropped = continuation_pairs(generators[generator], tokenizer, texts, cfg.max_tokens,
                                                cfg.prompt_tokens, cfg.min_new_tokens, temperature, top_p,
                                                cfg.seed, cfg.batch_size)
            seconds[f"{name}: {label}: sampling"] = time.perf_counter() - t0
            if len(pairs) < 2:
                settings[name]["sources"][label] = {"pairs": len(pairs), "dropped": dropped}
                continue
            t0 = time.perf_counter()
            result = compare(pairs, base, sft, tokenizer, cfg)
            seconds[f"{name}: {label}: scoring"] = time.perf_counter() - t0
            result.update(dropped=dropped, example={k: pairs[0][k] for k in ("human", "machine")})
            _write_pairs(work / f"{name}_{_slug(label)}.jsonl", pairs)
            settings[name]["sources"][label] = result
            if cfg.progress:
                aucs = ", ".join(f"{d} {m['auroc']:.2f}" for d, m in result["detectors"].items())
                print(f"{name} vs {label}: {len(pairs)} pairs; AUROC {aucs}", flush=True)

    settings = {name: settings[name] for name in ("world", "tinystories", "gutenberg")}  # the report's order
    plot_roc(settings, run_dir / "experiments" / "detect.png")
    for setting in settings.values():
        for source in setting.get("sources", {}).values():
            source.pop("per_text", None)
    results = {"config": asdict(cfg), "models": {"observer": str(base_dir), "performer": str(sft_dir)},
               "settings": settings, "seconds": seconds}
    save_results(run_dir, "detect", results)
    return results


# ---------------------------------------------------------------------------------------------------------
# Report section


SETTING_TITLES = {
    "world": "World documents (held out, written by the world's generator) vs model continuations",
    "tinystories": "TinyStories (written by GPT-3.5/4, never seen by the world models) vs base-model continuations",
    "gutenberg": "Gutenberg paragraphs (human, never seen by the world models) vs base-model continuations",
}


def _cell(m: dict) -> str:
    from lmforge.apps.detect import format_auroc

    return f"{format_auroc(m)} | {100 * m['tpr']:.0f}%"


def section(results: dict, run_dir: Path) -> list[str]:
    cfg = results["config"]
    lines = [
        "## Experiment: AI-text detection",
        "",
        f"Human texts are continued by a model from their first {cfg['prompt_tokens']} tokens (at most half the "
        f"text), each pair trimmed to one length (at most {cfg['max_tokens']} tokens). Detectors score under the "
        "base model; Binoculars uses the base model as observer and the SFT model as performer. Label human 0, "
        "machine 1; AUROC with a paired-bootstrap 95% interval, TPR at the threshold that flags at most 1% of the "
        "human texts. The GLTR regression is fitted on labels (5-fold, out of fold); every other detector is "
        "zero-shot with its sign fixed in advance, so an AUROC below 0.5 means the premise fails here.",
    ]
    for name, setting in results["settings"].items():
        lines += ["", f"### {SETTING_TITLES.get(name, name)}", ""]
        if "skipped" in setting:
            lines.append(f"Skipped: {setting['skipped']}.")
            continue
        shown = {label: s for label, s in setting["sources"].items() if "detectors" in s}
        if not shown:
            lines.append("No source kept two pairs or more.")
            continue
        lines += ["| detector | " + " | ".join(f"{label}: AUROC | TPR@1%FPR" for label in shown) + " |",
                  "|---|" + "---|---|" * len(shown)]
        for detector in next(iter(shown.values()))["detectors"]:
            cells = " | ".join(_cell(s["detectors"][detector]) for s in shown.values())
            lines.append(f"| {detector} | {cells} |")
        lines += ["", "| machine source | pairs (dropped) | mean tokens | identical to the human text | "
                  "GLTR shares top-10/100/1000/beyond, human → machine | Binoculars' log PPL (SFT) / log X-PPL, human → machine |",
                  "|---|---|---|---|---|---|"]
        for label, s in shown.items():
            g, t = s["gltr"], s["binoculars_terms"]
            sides = ("human", "machine")
            shares = " → ".join("/".join(f"{100 * v:.0f}" for v in g[side]) for side in sides)
            terms = " → ".join(f"{t[side]['log_ppl']:.2f} / {t[side]['log_xppl']:.2f}" for side in sides)
            lines.append(f"| {label} | {s['pairs']} ({s['dropped']}) | {s['mean_tokens']:.0f} | {s['identical']} | "
                         f"{shares} | {terms} |")
        example = shown.get(PRIMARY, {}).get("example")
        if example:
            lines += ["", f"First pair ({PRIMARY}), human: {_quote(example['human'])}; machine: "
                      f"{_quote(example['machine'])}"]
    if (run_dir / "experiments" / "detect.png").is_file():
        lines += ["", "![ROC curves](experiments/detect.png)"]
    lines += [
        "", "How to read the world table: a model that matched the world's generator exactly would draw its T = 1 "
        "samples from the human side's own distribution and leave every zero-shot detector at 0.5. Likelihood-based "
        "detectors rest on decoding that favours the model's likeliest tokens (top-p, greedy) more than the human "
        "writer does; an AUROC below 0.5 at T = 1 means the samples are less probable under the model than held-out "
        "documents: pure sampling reaches into the model's tails, where the generator's templates never go. "
        "Binoculars' performer is the SFT model, so on "
        "the SFT model's samples it scores with the model that wrote them.",
        "", "The outside texts are foreign to both world models: their continuations fall back to world text, which "
        "the base model scores far above the foreign prefix, so high AUROCs there measure a domain shift, not the "
        "detection of fluent machine text. TinyStories is itself machine-written (GPT-3.5/4), which our models "
        "cannot know.",
        "", f"Pairs as labelled JSONL for `lmforge detect`: `{run_dir}/experiments/detect/`."]
    return lines


def _quote(text: str, limit: int = 160) -> str:
    """One line of a text for a Markdown paragraph: newlines shown as ⏎, cut at `limit` characters."""
    text = text.replace("\n", " ⏎ ")
    return "“" + (text[:limit] + "…" if len(text) > limit else text) + "”"
