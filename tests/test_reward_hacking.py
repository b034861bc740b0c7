"""The reward-hacking experiment: the weak comparisons it trains on, and its quick form on the shared run."""

from __future__ import annotations

import json

import pytest

from lmforge.cli import main
from lmforge.experiments.reward_hacking import weak_comparisons

RANKED = [{"prompt": [{"role": "user", "content": f"q{i}"}], "responses": [f"best{i}", f"mid{i}", f"worst{i}"]}
          for i in range(50)]


def test_weak_comparisons_take_the_first_n_best_against_worse_pairs():
    pairs = weak_comparisons(RANKED, 7, noise=0.0, seed=0)
    assert len(pairs) == 7
    assert [(p["chosen"], p["rejected"]) for p in pairs[:2]] == [("best0", "mid0"), ("best0", "worst0")]
    assert all(p["chosen"].startswith("best") for p in pairs)


def test_label_noise_flips_about_its_share():
    pairs = weak_comparisons(RANKED * 20, 2000, noise=0.3, seed=0)
    flipped = sum(p["rejected"].startswith("best") for p in pairs) / len(pairs)
    assert 0.25 < flipped < 0.35


def test_the_kl_coefficients_must_start_with_no_leash(quick_run, capsys):
    assert main(["experiment", "reward-hacking", "--run", str(quick_run), "--quick", "--kl-coefs", "0.1", "0.2"]) == 2
    assert "must start with 0" in capsys.readouterr().err


def test_quick_reward_hacking_on_the_shared_run(quick_run):
    assert main(["experiment", "reward-hacking", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "reward-hacking.json").read_text())
    assert set(results["runs"]) == {"0", "0.1"}
    assert results["weak_reward_model"]["comparisons"] <= 100
    for r in results["runs"].values():
        assert len(r["iterations"]) == 2 and r["before"]["n"] == r["after"]["n"] == 16
        assert r["iterations"][0]["kl"] == pytest.approx(0.0, abs=1e-4)
        assert {"proxy", "proxy_se", "gold", "gold_se"} <= set(r["after"])
    # both PPO runs start from the same SFT model, measured on the same prompts with the same seeds
    assert results["runs"]["0"]["before"] == results["runs"]["0.1"]["before"]
    assert set(results["findings"]) == {"hacked", "leash_holds"}
    report = (quick_run / "report.md").read_text()
    assert "## Experiment: reward hacking" in report and (quick_run / "experiments" / "reward_hacking.png").is_file()
