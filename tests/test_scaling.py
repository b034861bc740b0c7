"""The scaling-law experiment: the fits recover a known law, the compute-optimal split is the law's minimum,
bad sweeps are refused, and the quick sweep runs end to end on the shared quick run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lmforge.errors import BadConfigError
from lmforge.experiments import results_path
from lmforge.experiments.scaling import (Config, compute_optimal, fit_law, law, model_config, non_embedding_params,
                                         run)
from lmforge.model import PRESETS

# Chinchilla's published fit (Hoffmann et al. 2022, approach 3): the law the synthetic runs are drawn from.
TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def synthetic_runs():
    """A 6 x 6 grid spanning three decades of N and of D, losses exactly on the law (no noise)."""
    params, tokens = np.meshgrid(np.geomspace(1e5, 1e8, 6), np.geomspace(1e8, 1e11, 6))
    params, tokens = params.ravel(), tokens.ravel()
    return params, tokens, law(TRUE, params, tokens)


def close(value: float, expected: float, tolerance: float = 0.05) -> bool:
    return abs(value / expected - 1) <= tolerance


def test_joint_fit_recovers_a_known_law():
    params, tokens, losses = synthetic_runs()
    fit = fit_law(losses, params, tokens)
    assert close(fit["E"], TRUE["E"]) and close(fit["alpha"], TRUE["alpha"]) and close(fit["beta"], TRUE["beta"])
    assert close(fit["A"], TRUE["A"]) and close(fit["B"], TRUE["B"])
    assert fit["rms_error"] < 1e-6 and fit["n_points"] == 36


def test_tokens_per_parameter_is_read_at_the_largest_runs_compute():
    params, tokens, losses = synthetic_runs()
    largest_compute = 6 * params.max() * tokens.max()
    fitted = compute_optimal(fit_law(losses, params, tokens), largest_compute)
    # The closed form on the true law: N_opt = G (C/6)^(b/(a+b)), G = (a A / (b B))^(1/(a+b)).
    a, b = TRUE["alpha"], TRUE["beta"]
    n_opt = (a * TRUE["A"] / (b * TRUE["B"])) ** (1 / (a + b)) * (largest_compute / 6) ** (b / (a + b))
    expected_ratio = largest_compute / 6 / n_opt / n_opt
    assert fitted["compute"] == pytest.approx(largest_compute)
    assert close(fitted["tokens_per_param"], expected_ratio)
    assert fitted["params"] * fitted["tokens"] * 6 == pytest.approx(largest_compute)


def test_one_axis_fits_recover_the_exponent():
    """At a fixed D the D term is a constant, so L(N) finds alpha exactly and folds B/D^beta into its floor."""
    params, tokens, losses = synthetic_runs()
    at_most = tokens == tokens.max()
    by_params = fit_law(losses[at_most], params=params[at_most])
    assert close(by_params["alpha"], TRUE["alpha"])
    assert close(by_params["E"], TRUE["E"] + TRUE["B"] / tokens.max() ** TRUE["beta"])
    largest = params == params.max()
    assert close(fit_law(losses[largest], tokens=tokens[largest])["beta"], TRUE["beta"])


def test_compute_optimal_point_is_the_minimum_at_that_compute():
    compute = 1e21
    best = compute_optimal(TRUE, compute)
    grid = np.geomspace(best["params"] / 30, best["params"] * 30, 2001)
    scanned = law(TRUE, grid, compute / 6 / grid)
    assert grid[np.argmin(scanned)] == pytest.approx(best["params"], rel=0.01)
    assert best["loss"] == pytest.approx(float(scanned.min()), rel=1e-6)


def test_fit_refuses_too_few_points():
    with pytest.raises(BadConfigError, match="cannot fit"):
        fit_law([3.0, 2.5], params=[1e5, 1e6])


def test_shapes_name_the_presets_they_match():
    shape, preset = model_config("128x4", 1024, 256), PRESETS["micro"]
    assert (shape.d_model, shape.n_layers, shape.n_heads, shape.n_kv_heads) == (
        preset.d_model, preset.n_layers, preset.n_heads, preset.n_kv_heads)
    assert non_embedding_params(model_config("nano", 512, 64)) < non_embedding_params(model_config("96x3", 512, 64))
    with pytest.raises(BadConfigError, match="neither a preset"):
        model_config("huge", 1024, 256)
    with pytest.raises(BadConfigError, match="heads"):
        model_config("66x2", 1024, 256)


@pytest.mark.parametrize("overrides, message", [
    (dict(sizes=("nano", "micro")), "at least 3 sizes"),
    (dict(sizes=("nano", "micro", "nano")), "twice"),
    (dict(steps=(10, 20)), "at least 3"),
    (dict(steps=(10, 10, 20)), "at least 3"),
    (dict(sizes=("16x1", "32x1", "gigantic")), "neither a preset"),
])
def test_bad_sweeps_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(BadConfigError, match=message):
        run(Config(run=str(tmp_path / "missing"), progress=False, **overrides))
    assert not (tmp_path / "missing").exists()


def test_a_missing_run_is_named(tmp_path):
    from lmforge.cli import main
    from lmforge.errors import BadFileError

    with pytest.raises(BadFileError, match="not a run directory"):
        run(Config(run=str(tmp_path), sizes=("16x1", "24x1", "32x1"), steps=(1, 2, 3), progress=False))
    assert main(["experiment", "scaling", "--run", str(tmp_path), "--sizes", "nano", "micro"]) == 2


def test_quick_sweep_end_to_end(quick_run):
    from lmforge.cli import main

    assert main(["experiment", "scaling", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads(results_path(quick_run, "scaling").read_text())
    assert {"config", "corpus", "sizes", "runs", "fits", "compute_optimal", "heldout"} <= set(results)
    params = [s["params"] for s in results["sizes"]]
    assert params == sorted(params) and len(params) == 5
    assert len(results["runs"]) == 5 * 3
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in results["runs"])
    # More training always lowers the loss of one size, and the largest size beats the smallest.
    for size in results["sizes"]:
        losses = [r["val_loss"] for r in results["runs"] if r["size"] == size["size"]]
        assert losses == sorted(losses, reverse=True)
    longest = [r["val_loss"] for r in results["runs"] if r["steps"] == max(r["steps"] for r in results["runs"])]
    assert longest[-1] < longest[0]
    assert {"loss_vs_params", "joint"} <= set(results["heldout"])
    assert math.isfinite(results["heldout"]["joint"]["error"])
    report = (quick_run / "report.md").read_text()
    assert "## Scaling laws" in report and "experiments/scaling.png" in report
    assert (quick_run / "experiments" / "scaling.png").is_file()

    # A second sweep reuses every point it already trained.
    assert main(["experiment", "scaling", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    again = json.loads(results_path(quick_run, "scaling").read_text())
    assert all(r["reused"] for r in again["runs"])
    assert [r["val_loss"] for r in again["runs"]] == [r["val_loss"] for r in results["runs"]]
