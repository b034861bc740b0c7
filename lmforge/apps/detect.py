"""AI-text detection: zero-shot scores of a text under language models, and how well each score separates
human from machine text.

    lmforge detect --model runs/world/sft/final --observer runs/world/pretrain/final texts.jsonl

**Scores per text** (applications.md §5), all from one forward pass per model over `[BOS] + text`, every
text token scored (a text longer than the context keeps its first max_seq_len tokens):

- *log-likelihood*: mean log p(x_t | x_<t);
- *log-rank*: mean log of each token's rank, 1-indexed, rank = 1 + the number of tokens with a strictly larger
  logit (a token tied with the top one has rank 1);
- *entropy*: mean predictive entropy -Σ_v p_v log p_v;
- *GLTR buckets*: the share of tokens ranked in the top 10, top 100, top 1000 and beyond (green, yellow, red,
  purple in GLTR's overlay);
- *Fast-DetectGPT* (analytic form, Bao et al. 2024): DetectGPT's curvature without perturbation models,
  (Σ_t log p(x_t) - Σ_t E_p[log p]) / sqrt(Σ_t Var_p[log p]), with the scoring model as its own sampler.
  DetectGPT proper (T5 span refills) is not implemented;
- *Binoculars* (Hans et al. 2024): B = log PPL / log X-PPL, with log PPL the mean cross-entropy of the text
  under the **performer** (the released code's choice; the paper's notation attaches it to the observer) and
  log X-PPL the mean over positions of -Σ_v p_observer(v) log p_performer(v). Observer and performer must
  share a tokenizer. Low B means machine text.

**Detectors** turn a score into "higher = more machine-like" with a fixed sign (table `DETECTORS`), so human
texts are label 0 and machine texts label 1 everywhere. The signs are set in advance, not fitted: an AUROC
below 0.5 means the sign's premise fails on that data. The one fitted detector is a logistic regression on
the four GLTR bucket shares, scored out of fold (`gltr_logistic_scores`).

**Metrics.**
- AUROC = P(machine score > human score) + ½ P(tie), the Mann-Whitney U statistic over all human × machine
  pairs. Worked example: human [1, 2, 3], machine [2, 4]: the 2 beats 1 and ties 2 (1.5), the 4 beats all
  three (3), so AUROC = 4.5 / 6 = 0.75.
- TPR at 1% FPR: with n human texts, at most k = floor(0.01 n) of them may be flagged; the threshold is the
  (k+1)-th highest human score (the 99th percentile) and a text is flagged when its score is *strictly* above
  it, so a tie at the threshold counts as human and the realised FPR never exceeds 1%. Below 100 human texts
  k = 0: the threshold is the highest human score.
- 95% intervals for AUROC by the bootstrap: paired texts (a human text and its machine continuation) are
  resampled together, unpaired ones class by class.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import tyro

from lmforge.errors import BadConfigError, BadFileError, MismatchError

GLTR_BUCKETS = ("gltr_top10", "gltr_top100", "gltr_top1000", "gltr_beyond")  # ranks 1-10, 11-100, 101-1000, > 1000

# detector -> (per-text score, sign); the detector's value is sign * score, higher = more machine-like.
DETECTORS: dict[str, tuple[str, float]] = {
    "log-likelihood": ("loglik", 1.0),         # a model finds text like its own more probable
    "log-rank": ("logrank", -1.0),             # ... and ranks its tokens nearer the top
    "entropy": ("entropy", -1.0),              # ... and is surer of what comes next
    "GLTR top-10": ("gltr_top10", 1.0),        # GLTR's green share
    "Fast-DetectGPT": ("fast_detectgpt", 1.0),  # sampled text sits above the model's typical log-likelihood
    "Binoculars": ("binoculars", -1.0),         # low B = machine
}


# ---------------------------------------------------------------------------------------------------------
# Scores per token, then per text


def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position of logits (B, T, V) and targets (B, T): log p of the target, its rank (1-indexed), the
    predictive entropy, and the mean and variance of log p under the model's own distribution."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)  # (B, T, V)
    p = logp.exp()
    target_logit = logits.gather(-1, targets[..., None])  # (B, T, 1)
    expected_logp = (p * logp).sum(-1)  # (B, T)
    return {
        "logp": logp.gather(-1, targets[..., None])[..., 0],
        "rank": 1 + (logits > target_logit).sum(-1),
        "entropy": -expected_logp,
        "expected_logp": expected_logp,
        "var_logp": (p * logp.square()).sum(-1) - expected_logp.square(),
    }


def binoculars_terms(observer_logits: torch.Tensor, performer_logits: torch.Tensor,
                     targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (B, T): the performer's cross-entropy on the text (log PPL's term, as in the released code)
    and the cross-entropy of the observer's next-token distribution against the performer's (log X-PPL's)."""
    performer_logp = F.log_softmax(performer_logits.float(), dim=-1)  # (B, T, V)
    performer_nll = -performer_logp.gather(-1, targets[..., None])[..., 0]
    cross_entropy = -(F.softmax(observer_logits.float(), dim=-1) * performer_logp).sum(-1)
    return performer_nll, cross_entropy


