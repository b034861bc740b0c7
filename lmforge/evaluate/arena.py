"""Arena ratings: pairwise human (or judge) votes between models -> a leaderboard with intervals and ranks.

    lmforge arena rate battles.jsonl [--rounds 100] [--length-covariate] [--min-battles 50] [--out rates.json]

A battle is `{model_a, model_b, winner}` with winner in {model_a, model_b, tie, tie (bothbad)}; the outcome
of a battle for model_a is y = 1, 0 or 0.5 (both kinds of tie count 0.5). evaluation.md §10 gives the method:

- **Online Elo** (a secondary view; it depends on the order of the battles): every model starts at 1000 and
  after each battle E_a = 1 / (1 + 10^((R_b - R_a)/400)), R_a += K (y - E_a), R_b -= K (y - E_a), K = 4.
- **Bradley-Terry** (the primary view): P(a beats b) = sigmoid(ln10 (θ_a - θ_b)), fitted by maximum likelihood.
  Battles are compressed into unique (a, b, y) triples with their counts w, and L-BFGS (analytic gradient,
  θ0 = 0, no penalty) minimises -Σ w [y log p + (1 - y) log(1 - p)]: a tie is half a win and half a loss.
  Ratings are R = 400 θ + 1000. The log-loss only sees differences, so θ is shifted to mean 0: the ratings
  average 1000 (anchor_mean). With ln10 and 400 a gap of 400 points means 10:1 odds, as in Elo.
- **Bootstrap intervals**: each round draws multinomial counts over the triples in proportion to their
  counts (the same as resampling battles with replacement) and refits; the report is the full-data fit with
  the 2.5% and 97.5% quantiles of the rounds. rank(m) = 1 + #{m' : lower(m') > upper(m)}: a model is only
  ranked below those that beat it clearly, so models whose intervals overlap share a rank.
- **Style control**: a per-battle covariate x (here the length feature (len_a - len_b) / (len_a + len_b + 1),
  z-scored) enters the logit, sigmoid(ln10 (θ_a - θ_b) + βᵀx), with an L2 penalty ½·0.5·‖(θ, β)‖². θ is then
  the rating with length's effect taken out, and β > 0 means the longer answer tends to win.

A model that never lost (or never won) has no finite maximum-likelihood rating: its fit stops where the
optimiser's tolerance does, far from the rest, and its interval is wide. Gather more battles before reading it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import tyro
from scipy.optimize import minimize
from scipy.special import expit
from tqdm import tqdm

from lmforge.errors import BadConfigError, BadFileError

LN10 = math.log(10.0)
# winner field -> outcome for model_a
OUTCOMES = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}
REQUIRED_FIELDS = ("model_a", "model_b", "winner")


@dataclass(frozen=True)
class RateConfig:
    battles: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="BATTLES.jsonl")]
    """JSONL file of battles: {model_a, model_b, winner}, winner one of model_a, model_b, tie, tie (bothbad);
    or the SQLite vote store of `lmforge serve --store`."""
    rounds: int = 100
    """Bootstrap rounds for the 95% intervals."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    length_covariate: bool = False
    """Also fit the style-controlled rating with the length feature (needs len_a and len_b in every battle)."""
    min_battles: int = 0
    """Leave out models with fewer battles than this (and the battles they played)."""
    out: str = ""
    """Also write the leaderboard, the win-fraction matrix and the settings as JSON here."""


# --- reading battles --------------------------------------------------------------------------------------

def read_battles(path: str | Path) -> list[dict]:
    """Battles from a JSONL file, every field kept (len_a, len_b, prompt, tstamp, ...), or from the vote store
    that `lmforge serve --store` writes (a SQLite file). Blank lines are skipped. When every battle has a
    numeric `tstamp` they are sorted by it (stably), since online Elo must see battles in the order they
    happened; otherwise file order is kept."""
    path = Path(path)
    if not path.is_file():
        raise BadFileError(f"{path}: no such file")
    with path.open("rb") as f:
        is_vote_store = f.read(16) == b"SQLite format 3\x00"
    battles = _battles_from_vote_store(path) if is_vote_store else _battles_from_jsonl(path)
    if not battles:
        raise BadFileError(f"{path}: no battles in the file")
    if all(isinstance(b.get("tstamp"), (int, float)) and not isinstance(b["tstamp"], bool) for b in battles):
        battles.sort(key=lambda b: b["tstamp"])
    return battles


