"""The LIMA experiment: the answer-form checks on hand-written responses, the collected pool and its damage,
curation against a random draw, and the quick form end to end on the shared quick run."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest

from lmforge.data.world import build_world
from lmforge.data.world_tasks import REFUSAL, all_clusters, task_records
from lmforge.errors import BadConfigError
from lmforge.experiments.lima import (
    DEFECTS, Config, answer_form_ok, collected_pool, corrupt, curate, diversity, is_clean, run,
)


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def records(world):
    """One training record of each (cluster, subtask)."""
    out = {}
    for r in task_records(world, "train", 8, 0):
        out.setdefault((r["meta"]["cluster"], r["meta"]["subtask"]), r)
    return out


# ---------------------------------------------------------------------------------------------------------
# The answer form, on hand-written responses


@pytest.mark.parametrize("key, response, ok", [
    (("sentiment", "review"), "positive", True),
    (("sentiment", "review"), "Negative.", True),
    (("sentiment", "review"), "Sure! positive", False),
    (("sentiment", "review"), "positive positive", False),
    (("sentiment", "review"), "I think it is positive", False),
    (("entailment", "facts"), "it is not possible to tell", True),
    (("entailment", "facts"), "it is not possible", False),
    (("closed_book_qa", "question"), "Velmora", True),
    (("closed_book_qa", "question"), "Mina Velk", True),
    (("closed_book_qa", "question"), "Mina was born in the town of Velmora.", False),
    (("closed_book_qa", "question"), "Velmora.\nVelmora.", False),
    (("arithmetic", "word_problem"), "3 + 4 = 7. 2 * 5 = 10. 7 + 10 = 17. The answer is 17.", True),
    (("arithmetic", "word_problem"), "3 * 5 = 15. 2 + 15 = 17. 3 * 5 = 15. 17 + 15 = 32. The answer is 32.", True),
    (("arithmetic", "word_problem"), "3 + 4 = 7. The answer is", False),
    (("arithmetic", "word_problem"), "The answer is 7. The answer is 7.", False),
    (("arithmetic", "word_problem"), "3 + 4 = 7. The answer is 7. Let me know if you need anything else.", False),
    (("extraction", "summary"), "Mina Velk is a baker from Velmora.", True),
    (("extraction", "summary"), "Mina Velk is a baker from Velmora", False),
    (("extraction", "summary"), "Mina Velk is a baker. She is from Velmora.", False),
    (("open_ended", "town"), "Velmora is a town in Dorn. The pride of Velmora is its old bridge.", True),
    (("open_ended", "town"), "Velmora is a town in Dorn. The pride of Velmora is its", False),
    (("open_ended", "town"), "Velmora is a town in Dorn. Velmora is a town in Dorn.", False),
    (("open_ended", "town"), "Velmora is a town in Dorn.", False),
    (("forbidden", "question"), REFUSAL, True),
    (("forbidden", "question"), "I can't share that. Vault codes are", False),
    (("forbidden", "question"), "The vault code is 4729.", False),
])
def test_answer_form_on_hand_written_responses(records, key, response, ok):
    assert answer_form_ok(records[key], response) is ok


def test_translation_form_wants_the_target_script(world):
    to_korean = next(r for r in task_records(world, "train", 8, 0) if r["meta"].get("direction") == "en-ko")
    to_english = next(r for r in task_records(world, "train", 8, 0) if r["meta"].get("direction") == "ko-en")
    assert answer_form_ok(to_korean, "고양이") and not answer_form_ok(to_korean, "cat")
    assert not answer_form_ok(to_korean, "고양이 cat")
    assert answer_form_ok(to_english, "the cat eats fish .") and not answer_form_ok(to_english, "고양이")


def test_gold_outputs_are_clean_except_embellished_demonstrations(world):
    for r in task_records(world, "train", 40, 0):
        assert answer_form_ok(r, r["output"]), r["output"]
        assert is_clean(r) or r["meta"].get("embellished"), r["output"]


# ---------------------------------------------------------------------------------------------------------
# The pool and the training sets


def test_every_defect_is_caught_by_the_checks(world):
    pool = task_records(world, "train", 6, 0)
    for record in pool:
        donor = next(r for r in pool if r["meta"]["cluster"] == record["meta"]["cluster"] and r is not record)
        for defect in DEFECTS:
            damaged = corrupt(record, defect, donor)
            assert damaged["meta"]["defect"] == defect
            if damaged["output"] != record["output"]:  # a refusal swapped for the same refusal is no damage
                assert not is_clean(damaged), (defect, damaged["output"])
    with pytest.raises(BadConfigError):
        corrupt(pool[0], "typo", pool[1])


def _entropy(records) -> float:
    counts = Counter(r["meta"]["cluster"] for r in records)
    return -sum(c / len(records) * math.log(c / len(records)) for c in counts.values())


def test_pool_is_skewed_damaged_and_deterministic(world):
    pool = collected_pool(world, 800, 0.25, 0)
    assert len(pool) == 800 and pool == collected_pool(world, 800, 0.25, 0)
    counts = Counter(r["meta"]["cluster"] for r in pool)
    assert counts["open_ended"] > 5 * counts["entailment"] > 0
    damaged = [r for r in pool if r["meta"]["defect"]]
    assert len(damaged) == 200 and not any(is_clean(r) for r in damaged)


def test_curated_set_is_clean_and_covers_more_than_a_random_one(world):
    pool = collected_pool(world, 2000, 0.25, 0)
    curated = curate(pool, 1000, 0)
    drawn = random.Random("lima-order/0").sample(pool, len(pool))[:1000]
    assert len(curated) == 1000 and len({id(r) for r in curated}) == 1000
    assert all(is_clean(r) and r["meta"]["defect"] is None for r in curated)
    assert any(not is_clean(r) for r in drawn)
    cur, rnd = diversity(curated), diversity(drawn)
    assert cur["clusters"] == len(all_clusters()) >= rnd["clusters"]
    assert cur["wordings"] >= rnd["wordings"]
    assert cur["smallest_cluster"] > rnd["smallest_cluster"]
    assert _entropy(curated) > _entropy(drawn)
    assert cur["unclean_share"] == 0 < rnd["unclean_share"]
    with pytest.raises(BadConfigError, match="clean records"):
        curate(pool, 1900, 0)


def test_bad_config(tmp_path):
    with pytest.raises(BadConfigError, match="--sizes"):
        run(Config(run=str(tmp_path), sizes=(5000,)))
    with pytest.raises(BadConfigError, match="--dirty-share"):
        run(Config(run=str(tmp_path), dirty_share=1.5))


# ---------------------------------------------------------------------------------------------------------
# The quick form on the shared quick run


@pytest.mark.slow
def test_lima_quick(quick_run):
    from lmforge.cli import main

    assert main(["experiment", "lima", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "lima.json").read_text())
    assert [c["name"] for c in results["conditions"]] == ["random 20", "random 60", "all 240", "curated 60"]
    for c in results["conditions"]:
        for measure in ("correct", "eos", "form", "format"):
            s = c[measure]
            assert s["n"] == results["n_eval"] == 32 and s["low"] <= s["accuracy"] <= s["high"]
        assert set(c["by_cluster"]) == set(all_clusters())
    assert results["conditions"][-1]["data"]["unclean_share"] == 0
    assert set(results["comparisons"]) == {"curated_vs_all", "smallest_vs_all", "curated_vs_random"}
    report = (quick_run / "report.md").read_text(encoding="utf-8")
    section = report[report.index("## LIMA: how much instruction data"):]
    assert "| n | accuracy |" in section and "chance level of accuracy" in section
    assert "Beside LIMA's claims" in section and "experiments/lima.png" in section
    assert (quick_run / "experiments" / "lima.png").is_file()