def _text_scores(stats: dict[str, torch.Tensor], row: int, n: int) -> dict:
    """The per-text scores, from the first n positions of one row (the rest is padding)."""
    s = {k: v[row, :n].double() for k, v in stats.items()}
    rank = s["rank"]
    shares = [(rank <= 10).double().mean(), ((rank > 10) & (rank <= 100)).double().mean(),
              ((rank > 100) & (rank <= 1000)).double().mean(), (rank > 1000).double().mean()]
    curvature = (s["logp"].sum() - s["expected_logp"].sum()) / s["var_logp"].sum().clamp_min(1e-12).sqrt()
    return {"n_tokens": n, "loglik": s["logp"].mean().item(), "logrank": rank.log().mean().item(),
            "entropy": s["entropy"].mean().item(), **{b: v.item() for b, v in zip(GLTR_BUCKETS, shares)},
            "fast_detectgpt": curvature.item()}


@torch.no_grad()
def score_token_ids(model, sequences: list[list[int]], pad_id: int, observer=None, batch_size: int = 32) -> list[dict]:
    """Scores of each sequence ([BOS] + text ids, at most the context + 1 long) under `model`, plus Binoculars
    with `model` as performer when an observer is given. Sequences are batched by length, right-padded (causal
    attention never lets a real token see the padding after it), and returned in the order given."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    results = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in chunk) - 1
        inputs = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        targets = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = torch.tensor(sequences[i])
            inputs[row, :len(ids) - 1], targets[row, :len(ids) - 1] = ids[:-1], ids[1:]
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)  # (B, T, V)
        stats = token_statistics(logits, targets)
        if observer is not None:
            performer_nll, cross_entropy = binoculars_terms(observer(inputs), logits, targets)
        for row, i in enumerate(chunk):
            n = len(sequences[i]) - 1
            results[i] = _text_scores(stats, row, n)
            if observer is not None:
                log_ppl = performer_nll[row, :n].double().mean().item()
                log_xppl = cross_entropy[row, :n].double().mean().item()
                results[i].update(log_ppl=log_ppl, log_xppl=log_xppl, binoculars=log_ppl / log_xppl)
    return results


def check_same_tokenizer(model, tokenizer, observer, observer_tokenizer, model_path: str = "--model",
                         observer_path: str = "--observer") -> None:
    """Binoculars compares two distributions position by position over one token sequence: both models must
    read the same ids and predict over the same vocabulary."""
    if tokenizer.fingerprint() != observer_tokenizer.fingerprint():
        raise MismatchError(f"{observer_path}: its tokenizer differs from {model_path}'s; Binoculars needs an "
                            "observer and a performer that share one tokenizer (a base model and its fine-tune)")
    if model.cfg.vocab_size != observer.cfg.vocab_size:
        raise MismatchError(f"{observer_path}: {observer.cfg.vocab_size} output logits, but {model_path} has "
                            f"{model.cfg.vocab_size}; Binoculars needs the same vocabulary in both")


def score_texts(model, tokenizer, texts: list[str], observer=None, batch_size: int = 32) -> list[dict]:
    """`score_token_ids` on texts; each text's scores say whether it was cut to fit the context (`truncated`).
    The observer, if any, must share `tokenizer` (see `check_same_tokenizer`)."""
    context = min(model.cfg.max_seq_len, observer.cfg.max_seq_len if observer is not None else model.cfg.max_seq_len)
    keep = context + 1  # the models read `context` inputs and predict one more target
    sequences = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in texts]
    for i, ids in enumerate(sequences):
        if len(ids) < 2:
            raise BadConfigError(f"text {i} is empty: nothing to score")
    rows = score_token_ids(model, [ids[:keep] for ids in sequences], tokenizer.pad_id, observer, batch_size)
    for row, ids in zip(rows, sequences):
        row["truncated"] = len(ids) > keep
    return rows


# ---------------------------------------------------------------------------------------------------------
# Detectors and their metrics


def detector_values(rows: list[dict], detector: str) -> np.ndarray:
    """The detector's value for each text (higher = more machine-like)."""
    field, sign = DETECTORS[detector]
    return sign * np.array([row[field] for row in rows], dtype=float)