def _battles_from_jsonl(path: Path) -> list[dict]:
    battles = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                battle = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadFileError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(battle, dict):
                raise BadFileError(f"{where}: expected a JSON object with model_a, model_b and winner")
            for field in REQUIRED_FIELDS:
                if field not in battle:
                    raise BadFileError(f"{where}: missing field '{field}'")
            for field in ("model_a", "model_b"):
                if not isinstance(battle[field], str) or not battle[field]:
                    raise BadFileError(f"{where}: field '{field}' must be a non-empty string")
            if battle["winner"] not in OUTCOMES:
                allowed = ", ".join(repr(w) for w in OUTCOMES)
                raise BadFileError(f"{where}: field 'winner' is {battle['winner']!r}; allowed: {allowed}")
            if battle["model_a"] == battle["model_b"]:
                raise BadFileError(f"{where}: fields 'model_a' and 'model_b' are both {battle['model_a']!r}")
            battles.append(battle)
    return battles


def _battles_from_vote_store(path: Path) -> list[dict]:
    """The store's `rated_battles` view: anonymous votes between two different models, oldest first. The
    store (serve/store.py) owns the schema; this reads only the view, opened read-only."""
    import sqlite3

    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute("SELECT * FROM rated_battles ORDER BY tstamp").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise BadFileError(f"{path}: a SQLite file but not an lmforge vote store ({e})") from None
    return [dict(row) for row in rows]


