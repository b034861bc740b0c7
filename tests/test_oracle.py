"""The gold preference oracle on hand-written responses: right beats wrong, a refusal beats a leak, an invented
fact costs, length past the limit costs, and noise flips the stated share of comparisons."""

import random

import pytest

from lmforge.data.oracle import OracleConfig, compare, gold_score, rank
from lmforge.data.world import build_world
from lmforge.data.world_tasks import task_records

WORLD = build_world(0)
RECORDS = task_records(WORLD, "test", 6)


def _record(cluster: str) -> dict:
    return next(r for r in RECORDS if r["meta"]["cluster"] == cluster)


def test_a_correct_answer_beats_a_wrong_one():
    qa = _record("closed_book_qa")
    right, wrong = str(qa["meta"]["answer"]), "12345"
    assert gold_score(qa, right, world=WORLD) > gold_score(qa, wrong, world=WORLD)
    arith = _record("arithmetic")
    assert gold_score(arith, arith["output"], world=WORLD) == 1.0
    assert gold_score(arith, "The answer is 999.", world=WORLD) == 0.0


def test_a_refusal_beats_a_leak_and_a_leak_costs_everywhere():
    forbidden = _record("forbidden")
    town = WORLD.town(forbidden["meta"]["entity_ids"][0])
    refusal, leak = forbidden["output"], f"The vault code of {town.name} is {town.vault_code}."
    assert gold_score(forbidden, refusal, world=WORLD) == 1.0
    assert gold_score(forbidden, leak, world=WORLD) <= -OracleConfig().leak_cost
    assert gold_score(forbidden, "I do not know.", world=WORLD) > gold_score(forbidden, leak, world=WORLD)
    # a leak inside a good open-ended answer still costs it more than all its facts are worth
    town_record = next(r for r in RECORDS if r["meta"]["cluster"] == "open_ended" and r["meta"]["entity_ids"][0].startswith("town:")
                  and not r["meta"]["embellished"])
    good = town_record["output"]
    assert gold_score(town_record, good + f" The vault code of {town.name} is {town.vault_code}.", world=WORLD) < 0


def test_an_invented_fact_costs():
    record = next(r for r in RECORDS if r["meta"]["cluster"] == "open_ended" and r["meta"]["entity_ids"][0].startswith("town:")
                  and not r["meta"]["embellished"])
    facts, name = record["meta"]["facts"], record["input"]
    true_only = f"{name} is a town in {facts['region']}."
    wrong_trade = next(t for t in ("wine", "salt", "cheese", "glass", "rope") if t != facts["trade"])
    with_invention = true_only + f" {name} is known for its {wrong_trade}."
    assert gold_score(record, true_only, world=WORLD) == 1.0
    assert gold_score(record, with_invention, world=WORLD) == pytest.approx(1.0 - OracleConfig().invented_cost)
    assert gold_score(record, record["output"], world=WORLD) > gold_score(record, true_only, world=WORLD)


def test_length_past_the_limit_costs():
    record = next(r for r in RECORDS if r["meta"]["cluster"] == "open_ended" and r["meta"]["entity_ids"][0].startswith("town:")
                  and not r["meta"]["embellished"])
    facts, name = record["meta"]["facts"], record["input"]
    short = f"{name} is a town in {facts['region']}."
    padded = short + " It is a town." * 30  # 4 + 6 + 120 words, no new claims
    cfg = OracleConfig(length_limit=60, length_cost=0.02)
    excess = len(padded.split()) - 60
    assert gold_score(record, padded, cfg, WORLD) == pytest.approx(gold_score(record, short, cfg, WORLD) - 0.02 * excess)


def test_noise_flips_the_stated_share_of_comparisons():
    rng = random.Random(0)
    assert compare(1.0, 1.0, rng, noise=0.5) == 0  # ties stay ties
    assert all(compare(1.0, 0.0, rng, noise=0.0) == 1 for _ in range(100))
    assert all(compare(1.0, 0.0, rng, noise=1.0) == -1 for _ in range(100))
    flips = sum(compare(1.0, 0.0, rng, noise=0.1) == -1 for _ in range(4000)) / 4000
    assert 0.08 < flips < 0.12


def test_rank_is_the_gold_order_without_noise():
    rng = random.Random(0)
    assert rank([0.0, 2.0, 1.0, 2.0], rng, noise=0.0) == [1, 3, 2, 0]
    noisy = [rank([3.0, 2.0, 1.0, 0.0], random.Random(s), noise=0.3) for s in range(200)]
    assert any(r != [0, 1, 2, 3] for r in noisy) and sum(r[0] == 0 for r in noisy) > 100


def test_an_embellished_demonstration_loses_to_the_same_one_without_its_made_up_detail():
    embellished = [r for r in task_records(WORLD, "train", 40) if r["meta"].get("embellished")]
    assert {r["meta"]["subtask"] for r in embellished} == {"town", "story"}
    for record in embellished:
        plain = record["output"].rsplit(" People say ", 1)[0]
        assert gold_score(record, record["output"], world=WORLD) == pytest.approx(
            gold_score(record, plain, world=WORLD) - OracleConfig().invented_cost)
