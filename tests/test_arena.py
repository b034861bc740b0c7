"""Arena ratings: Elo and Bradley-Terry against hand computations, bootstrap intervals that cover the truth on
simulated tournaments, style control that removes a length bias, and bad battle files named by line."""

import json
import math
from itertools import combinations

import numpy as np
import pytest
from scipy.optimize import minimize

from lmforge.cli import main
from lmforge.errors import BadFileError
from lmforge.evaluate.arena import (
    bootstrap_ratings,
    bradley_terry,
    bradley_terry_style,
    format_leaderboard,
    leaderboard,
    length_feature,
    online_elo,
    rank_by_intervals,
    read_battles,
    simulate_battles,
    win_fraction_matrix,
)


def battle(a: str, b: str, winner: str, **extra) -> dict:
    return {"model_a": a, "model_b": b, "winner": winner, **extra}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# --- the acceptance test ------------------------------------------------------------------------------------

# m1 and m2 are 60 points apart, closer than the 100 points the order check asks about
TRUE_RATINGS = {"m0": 1250.0, "m1": 1100.0, "m2": 1040.0, "m3": 900.0, "m4": 700.0}


def test_bootstrap_intervals_cover_the_truth_and_elo_orders_clear_gaps_like_bradley_terry():
    true_mean = np.mean(list(TRUE_RATINGS.values()))
    covered = cases = compared_pairs = 0
    widths, disagreements = [], []
    for tournament in range(50):
        battles = simulate_battles(TRUE_RATINGS, n=2000, seed=tournament)
        rated = bootstrap_ratings(battles, rounds=100, seed=tournament)
        fitted_mean = np.mean([r["rating"] for r in rated.values()])
        assert fitted_mean == pytest.approx(1000.0)  # anchored: θ has mean 0
        for model, r in rated.items():
            truth = TRUE_RATINGS[model] - true_mean
            covered += r["lower"] - fitted_mean <= truth <= r["upper"] - fitted_mean
            cases += 1
            widths.append(r["upper"] - r["lower"])
        elo = online_elo(battles)
        for a, b in combinations(TRUE_RATINGS, 2):
            if abs(TRUE_RATINGS[a] - TRUE_RATINGS[b]) >= 100:
                compared_pairs += 1
                if np.sign(elo[a] - elo[b]) != np.sign(rated[a]["rating"] - rated[b]["rating"]):
                    disagreements.append((tournament, a, b))
    assert covered / cases >= 0.85, f"coverage {covered}/{cases}"
    # intervals that cover by being huge would be no achievement: ~2,000 battles pin a rating to tens of points
    assert np.mean(widths) < 120
    assert compared_pairs == 50 * 9 and not disagreements


# --- Bradley-Terry against closed forms and a direct fit ------------------------------------------------------

def test_two_models_bradley_terry_gap_is_400_log10_of_the_win_ratio():
    battles = [battle("a", "b", "model_a")] * 30 + [battle("b", "a", "model_a")] * 10
    ratings = bradley_terry(battles)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(3), abs=0.05)
    assert ratings["a"] + ratings["b"] == pytest.approx(2000.0)


def test_ties_count_as_half_a_win_for_each_side():
    # 30 wins, 10 losses and 20 ties of both kinds: like 40 wins to 20 losses
    battles = ([battle("a", "b", "model_a")] * 30 + [battle("a", "b", "model_b")] * 10
               + [battle("a", "b", "tie")] * 10 + [battle("b", "a", "tie (bothbad)")] * 10)
    ratings = bradley_terry(battles)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(2), abs=0.05)


def test_both_tie_kinds_are_the_same_outcome():
    battles = simulate_battles({"x": 1100, "y": 1000, "z": 900}, n=300, seed=3, tie_rate=0.3)
    assert {b["winner"] for b in battles} == {"model_a", "model_b", "tie", "tie (bothbad)"}
    all_plain_ties = [{**b, "winner": "tie"} if b["winner"].startswith("tie") else b for b in battles]
    assert bradley_terry(battles) == pytest.approx(bradley_terry(all_plain_ties))
    assert online_elo(battles) == pytest.approx(online_elo(all_plain_ties))


