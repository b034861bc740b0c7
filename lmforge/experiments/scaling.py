"""`lmforge experiment scaling`: the scaling law, measured. A grid of model sizes x token budgets is pretrained
on one corpus; power laws are fitted to the held-out losses and one is used to predict a model it never saw.

The lecture's claim (Kaplan et al. 2020, "Scaling Laws for Neural Language Models"): more parameters N, more
data D and more compute C = 6·N·D lower the loss along smooth power laws, so trends measured on small models
predict larger ones. What is measured here:

- **L(N)**: the loss of each size at the largest budget, fitted as E + A / N^alpha;
- **L(D)**: the loss of the largest size at each budget, fitted as E + B / D^beta;
- **L(N, D)**: every run, fitted with Chinchilla's form E + A / N^alpha + B / D^beta (Hoffmann et al. 2022,
  approach 3: Huber loss on the log of the loss, the best of a grid of starting points);
- **the compute-optimal split** of the largest run's compute C: minimising L(N, D) under 6·N·D = C gives
  N_opt = G·(C/6)^(beta/(alpha+beta)) with G = (alpha·A / (beta·B))^(1/(alpha+beta)), D_opt = C / (6·N_opt); the
  tokens-per-parameter ratio is D_opt / N_opt (Chinchilla reads about 20);
- **a held-out prediction**: L(N) and L(N, D) fitted on every size but the largest, then asked for the largest
  one's loss, which is compared with the measured one.

N counts non-embedding parameters (Kaplan's choice: at these sizes the embedding table is a large, nearly
free share of the weights and bends the curve); C = 6·N·D with that N. Every point trains from scratch with
its own cosine schedule (a point read off a longer run's curve would sit higher: Chinchilla's correction of
Kaplan), one seed, one learning rate for every size. A point keeps its checkpoint and result under
RUN/experiments/scaling/CORPUS/SIZE-sSTEPS/ and is reused while its settings are unchanged, so a stopped sweep
resumes and `lmforge experiment emergence` evaluates the same models.

    lmforge experiment scaling --run runs/world                      # 5 sizes x 5 budgets on the world, CPU
    lmforge experiment scaling --run runs/world --quick              # a smoke test of the machinery
    lmforge experiment scaling --run runs/world --data ../shared/data/pretrain/tinystories/
    lmforge world export --out runs/world-big --n-train-docs 150000       # ~9M tokens for larger models
    lmforge experiment scaling --run runs/world --device cuda --sizes micro tiny small 384x8 512x8 \\
        --steps 125 250 500 1000 2000 --batch-size 32 --data runs/world-big/corpus/train.jsonl \\
        --valid-data runs/world-big/corpus/valid.jsonl --tokenizer runs/world/tokenizer
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lmforge.checkpoint import save_checkpoint
from lmforge.data.corpus import Source, TokenCorpus
from lmforge.errors import BadConfigError, BadFileError
from lmforge.experiments import save_results
from lmforge.model import PRESETS, ModelConfig, Transformer, count_parameters
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.train.loop import TrainConfig, train
from lmforge.train.pretrain import next_token_loss, prepare_corpus, validation_loss


@dataclass(frozen=True)
class Config:
    run: str = "runs/world"
    """Run directory (`lmforge run`): its world corpus and tokenizer are used, results go to RUN/experiments/."""
    quick: bool = False
    """Five tiny sizes x three short budgets: checks the machinery in well under a minute, no law promised."""
    sizes: tuple[str, ...] = ("32x2", "48x2", "nano", "96x3", "micro")
    """Model sizes, at least 3: preset names (`lmforge info`) or shapes DxL (d_model D, L layers, heads 32 wide)."""
    steps: tuple[int, ...] = (25, 50, 100, 200, 400)
    """Token budgets as optimizer steps of batch_size x seq_len tokens, at least 3; each point has its own schedule."""
    batch_size: int = 16
    seq_len: int = 0
    """Training window in tokens; 0: the run's pretraining window (config.toml), else 256."""
    lr: float = 3e-3
    """Peak learning rate of every size (warmup over a tenth of the steps, cosine decay to a tenth)."""
    data: tuple[str, ...] = ()
    """Another corpus instead of the run's world: .txt/.jsonl files or directories (e.g. the Gutenberg books)."""
    valid_data: tuple[str, ...] = ()
    """Held-out text for --data; default: 2% of its documents."""
    text_field: str = "text"
    tokenizer: str = ""
    """Tokenizer directory for --data; default: a byte-level BPE of --vocab-size trained on --data."""
    vocab_size: int = 1024
    seed: int = 0
    device: str = "auto"
    """auto: CUDA when available, else CPU."""
    progress: bool = True