def auroc(human: np.ndarray, machine: np.ndarray) -> float:
    """P(machine > human) + ½ P(tie) over all pairs (Mann-Whitney U / (n_h n_m)); see the module docstring."""
    human, machine = np.sort(np.asarray(human, dtype=float)), np.asarray(machine, dtype=float)
    below = np.searchsorted(human, machine, side="left")      # human scores strictly below each machine score
    not_above = np.searchsorted(human, machine, side="right")  # ... below or tied with it
    return float((below + not_above).sum() / 2 / (len(human) * len(machine)))


def tpr_at_fpr(human: np.ndarray, machine: np.ndarray, fpr: float = 0.01) -> dict:
    """The share of machine texts flagged at the threshold that flags at most floor(fpr * n_human) human texts:
    the (k+1)-th highest human score, ties at it counted as human (see the module docstring)."""
    human, machine = np.asarray(human, dtype=float), np.asarray(machine, dtype=float)
    # human texts allowed above the threshold; the epsilon keeps 0.29 * 100 = 28.999999999999996 at 29
    k = math.floor(fpr * len(human) + 1e-9)
    threshold = float(np.sort(human)[::-1][k])
    return {"tpr": float((machine > threshold).mean()), "fpr": float((human > threshold).mean()),
            "threshold": threshold}


def bootstrap_auroc(human: np.ndarray, machine: np.ndarray, rounds: int = 1000, seed: int = 0,
                    paired: bool = False) -> tuple[float, float]:
    """95% percentile interval of AUROC. Paired: human[i] and machine[i] belong together (a text and its
    continuation) and are resampled as one unit."""
    human, machine = np.asarray(human, dtype=float), np.asarray(machine, dtype=float)
    if paired and len(human) != len(machine):
        raise BadConfigError(f"paired bootstrap needs as many human as machine texts, got {len(human)} and {len(machine)}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        h = rng.integers(0, len(human), len(human))
        m = h if paired else rng.integers(0, len(machine), len(machine))
        values.append(auroc(human[h], machine[m]))
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1.0, steps: int = 50) -> np.ndarray:
    """Logistic regression by Newton's method: weights (intercept first) minimising the log-loss plus
    ½ l2 ‖w‖² on the non-intercept weights (scikit-learn's objective with C = 1 / l2)."""
    x = np.hstack([np.ones((len(features), 1)), features])  # (N, 1 + d)
    penalty = l2 * np.diag([0.0] + [1.0] * features.shape[1])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        gradient = x.T @ (p - labels) + penalty @ w
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def gltr_logistic_scores(human_rows: list[dict], machine_rows: list[dict], folds: int = 5, seed: int = 0,
                         paired: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold log-odds of "machine" from a logistic regression on the four GLTR bucket shares: each text is
    scored by a model fitted on the other folds (paired texts share a fold), so no text grades itself."""
    features = np.array([[row[b] for b in GLTR_BUCKETS] for row in human_rows + machine_rows])
    labels = np.array([0] * len(human_rows) + [1] * len(machine_rows), dtype=float)
    rng = np.random.default_rng(seed)
    fold_h = rng.permutation(len(human_rows)) % folds
    fold_m = fold_h if paired else rng.permutation(len(machine_rows)) % folds
    fold = np.concatenate([fold_h, fold_m])
    scores = np.zeros(len(labels))
    for f in range(folds):
        test = fold == f
        w = fit_logistic(features[~test], labels[~test])
        scores[test] = w[0] + features[test] @ w[1:]
    return scores[:len(human_rows)], scores[len(human_rows):]


def evaluate_detectors(human_rows: list[dict], machine_rows: list[dict], rounds: int = 1000, seed: int = 0,
                       paired: bool = False, folds: int = 5) -> dict[str, dict]:
    """AUROC (with a bootstrap interval when rounds > 0), TPR at 1% FPR and mean values per detector; Binoculars
    only when the rows carry it, the GLTR regression only when every fold can hold both classes."""
    values = {name: (detector_values(human_rows, name), detector_values(machine_rows, name))
              for name, (field, _) in DETECTORS.items() if field in human_rows[0]}
    if min(len(human_rows), len(machine_rows)) >= 2 * folds:
        values["GLTR logistic regression"] = gltr_logistic_scores(human_rows, machine_rows, folds, seed, paired)
    metrics = {}
    for name, (human, machine) in values.items():
        metrics[name] = {"auroc": auroc(human, machine), **tpr_at_fpr(human, machine),
                         "mean_human": float(human.mean()), "mean_machine": float(machine.mean())}
        if rounds:
            metrics[name]["auroc_interval"] = bootstrap_auroc(human, machine, rounds, seed, paired)
    return metrics


def format_auroc(metrics: dict) -> str:
    """"0.912 [0.880, 0.940]": a detector's AUROC and its bootstrap interval, when it has one."""
    interval = " [{:.3f}, {:.3f}]".format(*metrics["auroc_interval"]) if "auroc_interval" in metrics else ""
    return f"{metrics['auroc']:.3f}{interval}"


# ---------------------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class DetectConfig:
    files: Annotated[tuple[str, ...], tyro.conf.Positional,
                     tyro.conf.arg(metavar="FILE...", help_behavior_hint="(required)")]
    """Texts to score: a .txt file is one text; a .jsonl file holds one record per line with a text field and,
    optionally, a label (0 or "human", 1 or "machine")."""
    model: str
    """Scoring model (a checkpoint or a local Hugging Face causal LM); the performer of Binoculars."""
    observer: str = ""
    """Binoculars' observer, sharing the model's tokenizer (e.g. the base model of an instruction-tuned --model)."""
    text_field: str = "text"
    label_field: str = "label"
    batch_size: int = 32
    """Texts per forward pass (each holds batch x length x vocabulary floats several times: lower it for large
    vocabularies)."""
    bootstrap_rounds: int = 1000
    """Bootstrap rounds for the AUROC intervals (0: none)."""
    seed: int = 0
    out: str = ""
    """Also write the per-text scores and the metrics as JSON here."""
    device: str = "auto"


LABELS = {0: 0, 1: 1, "human": 0, "machine": 1}


def read_texts(paths: tuple[str, ...], text_field: str, label_field: str) -> list[dict]:
    """{source, text, label or None} per text, in file order; errors name the file (and line)."""
    from lmforge.data.corpus import read_documents

    records = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise BadFileError(f"{path}: no such file")
        found = []
        if p.suffix.lower() == ".jsonl":
            for lineno, line in enumerate(p.read_text(encoding="utf-8-sig").splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadFileError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise BadFileError(f"{where}: no string field {text_field!r}")
                label = record.get(label_field)
                if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))
                                          or label not in LABELS):
                    raise BadFileError(f"{where}: {label_field} must be 0, 1, \"human\" or \"machine\", got {label!r}")
                if not record[text_field].strip():
                    raise BadFileError(f"{where}: empty text, nothing to score")
                found.append({"source": where, "text": record[text_field],
                              "label": None if label is None else LABELS[label]})
        else:
            found = [{"source": path, "text": text, "label": None} for text in read_documents(path, text_field)]
        if not found or any(not record["text"].strip() for record in found):
            raise BadFileError(f"{path}: empty file, nothing to score")
        records += found
    return records


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [header, *rows])


