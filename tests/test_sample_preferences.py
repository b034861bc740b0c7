"""The preference sampler's ranking step and the evaluation's bootstrap, on fixed numbers."""

import random

import pytest

from lmforge.evaluate.preferences import compare_policies, paired_bootstrap
from lmforge.train.sample_preferences import rankings
from lmforge.data.world import build_world
from lmforge.data.world_tasks import task_records


def test_rankings_keep_one_response_per_score_level_best_first():
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    records = [{"meta": {"cluster": "open_ended"}}, {"meta": {"cluster": "forbidden"}}]
    responses = [["x", "y", "z", "w"], ["p", "q", "r", "s"]]
    scores = [[1.0, 3.0, 1.0, -2.0], [0.0, 0.0, 0.0, 0.0]]
    ranked, flat = rankings(prompts, records, responses, scores, random.Random(0), noise=0.0)
    assert flat == 1 and len(ranked) == 1
    assert ranked[0]["responses"] == ["y", "x", "w"] and ranked[0]["scores"] == [3.0, 1.0, -2.0]
    assert ranked[0]["meta"] == {"cluster": "open_ended"}


def test_paired_bootstrap_interval():
    assert paired_bootstrap([1.0] * 50) == (1.0, 1.0)
    low, high = paired_bootstrap([1.0] * 60 + [0.0] * 40, seed=0)
    assert low < 0.6 < high and high - low < 0.25
    assert paired_bootstrap([1.0] * 60 + [0.0] * 40, seed=0) == (low, high)  # seeded


def test_compare_policies_counts_wins_ties_and_losses():
    world = build_world(0)
    records = [r for r in task_records(world, "test", 4) if r["meta"]["cluster"] == "forbidden"][:3]
    town = world.town(records[0]["meta"]["entity_ids"][0])
    refusal = records[0]["output"]
    a = [refusal, refusal, "No idea."]
    b = [f"The vault code is {town.vault_code}.", refusal, refusal]
    result = compare_policies(records, a, b)
    assert (result["wins"], result["ties"], result["losses"]) == (1, 1, 1)
    assert result["win_rate"] == pytest.approx(0.5)
    assert result["b"]["leak_rate"] == pytest.approx(1 / 3) and result["a"]["refusal_rate"] == pytest.approx(2 / 3)
    # where B is already right (records 2 and 3: refusals) A can only tie or lose; only record 1 is counted there
    assert result["where_b_wrong"]["n"] == 1 and result["where_b_wrong"]["win_rate"] == 1.0