QUICK = dict(sizes=("16x1", "24x1", "32x1", "32x2", "48x2"), steps=(10, 20, 40))
VALID_WINDOWS = 128  # all 73 of the world's 256-token held-out windows: a sample would add noise to every point
HUBER_DELTA = 1e-3  # Chinchilla's Huber threshold on log-loss residuals: a stray point cannot pull the fit
HELDOUT_TARGET = 0.05  # the bar for the held-out prediction: within 5% of the measured loss


def resolve(cfg: Config) -> Config:
    return replace(cfg, **QUICK) if cfg.quick else cfg


# ---------------------------------------------------------------------------------------------------------
# Sizes


def model_config(size: str, vocab_size: int, seq_len: int) -> ModelConfig:
    """A preset, or "DxL": d_model D and L layers, heads 32 wide (one head below d_model 64) and half as many
    key/value heads when the head count is even. 128x4 is the micro preset's shape and 256x8 the small one's;
    192x6 is tiny's with 3 key/value heads instead of 2."""
    if size in PRESETS:
        base = PRESETS[size]
    else:
        shape = re.fullmatch(r"(\d+)x(\d+)", size)
        if not shape:
            raise BadConfigError(f"--sizes: {size!r} is neither a preset ({', '.join(PRESETS)}) nor a shape DxL "
                                 "such as 96x3")
        d_model, n_layers = map(int, shape.groups())
        n_heads = max(1, d_model // 32)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise BadConfigError(f"--sizes: {size!r}: d_model {d_model} does not split into {n_heads} heads of an "
                                 "even width; use a multiple of 32")
        base = ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                           n_kv_heads=n_heads // 2 if n_heads % 2 == 0 else n_heads)
    return replace(base, vocab_size=vocab_size, max_seq_len=max(seq_len, base.max_seq_len))


def non_embedding_params(cfg: ModelConfig) -> int:
    """Every weight but the embedding table (and an untied output head): the N of Kaplan's laws."""
    counts = count_parameters(cfg)
    return counts["total"] - counts["embedding"] - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


# ---------------------------------------------------------------------------------------------------------
# The corpus: the run's world by default, any text by flag


def run_seq_len(run_dir: Path) -> int:
    """The pretraining window of a run (its config.toml), so the sweep's models read prompts as the run's do."""
    recipe = run_dir / "config.toml"
    if recipe.is_file():
        return int(tomllib.loads(recipe.read_text(encoding="utf-8")).get("seq_len", 256))
    return 256


def open_corpus(run_dir: Path, data: tuple[str, ...] = (), valid_data: tuple[str, ...] = (), text_field: str = "text",
                tokenizer_dir: str = "", vocab_size: int = 1024, seed: int = 0) -> tuple[str, Tokenizer, TokenCorpus]:
    """(corpus name, tokenizer, token shards). The world: the run's corpus files and tokenizer. Other text: a
    tokenizer trained on it (or given), shards under RUN/experiments/scaling/NAME/, reused while unchanged."""
    if not data:
        world = run_dir / "world" / "corpus"
        if not (world / "train.jsonl").is_file() or not (run_dir / "tokenizer" / "tokenizer.json").is_file():
            raise BadFileError(f"{run_dir}: not a run directory (no world/corpus/train.jsonl or tokenizer/); make one "
                               f"with `lmforge run --out {run_dir}`, or pass --data")
        name, tokenizer = "world", Tokenizer.load(run_dir / "tokenizer")
        sources, valid = [Source(str(world / "train.jsonl"))], [Source(str(world / "valid.jsonl"))]
    else:
        for path in (*data, *valid_data):
            if not Path(path).exists():
                raise BadFileError(f"--data {path}: no such file or directory")
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(data[0]).resolve().name) or "data"
        digest = hashlib.sha256(json.dumps([data, valid_data, text_field, tokenizer_dir, vocab_size]).encode())
        name = f"{stem}-{digest.hexdigest()[:8]}"
        sources = [Source(p, text_field=text_field, name=f"{i}-{Path(p).stem or 'data'}") for i, p in enumerate(data)]
        valid = [Source(p, text_field=text_field, name=s.name) for p, s in zip(valid_data, sources)]
        if not valid:
            sources = _enough_documents(sources, run_dir / "experiments" / "scaling" / name / "paragraphs.jsonl")
        tokenizer = _data_tokenizer(run_dir / "experiments" / "scaling" / name / "tokenizer", sources, tokenizer_dir,
                                    vocab_size)
    corpus = prepare_corpus(sources, valid, tokenizer, run_dir / "experiments" / "scaling" / name / "data", seed)
    return name, tokenizer, corpus


MIN_DOCUMENTS = 100  # the held-out 2% of fewer documents is one document or none