def direct_fit(battles, models, features=None, l2=0.0):
    """Per-battle log-loss minimised without a gradient: an independent reference for the compressed fit."""
    index = {m: i for i, m in enumerate(models)}
    a = np.array([index[b["model_a"]] for b in battles])
    b_ = np.array([index[b["model_b"]] for b in battles])
    y = np.array([{"model_a": 1.0, "model_b": 0.0}.get(b["winner"], 0.5) for b in battles])
    x = np.zeros((len(battles), 0)) if features is None else features

    def loss(params):
        theta, beta = params[:len(models)], params[len(models):]
        p = 1.0 / (1.0 + np.exp(-(math.log(10) * (theta[a] - theta[b_]) + x @ beta)))
        return -np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)) + 0.5 * l2 * params @ params

    params = minimize(loss, np.zeros(len(models) + x.shape[1]), method="BFGS", options={"gtol": 1e-7}).x
    theta = params[:len(models)]
    return dict(zip(models, 400 * (theta - theta.mean()) + 1000)), params[len(models):]


def test_compressed_fit_with_analytic_gradient_matches_a_direct_fit():
    truth = {"w": 1150, "x": 1050, "y": 1000, "z": 850}
    battles = simulate_battles(truth, n=400, seed=11, tie_rate=0.2)
    expected, _ = direct_fit(battles, sorted(truth))
    assert bradley_terry(battles) == pytest.approx(expected, abs=0.1)


def test_style_controlled_fit_matches_a_direct_penalised_fit():
    truth = {"w": 1150, "x": 1050, "y": 1000}
    battles = simulate_battles(truth, n=300, seed=5, mean_lengths={"w": 50, "x": 200, "y": 400}, length_effect=1.5)
    features = length_feature(battles)
    expected_ratings, expected_beta = direct_fit(battles, sorted(truth), features, l2=0.5)
    ratings, beta = bradley_terry_style(battles, features)
    assert ratings == pytest.approx(expected_ratings, abs=0.1)
    assert beta == pytest.approx(expected_beta, abs=1e-3)


# --- Elo and ranks by hand ---------------------------------------------------------------------------------------

def test_online_elo_matches_a_hand_computation():
    battles = [battle("a", "b", "model_a"), battle("a", "b", "model_b"), battle("c", "a", "tie")]
    ratings = online_elo(battles)
    # 1: both at 1000, E_a = 0.5, a wins: a 1002, b 998
    a, b = 1002.0, 998.0
    # 2: E_a = 1 / (1 + 10^(-4/400)) = 0.505756, a loses: a and b move by 4 * 0.505756 = 2.023023
    step = 4 * 0.5057562
    a, b = a - step, b + step
    # 3: c (1000) ties a (999.976977): E_c = 1 / (1 + 10^((a - 1000)/400)) = 0.5000331, so c loses a hair
    expected_c = 1 / (1 + 10 ** ((a - 1000) / 400))
    assert expected_c == pytest.approx(0.5000331, abs=1e-7)
    c_step = 4 * (0.5 - expected_c)
    assert ratings == pytest.approx({"a": a - c_step, "b": b, "c": 1000 + c_step}, abs=1e-5)


def test_rank_is_one_plus_the_models_clearly_above():
    lower = {"A": 1050, "B": 1020, "C": 900, "D": 880}
    upper = {"A": 1100, "B": 1060, "C": 1000, "D": 1030}
    # C: A and B have lower bounds above C's upper 1000; D's upper 1030 is only cleared by A's 1050
    assert rank_by_intervals(lower, upper) == {"A": 1, "B": 1, "C": 3, "D": 2}


def test_bootstrap_is_seeded_and_counts_battles():
    battles = simulate_battles({"x": 1100, "y": 1000, "z": 900}, n=300, seed=1)
    first, again = bootstrap_ratings(battles, rounds=30, seed=4), bootstrap_ratings(battles, rounds=30, seed=4)
    assert first == again
    assert bootstrap_ratings(battles, rounds=30, seed=5) != first
    assert sum(r["battles"] for r in first.values()) == 2 * len(battles)
    assert all(r["lower"] <= r["rating"] <= r["upper"] for r in first.values())


def test_win_fraction_matrix_on_a_hand_case():
    battles = [battle("a", "b", "model_a"), battle("b", "a", "tie"), battle("a", "b", "model_b"),
               battle("a", "c", "model_a")]
    models, fraction, counts = win_fraction_matrix(battles)
    assert models == ["a", "b", "c"]
    assert fraction[0, 1] == pytest.approx(1.5 / 3) and fraction[1, 0] == pytest.approx(1.5 / 3)
    assert fraction[0, 2] == 1.0 and fraction[2, 0] == 0.0 and math.isnan(fraction[1, 2])
    assert counts.tolist() == [[0, 3, 1], [3, 0, 0], [1, 0, 0]]