def run_detect(cfg: DetectConfig) -> dict:
    from lmforge.hf import load_model
    from lmforge.train.loop import pick_device

    if not cfg.files:
        raise BadConfigError("no files given: name one or more text or JSONL files to score")
    records = read_texts(cfg.files, cfg.text_field, cfg.label_field)
    device = pick_device(cfg.device)
    model, tokenizer = load_model(cfg.model, device=device)
    observer = None
    if cfg.observer:
        observer, observer_tokenizer = load_model(cfg.observer, device=device)
        check_same_tokenizer(model, tokenizer, observer, observer_tokenizer, cfg.model, cfg.observer)
        observer.eval()
    model.eval()
    rows = score_texts(model, tokenizer, [r["text"] for r in records], observer, cfg.batch_size)
    texts = [{"source": r["source"], "label": r["label"], **row} for r, row in zip(records, rows)]

    labels = [r["label"] for r in records]
    metrics = {}
    if all(label is not None for label in labels) and len(set(labels)) == 2:
        human = [t for t in texts if t["label"] == 0]
        machine = [t for t in texts if t["label"] == 1]
        metrics = evaluate_detectors(human, machine, cfg.bootstrap_rounds, cfg.seed)
        print(_table(["detector", "mean human", "mean machine", "AUROC [95% CI]", "TPR@1%FPR"],
                     [[name, f"{m['mean_human']:.3f}", f"{m['mean_machine']:.3f}",
                       format_auroc(m), f"{m['tpr']:.3f}"] for name, m in metrics.items()]))
        print(f"{len(human)} human and {len(machine)} machine texts; detector values are signed so that higher "
              "means machine; TPR at the threshold flagging at most 1% of the human texts")
    else:
        fields = [field for field, _ in DETECTORS.values() if field in texts[0]]
        print(_table(["text", "tokens", *fields],
                     [[t["source"], str(t["n_tokens"]), *(f"{t[f]:.3f}" for f in fields)] for t in texts]))
        if any(label is not None for label in labels):
            print("AUROC needs a label on every text and both labels present", file=sys.stderr)
    truncated = sum(t["truncated"] for t in texts)
    if truncated:
        print(f"{truncated} texts were cut to the model's context of {model.cfg.max_seq_len} tokens", file=sys.stderr)

    result = {"config": asdict(cfg), "n_texts": len(texts), "n_truncated": truncated, "metrics": metrics,
              "texts": texts}
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {out}", file=sys.stderr)
    return result