def _enough_documents(sources: list[Source], paragraphs: Path) -> list[Source]:
    """`sources`, or, when they hold fewer than MIN_DOCUMENTS documents (a book per .txt file, TinyStories in one
    file), their paragraphs (blank-line separated) as the documents of one JSONL file, so 2% can be held out."""
    from itertools import islice

    from lmforge.data.corpus import read_documents

    documents = (doc for s in sources for doc in read_documents(s.path, s.text_field))
    if sum(1 for _ in islice(documents, MIN_DOCUMENTS)) >= MIN_DOCUMENTS:
        return sources
    texts = [part.strip() for s in sources for doc in read_documents(s.path, s.text_field)
             for part in re.split(r"\n\s*\n", doc.replace("\r\n", "\n")) if part.strip()]
    paragraphs.parent.mkdir(parents=True, exist_ok=True)
    tmp = paragraphs.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    tmp.replace(paragraphs)
    return [Source(str(paragraphs), name="paragraphs")]


def _data_tokenizer(directory: Path, sources: list[Source], given: str, vocab_size: int) -> Tokenizer:
    from lmforge.data.corpus import read_documents

    if given:
        return Tokenizer.load(given)
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.load(directory)
    tokenizer = train_tokenizer((doc for s in sources for doc in read_documents(s.path, s.text_field)), vocab_size)
    tokenizer.save(directory)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# One point of the grid: a size trained for a budget, from scratch


def point_dir(run_dir: Path, corpus_name: str, size: str, steps: int) -> Path:
    return run_dir / "experiments" / "scaling" / corpus_name / f"{size}-s{steps}"


def train_point(directory: Path, corpus: TokenCorpus, tokenizer: Tokenizer, size: str, steps: int, batch_size: int,
                seq_len: int, lr: float, seed: int, device: str, progress: bool) -> dict:
    """Pretrain `size` for `steps` steps and measure its held-out loss; or return the saved result when
    `directory` holds this very point (same settings, same tokenizer and corpus). The checkpoint is
    directory/final; point.json holds the settings and the result."""
    model_cfg = model_config(size, tokenizer.vocab_size, seq_len)
    settings = {"size": size, "model": asdict(model_cfg), "steps": steps, "batch_size": batch_size,
                "seq_len": seq_len, "lr": lr, "seed": seed, "tokenizer": tokenizer.fingerprint(),
                # the corpus by its token counts, not its paths: `--run runs/world` and `--run ./runs/world` agree
                "corpus": [{k: s[k] for k in ("name", "weight", "train", "valid")} for s in corpus.meta["sources"]],
                "valid_windows": VALID_WINDOWS}
    stamp = directory / "point.json"
    if stamp.is_file() and (directory / "final" / "lmforge.json").is_file():
        saved = json.loads(stamp.read_text(encoding="utf-8"))
        if saved["settings"] == json.loads(json.dumps(settings)):
            return saved["result"] | {"reused": True}
    shutil.rmtree(directory, ignore_errors=True)

    train_cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                            eval_every=steps, log_every=max(1, steps // 10), seed=seed, device=device,
                            progress=progress)
    torch.manual_seed(seed)
    model = Transformer(model_cfg)

    def save(target, model, trainer_state=None, metrics=None):  # no optimizer state: a point is never resumed
        return save_checkpoint(target, model, tokenizer, configs={"scaling_point": settings}, metrics=metrics,
                               lineage={"stage": "scaling", "parent": None})

    start = time.perf_counter()
    last = train(model, lambda step: [corpus.train_batch(step, batch_size, seq_len, seed)], next_token_loss,
                 train_cfg, directory, save=save, resume=False,
                 evaluate=lambda m: {"val_loss": validation_loss(m, corpus, seq_len, max_windows=VALID_WINDOWS)})
    n = non_embedding_params(model_cfg)
    tokens = steps * batch_size * seq_len
    result = {"size": size, "steps": steps, "tokens": tokens, "params": n,
              "params_total": count_parameters(model_cfg)["total"], "compute": 6.0 * n * tokens,
              "val_loss": last["val_loss"], "train_loss": last["loss"], "seconds": time.perf_counter() - start,
              "checkpoint": str(directory / "final")}
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "result": result}, indent=2), encoding="utf-8")
    tmp.replace(stamp)
    return result | {"reused": False}


# ---------------------------------------------------------------------------------------------------------
# Fitting the laws


def law(fit: dict, params=None, tokens=None) -> np.ndarray:
    """E + A / N^alpha + B / D^beta, with the terms the fit has (L(N) has no D term, L(D) no N term)."""
    loss = fit["E"]
    if "alpha" in fit:
        loss = loss + fit["A"] / np.asarray(params, dtype=float) ** fit["alpha"]
    if "beta" in fit:
        loss = loss + fit["B"] / np.asarray(tokens, dtype=float) ** fit["beta"]
    return loss