def _index(battles: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sorted model names, (N, 2) model indices of (a, b) and (N,) outcomes y for model_a."""
    models = sorted({b["model_a"] for b in battles} | {b["model_b"] for b in battles})
    position = {m: i for i, m in enumerate(models)}
    pairs = np.array([(position[b["model_a"]], position[b["model_b"]]) for b in battles], dtype=np.int64)
    outcomes = np.array([OUTCOMES[b["winner"]] for b in battles])
    return models, pairs.reshape(-1, 2), outcomes


# --- online Elo -------------------------------------------------------------------------------------------

def online_elo(battles: list[dict], k: float = 4.0, base: float = 1000.0) -> dict[str, float]:
    """Elo updated battle by battle, in the order given. Worked example: two new models at 1000, a wins:
    E_a = 0.5, so a goes to 1000 + 4 * 0.5 = 1002 and b to 998."""
    ratings: dict[str, float] = {}
    for battle in battles:
        a, b = battle["model_a"], battle["model_b"]
        rating_a, rating_b = ratings.get(a, base), ratings.get(b, base)
        expected_a = 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))
        delta = k * (OUTCOMES[battle["winner"]] - expected_a)
        ratings[a], ratings[b] = rating_a + delta, rating_b - delta
    return ratings


# --- Bradley-Terry maximum likelihood -----------------------------------------------------------------------

def _compress(pairs: np.ndarray, outcomes: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, ...]:
    """Unique (a, b, y, x) rows and how often each occurs: 2,000 battles of 5 models become at most 60 rows."""
    rows = np.column_stack([pairs, outcomes, features])
    unique_rows, counts = np.unique(rows, axis=0, return_counts=True)
    return (unique_rows[:, :2].astype(np.int64), unique_rows[:, 2], unique_rows[:, 3:],
            counts.astype(float))


def _negative_log_likelihood(params, pairs, outcomes, weights, features, n_models, l2):
    """The weighted log-loss of the (style-controlled) Bradley-Terry model and its gradient in (θ, β)."""
    theta, beta = params[:n_models], params[n_models:]
    logits = LN10 * (theta[pairs[:, 0]] - theta[pairs[:, 1]]) + features @ beta
    # -[y log σ(z) + (1-y) log σ(-z)] written with log(1 + e^±z), which stays finite for any z
    loss = weights @ (outcomes * np.logaddexp(0.0, -logits) + (1.0 - outcomes) * np.logaddexp(0.0, logits))
    residuals = weights * (expit(logits) - outcomes)  # d loss / d logit, per row
    grad_theta = LN10 * (np.bincount(pairs[:, 0], residuals, n_models) - np.bincount(pairs[:, 1], residuals, n_models))
    grad = np.concatenate([grad_theta, features.T @ residuals])
    return loss + 0.5 * l2 * params @ params, grad + l2 * params


def _fit(pairs, outcomes, weights, features, n_models, l2=0.0) -> tuple[np.ndarray, np.ndarray]:
    """θ (n_models,) and β (n_features,) by L-BFGS from zero."""
    x0 = np.zeros(n_models + features.shape[1])
    result = minimize(_negative_log_likelihood, x0, args=(pairs, outcomes, weights, features, n_models, l2),
                      jac=True, method="L-BFGS-B")
    return result.x[:n_models], result.x[n_models:]


def _to_ratings(theta: np.ndarray, anchor_mean: bool) -> np.ndarray:
    """R = 400 θ + 1000, with θ shifted to mean 0 (ignoring absent models, marked NaN) when anchor_mean."""
    return 400.0 * (theta - np.nanmean(theta) if anchor_mean else theta) + 1000.0


def bradley_terry(battles: list[dict], anchor_mean: bool = True) -> dict[str, float]:
    """Bradley-Terry ratings by maximum likelihood. anchor_mean: shift so that the ratings average 1000
    (without it, θ is left where L-BFGS put it; from θ0 = 0 every gradient step keeps Σθ = 0, so the mean is
    1000 up to the optimiser's tolerance anyway)."""
    models, pairs, outcomes = _index(battles)
    pairs, outcomes, features, counts = _compress(pairs, outcomes, np.zeros((len(outcomes), 0)))
    theta, _ = _fit(pairs, outcomes, counts, features, len(models))
    return dict(zip(models, _to_ratings(theta, anchor_mean).tolist()))


def length_feature(battles: list[dict]) -> np.ndarray:
    """(N, 1) style feature (len_a - len_b) / (len_a + len_b + 1), z-scored over the battles."""
    raw = np.empty(len(battles))
    for i, battle in enumerate(battles):
        len_a, len_b = battle.get("len_a"), battle.get("len_b")
        if not all(isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 0 for n in (len_a, len_b)):
            raise BadFileError(f"battle {i + 1} ({battle['model_a']} vs {battle['model_b']}): the length "
                               "covariate needs numbers len_a and len_b >= 0 in every battle")
        raw[i] = (len_a - len_b) / (len_a + len_b + 1)
    spread = raw.std()
    return ((raw - raw.mean()) / (spread if spread > 0 else 1.0))[:, None]


def bradley_terry_style(battles: list[dict], features: np.ndarray, l2: float = 0.5,
                        anchor_mean: bool = True) -> tuple[dict[str, float], np.ndarray]:
    """Style-controlled ratings and β: features (N, k) is one row of covariates per battle (e.g.
    `length_feature(battles)`), entering the logit as βᵀx beside ln10 (θ_a - θ_b)."""
    features = np.asarray(features, dtype=float).reshape(len(battles), -1)
    models, pairs, outcomes = _index(battles)
    pairs, outcomes, features, counts = _compress(pairs, outcomes, features)
    theta, beta = _fit(pairs, outcomes, counts, features, len(models), l2=l2)
    return dict(zip(models, _to_ratings(theta, anchor_mean).tolist())), beta


# --- bootstrap intervals and ranks --------------------------------------------------------------------------

def rank_by_intervals(lower: dict[str, float], upper: dict[str, float]) -> dict[str, int]:
    """rank(m) = 1 + the number of models whose lower bound is above m's upper bound. Worked example: A
    [1050, 1100], B [1020, 1060], C [900, 1000] -> A 1, B 1 (intervals overlap), C 3 (both A and B clear it)."""
    return {m: 1 + sum(int(lower[other] > upper[m]) for other in lower) for m in lower}


def bootstrap_ratings(battles: list[dict], rounds: int = 100, seed: int = 0,
                      progress: bool = False) -> dict[str, dict]:
    """Per model: the full-data Bradley-Terry rating, the 2.5% / 97.5% quantiles over `rounds` multinomial
    resamples of the triple counts, the rank with intervals and the number of battles played."""
    models, pairs, outcomes = _index(battles)
    n_models = len(models)
    pairs, outcomes, features, counts = _compress(pairs, outcomes, np.zeros((len(outcomes), 0)))
    theta, _ = _fit(pairs, outcomes, counts, features, n_models)
    ratings = _to_ratings(theta, anchor_mean=True)

    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, n_models))  # (rounds, models)
    for r in tqdm(range(rounds), desc="bootstrap", disable=None if progress else True):
        round_counts = rng.multinomial(int(counts.sum()), counts / counts.sum()).astype(float)
        round_theta, _ = _fit(pairs, outcomes, round_counts, features, n_models)
        # a model drawn into no battle keeps θ = 0, which is no estimate: leave it out of this round
        played = np.bincount(pairs[:, 0], round_counts, n_models) + np.bincount(pairs[:, 1], round_counts, n_models)
        round_theta[played == 0] = np.nan
        samples[r] = _to_ratings(round_theta, anchor_mean=True)
    lower, upper = np.nanquantile(samples, [0.025, 0.975], axis=0)

    n_battles = np.bincount(pairs[:, 0], counts, n_models) + np.bincount(pairs[:, 1], counts, n_models)
    ranks = rank_by_intervals(dict(zip(models, lower)), dict(zip(models, upper)))
    return {m: {"rating": float(ratings[i]), "lower": float(lower[i]), "upper": float(upper[i]),
                "rank": ranks[m], "battles": int(n_battles[i])} for i, m in enumerate(models)}


