"""The emergence experiment: its intervals against published values, its refusals of bad input, and the quick
form end to end on the shared quick run."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import BadConfigError
from lmforge.experiments import results_path
from lmforge.experiments.emergence import Config, difference_interval, run, tally, trend, wilson


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I: 81/263 and 0/10.
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = wilson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)


def test_difference_interval_matches_newcombe():
    # Newcombe (1998), "Interval estimation for the difference between independent proportions", method 10,
    # example (a): 56/70 - 48/80 = 0.2000, interval 0.0524 to 0.3339.
    low, high = difference_interval(tally(56, 70), tally(48, 80))
    assert (low, high) == pytest.approx((0.0524, 0.3339), abs=1e-4)


def test_every_accuracy_lies_inside_its_interval():
    for correct, n in [(0, 1), (0, 500), (1, 3), (7, 7), (250, 500)]:
        t = tally(correct, n)
        assert t["low"] <= t["accuracy"] <= t["high"]


def test_trend_extrapolates_only_a_rising_line():
    rising = [{"params": 10 ** k, "difference": 0.05 * (k - 3)} for k in (3, 4, 5)]
    assert trend(rising)["params_at_target"] == pytest.approx(1e7)
    flat = [{"params": 10 ** k, "difference": 0.0} for k in (3, 4, 5)]
    assert trend(flat)["params_at_target"] is None


@pytest.mark.parametrize("overrides, message", [
    (dict(sizes=("nano", "micro")), "at least 3"),
    (dict(clusters=("sentiment", "poetry")), "poetry"),
    (dict(clusters=("arithmetic",)), "arithmetic"),
    (dict(k=0), "--k"),
    (dict(sizes=("16x1", "32x1", "tremendous")), "neither a preset"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, overrides, message):
    with pytest.raises(BadConfigError, match=message):
        run(Config(run=str(tmp_path / "missing"), progress=False, **overrides))
    assert not (tmp_path / "missing").exists()


def test_quick_emergence_end_to_end(quick_run):
    from lmforge.cli import main

    assert main(["experiment", "emergence", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads(results_path(quick_run, "emergence").read_text())
    assert {"config", "sizes", "claims", "n_records", "n_problems"} <= set(results)
    params = [row["params"] for row in results["sizes"]]
    assert params == sorted(params) and len(params) == 5
    for row in results["sizes"]:
        for mode in ("zero_shot", "few_shot"):
            measured = row["in_context"][mode]
            for t in [*measured["generated"].values(), *measured["ranked"].values()]:
                assert 0 <= t["low"] <= t["accuracy"] <= t["high"] <= 1
            assert measured["generated"]["_all"]["n"] == results["n_records"]
            assert measured["answer_loss"]["_all"]["mean"] > 0
        for method in ("few_shot", "few_shot_cot"):
            assert row["chain_of_thought"][method]["all"]["n"] == results["n_problems"]
    assert {"icl_generated", "icl_ranked", "icl_answer_loss", "cot", "cot_3_steps"} <= set(results["claims"])
    report = (quick_run / "report.md").read_text()
    assert "## Emergence" in report and "experiments/emergence.png" in report
    assert (quick_run / "experiments" / "emergence.png").is_file()