def fit_law(losses, params=None, tokens=None) -> dict:
    """Fit L = E + A / N^alpha + B / D^beta to measured losses; pass `params` for the N term, `tokens` for the
    D term, or both for the joint law.

    As Chinchilla fits it: the residual is log(predicted) - log(measured), the loss on residuals is Huber's
    (delta 1e-3), and E, A, B are fitted as logarithms (so they stay positive, and the prediction is a
    log-sum-exp of the terms). Least squares from a grid of starting exponents and floors; the best fit wins.
    """
    losses = np.asarray(losses, dtype=float)
    axes = [np.log(np.asarray(x, dtype=float)) for x in (params, tokens) if x is not None]
    if not axes:
        raise BadConfigError("fit_law needs params, tokens or both")
    if not np.all(np.isfinite(losses)) or np.any(losses <= 0):
        raise BadConfigError(f"fit_law: losses must be positive numbers, got {losses.tolist()}")
    if len(losses) < 1 + 2 * len(axes):
        raise BadConfigError(f"fit_law: {len(losses)} points cannot fit {1 + 2 * len(axes)} parameters")
    from scipy.optimize import least_squares

    log_loss = np.log(losses)

    def log_terms(theta):  # theta = (log E, log A, alpha[, log B, beta]) -> (terms, points)
        return np.stack([np.full_like(log_loss, theta[0])]
                        + [theta[1 + 2 * i] - theta[2 + 2 * i] * axis for i, axis in enumerate(axes)])

    def residuals(theta):
        return np.logaddexp.reduce(log_terms(theta), axis=0) - log_loss

    def jacobian(theta):  # d log(sum of terms) / d log(term) is the term's share of the sum
        terms = log_terms(theta)
        shares = np.exp(terms - np.logaddexp.reduce(terms, axis=0))
        columns = [shares[0]]
        for i, axis in enumerate(axes):
            columns += [shares[1 + i], -shares[1 + i] * axis]
        return np.stack(columns, axis=1)

    lowest = float(losses.min())
    lower = [math.log(lowest) - 30] + [-50.0, 1e-3] * len(axes)
    upper = [math.log(lowest)] + [200.0, 4.0] * len(axes)  # the floor lies below every measured loss
    best = None
    for floor in (0.2, 0.6, 0.9):
        for exponent in (0.1, 0.3, 0.6, 1.0):
            # Start each term at an equal share of the reducible loss at the middle of its axis.
            share = max(float(losses.mean()) - floor * lowest, 1e-6) / len(axes)
            start = [math.log(floor * lowest)]
            for axis in axes:
                start += [math.log(share) + exponent * float(axis.mean()), exponent]
            # Plain least squares converges in a few steps from every start; Huber's nearly-L1 loss, in hundreds.
            result = least_squares(residuals, start, jac=jacobian, bounds=(lower, upper), max_nfev=200)
            if best is None or result.cost < best.cost:
                best = result
    # Then Huber's loss from the best start, with tight tolerances (on every start it would cost seconds).
    best = least_squares(residuals, best.x, jac=jacobian, bounds=(lower, upper), loss="huber", f_scale=HUBER_DELTA,
                         xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=5000)
    theta = best.x
    fit = {"E": math.exp(theta[0])}
    names = ([("A", "alpha")] if params is not None else []) + ([("B", "beta")] if tokens is not None else [])
    for i, (scale, exponent) in enumerate(names):
        fit[scale], fit[exponent] = math.exp(theta[1 + 2 * i]), float(theta[2 + 2 * i])
    relative = np.exp(residuals(theta)) - 1
    fit["rms_error"] = float(np.sqrt(np.mean(relative ** 2)))  # in-sample, relative to the measured loss
    fit["n_points"] = int(len(losses))
    return fit


def compute_optimal(fit: dict, compute: float) -> dict:
    """The N and D that minimise the joint law at compute C = 6·N·D (see the module docstring)."""
    alpha, beta = fit["alpha"], fit["beta"]
    g = (alpha * fit["A"] / (beta * fit["B"])) ** (1 / (alpha + beta))
    params = g * (compute / 6) ** (beta / (alpha + beta))
    tokens = compute / 6 / params
    return {"compute": float(compute), "params": float(params), "tokens": float(tokens),
            "tokens_per_param": float(tokens / params), "loss": float(law(fit, params, tokens))}


def heldout_prediction(runs: list[dict], largest: str) -> dict:
    """Both laws fitted without the largest size, then asked for its losses: the joint law at every budget,
    and L(N) (the smaller sizes at the largest budget) at the largest budget."""
    seen = [r for r in runs if r["size"] != largest]
    joint = fit_law([r["val_loss"] for r in seen], [r["params"] for r in seen], [r["tokens"] for r in seen])
    rows = []
    for r in (r for r in runs if r["size"] == largest):
        predicted = float(law(joint, r["params"], r["tokens"]))
        rows.append({"steps": r["steps"], "tokens": r["tokens"], "predicted": predicted, "measured": r["val_loss"],
                     "error": predicted / r["val_loss"] - 1})
    most = max(r["steps"] for r in runs)
    at_most = [r for r in seen if r["steps"] == most]
    by_params = fit_law([r["val_loss"] for r in at_most], params=[r["params"] for r in at_most])
    target = runs[-1]
    predicted = float(law(by_params, target["params"]))
    return {"size": largest, "params_extrapolation": target["params"] / max(r["params"] for r in seen),
            "joint": {"fit": joint, "predictions": rows, "error": rows[-1]["error"]},
            "loss_vs_params": {"fit": by_params, "tokens": target["tokens"], "predicted": predicted,
                               "measured": target["val_loss"], "error": predicted / target["val_loss"] - 1}}