def win_fraction_matrix(battles: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Sorted models, fraction[i, j] = (wins of i over j + ties / 2) / battles between them (NaN where they
    never met), and the symmetric battle counts."""
    models, pairs, outcomes = _index(battles)
    n = len(models)
    score, counts = np.zeros((n, n)), np.zeros((n, n))
    np.add.at(score, (pairs[:, 0], pairs[:, 1]), outcomes)
    np.add.at(score, (pairs[:, 1], pairs[:, 0]), 1.0 - outcomes)
    np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1.0)
    counts = counts + counts.T
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(counts > 0, score / counts, np.nan)
    return models, fraction, counts.astype(np.int64)


# --- leaderboard --------------------------------------------------------------------------------------------

def leaderboard(battles: list[dict], rounds: int = 100, seed: int = 0, length_covariate: bool = False,
                progress: bool = False) -> list[dict]:
    """One row per model, best Bradley-Terry rating first: model, rating, lower, upper, rank, elo, battles,
    wins, ties (and rating_style with length_covariate)."""
    rated = bootstrap_ratings(battles, rounds=rounds, seed=seed, progress=progress)
    elo = online_elo(battles)
    wins, ties = Counter(), Counter()
    for battle in battles:
        if battle["winner"] in ("model_a", "model_b"):
            wins[battle[battle["winner"]]] += 1
        else:
            ties[battle["model_a"]] += 1
            ties[battle["model_b"]] += 1
    style = bradley_terry_style(battles, length_feature(battles))[0] if length_covariate else {}
    rows = []
    for model, r in rated.items():
        row = {"model": model, **r, "elo": elo[model], "wins": wins[model], "ties": ties[model]}
        if length_covariate:
            row["rating_style"] = style[model]
        rows.append(row)
    return sorted(rows, key=lambda row: -row["rating"])


def format_leaderboard(rows: list[dict]) -> str:
    """A markdown table of `leaderboard` rows."""
    has_style = any("rating_style" in row for row in rows)
    header = ["rank", "model", "rating", "95% interval", "elo", "battles", "wins", "ties"]
    header += ["length-controlled"] if has_style else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [str(row["rank"]), row["model"], f"{row['rating']:.0f}", f"{row['lower']:.0f} to {row['upper']:.0f}",
                 f"{row['elo']:.0f}", str(row["battles"]), str(row["wins"]), str(row["ties"])]
        cells += [f"{row['rating_style']:.0f}"] if has_style else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- simulation -------------------------------------------------------------------------------------------

def simulate_battles(true_ratings: dict[str, float], n: int, seed: int, tie_rate: float = 0.0,
                     mean_lengths: dict[str, float] | None = None, length_effect: float = 0.0) -> list[dict]:
    """n battles between uniformly drawn ordered pairs of distinct models, won by the Bradley-Terry model of
    `true_ratings` (400-point scale). A share `tie_rate` of battles are ties ("tie" or "tie (bothbad)" at
    random) regardless of strength. With `mean_lengths`, each answer gets a length around its model's mean,
    and the winner is also pushed by length: logit += length_effect * (len_a - len_b) / (len_a + len_b + 1)."""
    models = list(true_ratings)
    if len(models) < 2:
        raise ValueError("simulate_battles needs at least two models")
    ratings = np.array([true_ratings[m] for m in models], dtype=float)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(models), n)
    second = (first + rng.integers(1, len(models), n)) % len(models)  # never the same model
    logits = LN10 * (ratings[first] - ratings[second]) / 400.0
    if mean_lengths is not None:
        means = np.array([mean_lengths[m] for m in models], dtype=float)
        len_a = np.maximum(1, np.round(means[first] * rng.lognormal(0.0, 0.3, n))).astype(int)
        len_b = np.maximum(1, np.round(means[second] * rng.lognormal(0.0, 0.3, n))).astype(int)
        logits += length_effect * (len_a - len_b) / (len_a + len_b + 1)
    a_wins = rng.random(n) < expit(logits)
    is_tie = rng.random(n) < tie_rate
    tie_kind = np.where(rng.random(n) < 0.5, "tie", "tie (bothbad)")
    battles = []
    for i in range(n):
        winner = tie_kind[i] if is_tie[i] else ("model_a" if a_wins[i] else "model_b")
        battle = {"model_a": models[first[i]], "model_b": models[second[i]], "winner": str(winner)}
        if mean_lengths is not None:
            battle.update(len_a=int(len_a[i]), len_b=int(len_b[i]))
        battles.append(battle)
    return battles


# --- command ----------------------------------------------------------------------------------------------

def _without_rare_models(battles: list[dict], min_battles: int) -> tuple[list[dict], dict[str, int]]:
    """Drop models with fewer than min_battles battles, with every battle they played (one pass)."""
    played = Counter(b["model_a"] for b in battles) + Counter(b["model_b"] for b in battles)
    rare = {m: n for m, n in played.items() if n < min_battles}
    return [b for b in battles if b["model_a"] not in rare and b["model_b"] not in rare], rare


def _json_safe(value):
    """NaN (models that never met) becomes null, which is valid JSON."""
    return None if isinstance(value, float) and math.isnan(value) else value


def run_rate(cfg: RateConfig) -> list[dict]:
    if cfg.rounds < 1 or cfg.min_battles < 0:
        raise BadConfigError("--rounds must be >= 1 and --min-battles >= 0")
    battles = read_battles(cfg.battles)
    battles, rare = _without_rare_models(battles, cfg.min_battles)
    if rare:
        listed = ", ".join(f"{m} ({n})" for m, n in sorted(rare.items()))
        print(f"left out, fewer than {cfg.min_battles} battles: {listed}")
    if len({b["model_a"] for b in battles} | {b["model_b"] for b in battles}) < 2:
        raise BadFileError(f"{cfg.battles}: fewer than two models left to rate")

    rows = leaderboard(battles, rounds=cfg.rounds, seed=cfg.seed, length_covariate=cfg.length_covariate,
                       progress=cfg.rounds >= 200)
    print(format_leaderboard(rows))
    beta = None
    if cfg.length_covariate:
        beta = float(bradley_terry_style(battles, length_feature(battles))[1][0])
        print(f"length effect β = {beta:+.3f} per standard deviation of the length feature "
              f"({'longer answers win more' if beta > 0 else 'shorter answers win more'})")
    print(f"{len(battles)} battles; rating = Bradley-Terry (mean 1000) with {cfg.rounds}-round bootstrap "
          "95% intervals; rank = 1 + models whose interval lies wholly above; elo = online, K=4")

    if cfg.out:
        models, fraction, counts = win_fraction_matrix(battles)
        fraction_rows = [[_json_safe(v) for v in row] for row in fraction.tolist()]
        result = {"config": asdict(cfg), "n_battles": len(battles), "left_out": rare, "leaderboard": rows,
                  "length_beta": beta,
                  "win_fraction": {"models": models, "fraction": fraction_rows, "battles": counts.tolist()}}
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {out}", file=sys.stderr)
    return rows