# --- style control -------------------------------------------------------------------------------------------

def test_length_covariate_removes_a_length_bias_that_is_independent_of_skill():
    truth = {"a": 1100, "b": 1050, "c": 1000, "d": 950, "e": 900}
    verbose_when_weak = {"a": 50, "b": 100, "c": 200, "d": 400, "e": 600}
    battles = simulate_battles(truth, n=4000, seed=7, mean_lengths=verbose_when_weak, length_effect=2.0)
    true_centred = np.array([truth[m] for m in sorted(truth)]) - np.mean(list(truth.values()))

    def error(ratings):
        values = np.array([ratings[m] for m in sorted(truth)])
        return np.sqrt(np.mean((values - values.mean() - true_centred) ** 2))

    raw = bradley_terry(battles)
    style, beta = bradley_terry_style(battles, length_feature(battles))
    assert beta[0] > 0
    assert error(style) < 30 < error(raw)  # the raw ratings are pulled toward the verbose models
    assert raw["e"] > raw["a"]  # the bias is strong enough to reverse the order


def test_length_covariate_needs_lengths():
    with pytest.raises(BadFileError, match="len_a and len_b"):
        length_feature([battle("a", "b", "model_a", len_a=3)])


# --- files and the command ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_line, message", [
    ('{"model_a": "x", "model_b": "y", "winner": "draw"}', r"field 'winner' is 'draw'; allowed: 'model_a'"),
    ('{"model_a": "x", "winner": "tie"}', "missing field 'model_b'"),
    ('{"model_a": "x", "model_b": "y", "winner": ', "not valid JSON"),
    ('{"model_a": "x", "model_b": "x", "winner": "tie"}', "both 'x'"),
])
def test_bad_battles_name_the_file_the_line_and_the_field(tmp_path, bad_line, message):
    path = tmp_path / "battles.jsonl"
    path.write_text(json.dumps(battle("x", "y", "model_a")) + "\n\n" + bad_line + "\n")
    with pytest.raises(BadFileError, match=message) as caught:
        read_battles(path)
    assert f"{path}:3:" in str(caught.value)  # the blank line 2 is skipped but still counted


def test_battles_keep_their_fields_and_follow_timestamps(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [battle("x", "y", "model_a", tstamp=2.0, prompt="hi", len_a=3, len_b=4),
                                              battle("y", "x", "tie", tstamp=1.0)])
    battles = read_battles(path)
    assert [b["tstamp"] for b in battles] == [1.0, 2.0] and battles[1]["prompt"] == "hi"


def test_command_reports_a_bad_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "battles.jsonl"
    path.write_text('{"model_a": "x", "model_b": "y", "winner": "both"}\n')
    assert main(["arena", "rate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error:") and f"{path}:1:" in err and "winner" in err


def test_command_prints_the_leaderboard_and_writes_json(tmp_path, capsys):
    truth = {"strong": 1200, "middle": 1000, "weak": 800}
    battles = simulate_battles(truth, n=600, seed=2, tie_rate=0.1, mean_lengths={m: 100 for m in truth},
                               length_effect=0.0)
    battles += [battle("strong", "rare", "model_a")] * 3
    path = write_jsonl(tmp_path / "battles.jsonl", battles)
    out = tmp_path / "results" / "rates.json"
    code = main(["arena", "rate", path, "--rounds", "20", "--min-battles", "10", "--length-covariate",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| rank | model |" in printed and "length-controlled" in printed
    assert "left out, fewer than 10 battles: rare (3)" in printed
    result = json.loads(out.read_text())
    assert [row["model"] for row in result["leaderboard"]] == ["strong", "middle", "weak"]
    assert result["win_fraction"]["models"] == ["middle", "strong", "weak"]
    assert result["left_out"] == {"rare": 3} and isinstance(result["length_beta"], float)
    assert not list(out.parent.glob(".*tmp*"))  # the temporary file was renamed into place


def test_format_leaderboard_is_a_table_with_a_row_per_model():
    rows = leaderboard(simulate_battles({"x": 1100, "y": 900}, n=100, seed=0), rounds=10)
    lines = format_leaderboard(rows).splitlines()
    assert len(lines) == 2 + 2 and lines[2].startswith("| 1 | x |")