def size_gaps(runs: list[dict]) -> list[dict]:
    """Loss of the smallest size minus loss of the largest, per budget. Chinchilla's form is a sum of an N term
    and a D term, so it needs this gap to be the same at every budget (parallel curves in L(D))."""
    sizes = sorted({(r["params"], r["size"]) for r in runs})
    small, large = sizes[0][1], sizes[-1][1]
    loss = {(r["size"], r["steps"]): r for r in runs}
    return [{"tokens": loss[large, s]["tokens"], "gap": loss[small, s]["val_loss"] - loss[large, s]["val_loss"]}
            for s in sorted({r["steps"] for r in runs})]


def check(cfg: Config) -> None:
    if len(cfg.sizes) < 3:
        raise BadConfigError(f"--sizes: {len(cfg.sizes)} given; a law needs at least 3 sizes (5 for the sweep "
                             "the issue asks for)")
    if len(set(cfg.sizes)) != len(cfg.sizes):
        raise BadConfigError(f"--sizes: {list(cfg.sizes)} names a size twice")
    if len(cfg.steps) < 3 or len(set(cfg.steps)) != len(cfg.steps) or min(cfg.steps) < 1:
        raise BadConfigError(f"--steps: {list(cfg.steps)}; give at least 3 different positive budgets (L(D) has "
                             "3 parameters)")
    for name in ("batch_size", "vocab_size"):
        if getattr(cfg, name) < 1:
            raise BadConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.seq_len < 0 or not cfg.lr > 0:
        raise BadConfigError(f"--seq-len must be >= 0 and --lr > 0, got {cfg.seq_len} and {cfg.lr}")
    for size in cfg.sizes:  # a misspelt size fails now, not after the smaller ones have trained
        model_config(size, cfg.vocab_size, cfg.seq_len or 256)


def ordered_sizes(sizes, vocab_size: int, seq_len: int) -> list[tuple[str, int]]:
    """(size, N) from smallest to largest N; two sizes of one N cannot both be on a law's axis."""
    counted = sorted(((s, non_embedding_params(model_config(s, vocab_size, seq_len))) for s in sizes),
                     key=lambda pair: pair[1])
    for (a, n_a), (b, n_b) in zip(counted, counted[1:]):
        if n_a == n_b:
            raise BadConfigError(f"--sizes: {a} and {b} have the same {n_a:,} non-embedding parameters")
    return counted


# ---------------------------------------------------------------------------------------------------------
# The experiment


def run(cfg: Config) -> dict:
    cfg = resolve(cfg)
    check(cfg)
    run_dir = Path(cfg.run)
    start = time.perf_counter()
    name, tokenizer, corpus = open_corpus(run_dir, cfg.data, cfg.valid_data, cfg.text_field, cfg.tokenizer,
                                          cfg.vocab_size, cfg.seed)
    seq_len = cfg.seq_len or run_seq_len(run_dir)
    if corpus.n_tokens("valid") < 4 * seq_len + 1:
        raise BadConfigError(f"corpus {name}: {corpus.n_tokens('valid')} held-out tokens, fewer than 4 windows of "
                             f"{seq_len} to measure the loss on; pass --valid-data")
    sizes = ordered_sizes(cfg.sizes, tokenizer.vocab_size, seq_len)
    budgets = sorted(cfg.steps)

    runs = []
    for size, n in sizes:
        for steps in budgets:
            point = train_point(point_dir(run_dir, name, size, steps), corpus, tokenizer, size, steps,
                                cfg.batch_size, seq_len, cfg.lr, cfg.seed, cfg.device, cfg.progress)
            runs.append(point)
            print(f"scaling: {size} ({n:,} parameters), {point['tokens']:,} tokens: held-out loss "
                  f"{point['val_loss']:.4f}" + (" (reused)" if point["reused"] else f" ({point['seconds']:.0f} s)"),
                  flush=True)

    largest = sizes[-1][0]
    at_most_data = [r for r in runs if r["steps"] == budgets[-1]]
    on_largest = [r for r in runs if r["size"] == largest]
    joint = fit_law([r["val_loss"] for r in runs], [r["params"] for r in runs], [r["tokens"] for r in runs])
    results = {
        "config": asdict(cfg),
        "corpus": {"name": name, "train_tokens": corpus.n_tokens("train"), "valid_tokens": corpus.n_tokens("valid"),
                   "sources": [s["path"] for s in corpus.meta["sources"]]},
        "seq_len": seq_len,
        "sizes": [{"size": s, "params": n, **{k: v for k, v in asdict(model_config(s, 1, seq_len)).items()
                                              if k in ("d_model", "n_layers", "n_heads", "n_kv_heads")}}
                  for s, n in sizes],
        "runs": runs,
        "fits": {
            "loss_vs_params": fit_law([r["val_loss"] for r in at_most_data], params=[r["params"] for r in at_most_data]),
            "loss_vs_tokens": fit_law([r["val_loss"] for r in on_largest], tokens=[r["tokens"] for r in on_largest]),
            "joint": joint,
        },
        "compute_optimal": compute_optimal(joint, max(r["compute"] for r in runs)),
        # Three sizes are the least that pin the N term (floor, scale, exponent): the held-out fit needs four.
        "heldout": heldout_prediction(runs, largest) if len(sizes) >= 4 else None,
        "seconds": time.perf_counter() - start,
    }
    plot_scaling(results, run_dir / "experiments" / "scaling.png")
    save_results(cfg.run, "scaling", results)
    return results


