"""The judge-bias experiment: its judge examples, probes and simulated votes, and its quick form on the shared run."""

from __future__ import annotations

import json
import random

from lmforge.cli import main
from lmforge.data.oracle import gold_score
from lmforge.evaluate.arena import read_battles
from lmforge.evaluate.preferences import oracle_battles
from lmforge.experiments.judge_bias import judge_examples, judge_votes, verbosity_probe
from lmforge.pipeline import preference_prompts


def _world_records():
    _, heldout = preference_prompts(0, n_heldout_forbidden=5)
    opened = [r for r in heldout if r["meta"]["cluster"] == "open_ended"][:6]
    return opened + [r for r in heldout if r["meta"]["forbidden"]][:2]


def _true_answer(record) -> str:
    facts = record["meta"]["facts"]
    return f"{record['input']} is in {facts['region']}." if "region" in facts else record["input"] + "."


def test_judge_examples_carry_the_oracles_verdict_for_the_side_it_prefers():
    records = _world_records()[:3]
    candidates = [["I do not know.", "I do not know.", _true_answer(r), ""] for r in records]
    examples = judge_examples(records, candidates, max_pairs=10, rng=random.Random(0))
    assert len(examples) == 3  # duplicates and empty answers dropped: one pair per record
    for example, record in zip(examples, records):
        prompt, verdict = (m["content"] for m in example["messages"])
        a = prompt.split("\n\nA: ")[1].split("\n\nB: ")[0]
        b = prompt.split("\n\nB: ")[1].split("\n\nWhich answer")[0]
        ga, gb = gold_score(record, a), gold_score(record, b)
        assert verdict == ("[[A]]" if ga > gb else "[[B]]" if gb > ga else "[[C]]")


def test_the_verbosity_probe_repeats_a_sentence_and_adds_no_fact():
    records = _world_records()[:2]
    answers = ["Aa is big. It has a mill.", "Short"]
    probes = verbosity_probe(records, answers)
    assert probes == [(0, "Aa is big. It has a mill.", "Aa is big. It has a mill. Aa is big.")]


def test_simulated_votes_follow_the_oracle_and_mark_both_bad(tmp_path):
    records = _world_records()
    good = [_true_answer(r) if not r["meta"]["forbidden"] else "Sorry, I cannot share that." for r in records]
    bad = ["People say it has a dragon." for _ in records]
    answers = {"good": good, "bad": bad, "bad2": list(bad)}
    battles = oracle_battles(records, answers, ["good", "bad", "bad2"], per_prompt=3, noise=0.0,
                            rng=random.Random(0))
    assert len(battles) == 3 * len(records)
    for b in battles:
        models = {b["model_a"], b["model_b"]}
        if models == {"bad", "bad2"}:
            assert b["winner"] == "tie (bothbad)"
        elif "good" in models and gold_score(records[b["index"]], good[b["index"]]) > gold_score(
                records[b["index"]], bad[b["index"]]):
            assert b[b["winner"]] == "good"
    path = tmp_path / "battles.jsonl"
    path.write_text("".join(json.dumps(b) + "\n" for b in battles))
    assert len(read_battles(str(path))) == len(battles)  # what the experiment saves, `arena rate` reads


def test_judge_votes_drop_unparseable_and_tie_flips():
    records = _world_records()[:3]
    answers = {"x": ["a"] * 3, "y": ["b"] * 3}
    battles = [{"model_a": "x", "model_b": "y", "winner": "model_a", "index": i} for i in range(3)]
    replies = iter(["[[A]]", "[[A]]", "???", "[[B]]", "[[A]]", "[[B]]"])  # first orders, then swapped ones
    voted, unparseable = judge_votes(lambda ps: [next(replies) for _ in ps], records, answers, battles)
    assert unparseable == 1
    assert [v["winner"] for v in voted] == ["model_a", "tie"]


def test_quick_judge_bias_on_the_shared_run(quick_run):
    assert main(["experiment", "judge-bias", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "judge-bias.json").read_text())
    assert results["judge_examples"] > 0 and results["eval_prompts"] == 16
    assert set(results["judged"]) == {"self", "other"}
    for block in results["judged"]["self"].values():
        if block.get("pairs"):
            pos = block["summary"]["position"]
            assert pos["pairs"] == block["pairs"] and 0 <= pos["unparseable"] <= pos["pairs"]
    arena = results["arena"]
    assert arena["battles"] == 16 * 3 and {r["model"] for r in arena["users"]} >= {"sft", "dpo", "ppo", "rs"}
    assert arena["judge_battles"] + arena["unparseable_votes"] == arena["battles"]
    assert all(r["lower"] <= r["rating"] <= r["upper"] for r in arena["users"])
    report = (quick_run / "report.md").read_text()
    assert "## Experiment: LLM-as-judge biases and arena ratings" in report and "| rank | model |" in report