# ---------------------------------------------------------------------------------------------------------
# The report section


def plot_scaling(results: dict, picture: Path) -> None:
    """Three log-log panels: loss against N (a line per budget), against D (a line per size), against C with
    the compute-optimal frontier; measured points as markers, the joint law dashed, the held-out law dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    runs, joint = results["runs"], results["fits"]["joint"]
    sizes = [s["size"] for s in results["sizes"]]
    budgets = sorted({r["steps"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), dpi=110)
    n_grid = np.geomspace(min(r["params"] for r in runs) / 1.5, max(r["params"] for r in runs) * 1.5, 100)
    for i, steps in enumerate(budgets):
        color = plt.cm.viridis(i / max(1, len(budgets) - 1))
        row = [r for r in runs if r["steps"] == steps]
        axes[0].plot([r["params"] for r in row], [r["val_loss"] for r in row], "o", color=color,
                     label=f"D = {row[0]['tokens']:,.0f}")
        axes[0].plot(n_grid, law(joint, n_grid, row[0]["tokens"]), "--", color=color, lw=1)
    heldout = results.get("heldout")
    if heldout:
        by_params, joint_last = heldout["loss_vs_params"], heldout["joint"]["predictions"][-1]
        axes[0].plot(n_grid, law(by_params["fit"], n_grid), ":", color="black", lw=1.2,
                     label=f"L(N) fit without {heldout['size']}")
        axes[0].plot([runs[-1]["params"]], [by_params["predicted"]], "x", color="black", ms=9,
                     label="its prediction")
        axes[0].plot([runs[-1]["params"]], [joint_last["predicted"]], "+", color="red", ms=11,
                     label="joint law's prediction")
    axes[0].set(xlabel="non-embedding parameters N", title="L(N), a line per token budget")
    d_grid = np.geomspace(min(r["tokens"] for r in runs) / 1.5, max(r["tokens"] for r in runs) * 1.5, 100)
    c_all = [r["compute"] for r in runs]
    for i, size in enumerate(sizes):
        color = plt.cm.plasma(i / max(1, len(sizes) - 1) * 0.85)
        row = [r for r in runs if r["size"] == size]
        axes[1].plot([r["tokens"] for r in row], [r["val_loss"] for r in row], "o", color=color,
                     label=f"{size} (N = {row[0]['params']:,})")
        axes[1].plot(d_grid, law(joint, row[0]["params"], d_grid), "--", color=color, lw=1)
        axes[2].plot([r["compute"] for r in row], [r["val_loss"] for r in row], "o-", color=color, lw=0.8,
                     label=size)
    axes[1].set(xlabel="training tokens D", title="L(D), a line per size")
    c_grid = np.geomspace(min(c_all) / 1.5, max(c_all) * 1.5, 100)
    axes[2].plot(c_grid, [compute_optimal(joint, c)["loss"] for c in c_grid], "k--", lw=1,
                 label="compute-optimal (fit)")
    axes[2].set(xlabel="compute C = 6·N·D (FLOPs)", title="L(C) and the compute-optimal frontier")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())  # 4.5, not 4.5 x 10^0
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    from lmforge.evaluate.report import save_figure

    save_figure(fig, picture)


def _explain_miss(results: dict, which: str) -> str:
    """Why a held-out prediction missed, from what the runs show."""
    heldout = results["heldout"]
    part = heldout[which]
    error = part["error"]
    reasons = [f"the largest model's loss came out {'lower' if error > 0 else 'higher'} than the smaller sizes' "
               f"trend says"]
    if which == "joint":
        gaps = size_gaps(results["runs"])
        reasons.append("the sum E + A/N^alpha + B/D^beta needs the curves of different sizes to run parallel in D, "
                       "but the loss gap between the smallest and the largest size is "
                       + ", ".join(f"{g['gap']:.2f}" for g in gaps)
                       + " nats at the successive budgets: at these budgets the models are still in the early fall of "
                       "their loss curves, which larger ones go through on fewer tokens, and no sum of an N term and "
                       "a D term can follow that")
    if part["fit"]["rms_error"] > abs(error) / 3:
        reasons.append(f"the law fits even the smaller runs only to {part['fit']['rms_error']:.1%} (rms)")
    epochs = max(r["tokens"] for r in results["runs"]) / results["corpus"]["train_tokens"]
    if epochs > 1:
        reasons.append(f"the longest budget reads the corpus {epochs:.1f} times, and repeated tokens are worth less "
                       "than fresh ones")
    reasons.append(f"the prediction extrapolates N by {heldout['params_extrapolation']:.1f}x, with one seed per point "
                   "and one learning rate for every size")
    return "; ".join(reasons) + "."


def _judged(error: float) -> str:
    if abs(error) <= HELDOUT_TARGET:
        return f"error **{error:+.1%}**, within the {HELDOUT_TARGET:.0%} target"
    return f"error **{error:+.1%}**, outside the {HELDOUT_TARGET:.0%} target by {abs(error) - HELDOUT_TARGET:.1%}"


def section(results: dict, run_dir: Path) -> list[str]:
    picture = run_dir / "experiments" / "scaling.png"
    if not picture.is_file():
        plot_scaling(results, picture)
    runs, fits, corpus = results["runs"], results["fits"], results["corpus"]
    cfg = results["config"]
    sizes = results["sizes"]
    budgets = sorted({r["steps"] for r in runs})
    tokens = {r["steps"]: r["tokens"] for r in runs}
    loss = {(r["size"], r["steps"]): r["val_loss"] for r in runs}
    lines = [
        "## Scaling laws: L(N), L(D) and L(N, D)",
        "",
        f"{len(sizes)} sizes x {len(budgets)} token budgets pretrained on the `{corpus['name']}` corpus "
        f"({corpus['train_tokens']:,} training tokens; loss measured on {corpus['valid_tokens']:,} held-out tokens), "
        f"each point from scratch with its own cosine schedule: batch {cfg['batch_size']} x {results['seq_len']} "
        f"tokens, peak learning rate {cfg['lr']}, seed {cfg['seed']}. N = non-embedding parameters, "
        f"C = 6·N·D. {results['seconds'] / 60:.1f} min{' (quick mode: no law promised)' if cfg['quick'] else ''}.",
        "",
        "| size | d_model x layers (heads / kv) | N | " + " | ".join(f"D = {tokens[s]:,}" for s in budgets) + " |",
        "|---|---|---:|" + "---:|" * len(budgets),
    ]
    for s in sizes:
        lines.append(f"| {s['size']} | {s['d_model']} x {s['n_layers']} ({s['n_heads']} / {s['n_kv_heads']}) | "
                     f"{s['params']:,} | " + " | ".join(f"{loss[s['size'], b]:.4f}" for b in budgets) + " |")
    law_rows = [("L(N), largest budget", fits["loss_vs_params"]), ("L(D), largest size", fits["loss_vs_tokens"]),
                ("L(N, D), every run", fits["joint"])]
    lines += ["", "Fitted laws L = E + A / N^alpha + B / D^beta (Huber loss on log-loss residuals, as Chinchilla):", "",
              "| law | E | A | alpha | B | beta | rms error | points |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, fit in law_rows:
        cells = [f"{fit[k]:.4g}" if k in fit else "" for k in ("E", "A", "alpha", "B", "beta")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fit['rms_error']:.2%} | {fit['n_points']} |")
    optimal, largest_run = results["compute_optimal"], runs[-1]
    lines += [
        "",
        f"**Compute-optimal ratio.** At the largest run's compute, C = {optimal['compute']:.3g} FLOPs, the joint law "
        f"is lowest at N = {optimal['params']:,.0f} and D = {optimal['tokens']:,.0f}: **{optimal['tokens_per_param']:.1f} "
        f"tokens per parameter** (Chinchilla: about 20, counting all parameters). The "
        f"largest run itself used {largest_run['tokens'] / largest_run['params']:.1f} tokens per parameter, so it is "
        f"{'under' if largest_run['tokens'] / largest_run['params'] < optimal['tokens_per_param'] else 'over'}-trained "
        "for its size by this fit."
        + (f" The joint law fits these runs only to {fits['joint']['rms_error']:.0%} (rms), so read the ratio as an "
           "order of magnitude." if fits["joint"]["rms_error"] > HELDOUT_TARGET else ""),
    ]
    heldout = results.get("heldout")
    if heldout:
        by_params, joint = heldout["loss_vs_params"], heldout["joint"]
        last = joint["predictions"][-1]
        lines += [
            "",
            f"**Held-out prediction.** Both laws fitted on the {len(sizes) - 1} smaller sizes only, then asked for "
            f"`{heldout['size']}` ({heldout['params_extrapolation']:.1f}x the largest N they saw) at "
            f"{by_params['tokens']:,} tokens, where it measured {by_params['measured']:.4f}:",
            "",
            f"- L(N) at that budget (Kaplan's curve in N) predicts {by_params['predicted']:.4f}: "
            f"{_judged(by_params['error'])}."
            + ("" if abs(by_params["error"]) <= HELDOUT_TARGET else " Why: " + _explain_miss(results, "loss_vs_params")),
            f"- The joint law L(N, D) predicts {last['predicted']:.4f}: {_judged(joint['error'])}."
            + ("" if abs(joint["error"]) <= HELDOUT_TARGET else " Why: " + _explain_miss(results, "joint")),
            "",
            "The joint law's predictions for the held-out size at every budget:",
            "",
            "| tokens | predicted | measured | error |", "|---:|---:|---:|---:|",
        ]
        lines += [f"| {p['tokens']:,} | {p['predicted']:.4f} | {p['measured']:.4f} | {p['error']:+.1%} |"
                  for p in joint["predictions"]]
    else:
        lines += ["", "Held-out prediction: not made (it needs at least 4 sizes: 3 to fit, 1 to predict)."]
    lines += ["", "![scaling laws](experiments/scaling.png)", ""] + _claims(results)
    return lines


def floor_line(floor: float, lowest: float, size_floor: float) -> str:
    """The irreducible loss as the joint fit reads it; L(N)'s floor also holds the largest budget's data term."""
    at_budget = (f" L(N) at the largest budget levels off at {size_floor:.3f}: what more parameters alone would "
                 "not remove without more data.")
    if floor < 0.05 * lowest:
        return (f"- *Irreducible loss*: the joint fit puts the floor near zero (E = {floor:.2g}): the runs are still "
                "far from it, and their curvature does not yet show where it lies." + at_budget)
    return (f"- *Irreducible loss*: the joint fit's floor is E = {floor:.3f} nats/token, {floor / lowest:.0%} of the "
            "lowest measured loss: the part no size or budget removes (on the world, its arbitrary names and numbers)."
            + at_budget)


def _claims(results: dict) -> list[str]:
    """The lecture's claims, each with what this sweep says about it."""
    runs, fits = results["runs"], results["fits"]
    sizes = [s["size"] for s in results["sizes"]]
    budgets = sorted({r["steps"] for r in runs})
    loss = {(r["size"], r["steps"]): r["val_loss"] for r in runs}
    pairs_n = [(loss[a, b], loss[c, b]) for b in budgets for a, c in zip(sizes, sizes[1:])]
    pairs_d = [(loss[s, a], loss[s, c]) for s in sizes for a, c in zip(budgets, budgets[1:])]
    falls_n, falls_d = sum(y < x for x, y in pairs_n), sum(y < x for x, y in pairs_d)
    heldout = results.get("heldout")
    lines = [
        "What the sweep says about the lecture's claims:",
        "",
        f"- *Bigger models give lower loss*: the next size up was lower in {falls_n} of {len(pairs_n)} comparisons "
        f"at equal data; the L(N) exponent is {fits['loss_vs_params']['alpha']:.2f} (Kaplan: 0.076 for pure "
        "power laws without a floor, on web text at 10^5-10^9 parameters; Chinchilla: 0.34 with a floor).",
        f"- *More data gives lower loss*: the next budget up was lower in {falls_d} of {len(pairs_d)} comparisons at "
        f"equal size; the L(D) exponent is {fits['loss_vs_tokens']['beta']:.2f} (Chinchilla: 0.28).",
    ]
    if heldout:
        errors = {name: heldout[name]["error"] for name in ("loss_vs_params", "joint")}
        held = [f"{label} {errors[name]:+.1%}" for name, label in (("loss_vs_params", "L(N)"), ("joint", "L(N, D)"))]
        verdict = ("reproduced by both laws" if all(abs(e) <= HELDOUT_TARGET for e in errors.values()) else
                   "reproduced by L(N) only" if abs(errors["loss_vs_params"]) <= HELDOUT_TARGET else
                   "reproduced by L(N, D) only" if abs(errors["joint"]) <= HELDOUT_TARGET else "not reproduced to 5%")
        lines.append(f"- *Small models predict large ones*: {verdict} (errors {', '.join(held)} over a "
                     f"{heldout['params_extrapolation']:.1f}x step in N).")
    lines += [
        floor_line(fits["joint"]["E"], min(r["val_loss"] for r in runs), fits["loss_vs_params"]["E"]),
        f"- The largest size here is {math.log10(7e9 / runs[-1]['params']):.1f} decades below the lecture's LLMs "
        "(above 7B parameters, trained on more than 1T tokens), so the exponents are those of this corpus at this "
        "scale; larger sizes and budgets are flags (`--device cuda`).",
    ]
    return lines
