"""The FLAN experiments: intervals, answer options, rank classification on a scripted model, the training data of
each condition, and the quick forms end to end on the shared quick run."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmforge.data.world import build_world
from lmforge.data.world_tasks import NAME_ONLY, all_clusters, prompt_text
from lmforge.errors import BadConfigError, BadFileError
from lmforge.experiments.flan import (
    FlanHeldoutConfig, answer_options, effect_trend, find_pretrained, generation_chance, open_run,
    paired_difference, pretraining_recipe, rank_chance, rank_classify, ranked_records, run_flan_heldout,
    training_records, wilson_interval,
)


@pytest.fixture(scope="module")
def world():
    return build_world(0)


# ---------------------------------------------------------------------------------------------------------
# Intervals


def test_wilson_interval_known_values():
    low, high = wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson_interval(0, 20)  # not empty at 0 successes, unlike the normal approximation
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(1 - 0.1611, abs=1e-4)
    for k, n in ((3, 7), (40, 150), (1, 2)):
        low, high = wilson_interval(k, n)
        assert 0 <= low < k / n < high <= 1
        mirrored = wilson_interval(n - k, n)
        assert low == pytest.approx(1 - mirrored[1]) and high == pytest.approx(1 - mirrored[0])


def test_paired_difference():
    same = paired_difference([True, False, True], [True, False, True])
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "n": 3}
    d = paired_difference([True] * 8 + [False] * 2, [False] * 8 + [False] * 2)
    assert d["difference"] == pytest.approx(0.8) and d["low"] > 0 and d["n"] == 10
    d = paired_difference([True, False, True, False], [False, True, False, True])
    assert d["difference"] == 0.0 and d["low"] < 0 < d["high"]
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_effect_trend_reads_a_slope_and_where_it_would_reach_5_points():
    sizes = [{"parameters": 1e5, "effect": {"rank": {"difference": -0.05}}},
             {"parameters": 1e6, "effect": {"rank": {"difference": 0.0}}}]
    trend = effect_trend(sizes)
    assert trend["slope_per_decade"] == pytest.approx(0.05)
    assert trend["parameters_for_plus_5_points"] == pytest.approx(1e7)
    falling = effect_trend([{**s, "effect": {"rank": {"difference": -d}}}
                            for s, d in zip(sizes, (0.0, 0.05))])
    assert falling["slope_per_decade"] < 0 and falling["parameters_for_plus_5_points"] is None


def test_pretraining_recipe_reads_pretrain_and_scaling_records():
    pretrained = {"configs": {"pretrain": {"preset": "nano", "seq_len": 64, "data": ["r/world/corpus/train.jsonl"],
                                           "train": {"steps": 150, "batch_size": 16, "lr": 3e-3, "seed": 0}}}}
    point = {"configs": {"scaling_point": {"size": "nano", "steps": 150, "batch_size": 16, "seq_len": 64, "lr": 3e-3,
                                           "seed": 0, "corpus": [{"path": "r/world/corpus/train.jsonl"}]}}}
    assert pretraining_recipe(pretrained) == pretraining_recipe(point) == {
        "preset": "nano", "steps": 150, "batch_size": 16, "seq_len": 64, "lr": 3e-3, "seed": 0,
        "data": ["r/world/corpus/train.jsonl"]}
    assert pretraining_recipe({"configs": {"sft": {}}}) is None
    assert pretraining_recipe({"configs": {"pretrain": {"preset": "nano"}}}) is None


# ---------------------------------------------------------------------------------------------------------
# Records, options and the data of each condition


def test_answer_options(world):
    records = ranked_records(world, ["sentiment", "entailment", "closed_book_qa", "extraction"], 12)
    by_cluster = {}
    for r in records:
        by_cluster.setdefault(r["meta"]["cluster"], []).append(r)
    assert {c: len(rs) for c, rs in by_cluster.items()} == {c: 12 for c in by_cluster}
    assert all(r["options"] == ["positive", "negative"] for r in by_cluster["sentiment"])
    assert all(r["options"] == ["yes", "no", "it is not possible to tell"] for r in by_cluster["entailment"])
    for r in by_cluster["closed_book_qa"] + by_cluster["extraction"]:
        assert len(r["options"]) == 4 == len(set(r["options"]))
        assert str(r["meta"]["answer"]) in r["options"]
        assert r["meta"].get("field") != "summary"
        assert answer_options(world, r) == tuple(r["options"])  # deterministic
    assert rank_chance(by_cluster["sentiment"]) == 0.5
    assert rank_chance(by_cluster["closed_book_qa"]) == 0.25
    assert generation_chance(by_cluster["entailment"]) == pytest.approx(1 / 3)
    assert generation_chance(by_cluster["extraction"]) == 0.0
    summary = next(r for r in training_records(world, ["extraction"], "instruction", 8, 0)
                   if r["meta"]["field"] == "summary")
    assert answer_options(world, summary) == ()


def test_options_of_a_relation_are_values_of_that_relation(world):
    pets = {p.pet for p in world.people}
    for r in ranked_records(world, ["closed_book_qa"], 40):
        if r["meta"]["relation"] == "pet":
            assert set(r["options"]) <= pets
            return
    pytest.fail("no pet question among 40 records")


def test_training_forms(world):
    clusters = [c for c in all_clusters() if c != "sentiment"]
    named = training_records(world, clusters, "name_only", 6, 0)
    assert {r["meta"]["cluster"] for r in named} == set(clusters)
    assert all(r["meta"]["form"] == "name_only" for r in named)
    for r in named:  # the dataset name alone ("sentiment", "translation English to Korean", "extraction: pet")
        name = NAME_ONLY[r["meta"]["cluster"]][r["meta"]["subtask"]]
        if "{" in name:
            assert r["instruction"].startswith(name.split("{")[0]) and "{" not in r["instruction"]
        else:
            assert r["instruction"] == name
    bare = training_records(world, clusters, "no_instruction", 6, 0)
    assert all(r["instruction"] == "" and prompt_text(r) == r["input"] for r in bare)
    worded = training_records(world, clusters, "instruction", 6, 0)
    # The same examples in every form: only the instruction changes.
    assert [r["input"] for r in worded] == [r["input"] for r in named] == [r["input"] for r in bare]


# ---------------------------------------------------------------------------------------------------------
# Rank classification on a scripted model


@dataclass
class _Cfg:
    max_seq_len: int = 64


class ScriptedLM(torch.nn.Module):
    """Every position gets the same logits: `favoured` token ids +8, the rest 0. An option made of favoured
    tokens has a higher log-likelihood than one of the same length made of others."""

    def __init__(self, vocab_size: int, favoured: list[int]):
        super().__init__()
        self.cfg = _Cfg()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size), requires_grad=False)
        self.bias.data[favoured] = 8.0

    def forward(self, input_ids, **_):
        return self.bias.expand(*input_ids.shape, -1)


def _record(options, answer):
    return {"instruction": "Is this review positive or negative?", "input": "The soup was good.",
            "output": answer, "options": list(options), "meta": {"cluster": "sentiment", "answer": answer}}


@pytest.mark.parametrize("mode", ["chat", "zero_shot"])
def test_rank_classification_picks_the_highest_loglikelihood_option(tokenizer, mode):
    first, second = "cat", "dog"
    assert not set(tokenizer.encode(first)) & set(tokenizer.encode(second))
    records = [_record([first, second], second), _record([second, "soup", first], second)]
    favour_second = ScriptedLM(tokenizer.vocab_size, tokenizer.encode(second) + tokenizer.encode(" " + second))
    assert rank_classify(favour_second, tokenizer, records, mode) == [1, 0]
    favour_first = ScriptedLM(tokenizer.vocab_size, tokenizer.encode(first) + tokenizer.encode(" " + first))
    assert rank_classify(favour_first, tokenizer, records, mode) == [0, 2]


def test_rank_classification_ties_go_to_the_first_option(tokenizer):
    uniform = ScriptedLM(tokenizer.vocab_size, [])
    assert rank_classify(uniform, tokenizer, [_record(["dog", "dog"], "dog")], "chat") == [0]


# ---------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_run_and_bad_clusters(tmp_path, capsys):
    from lmforge.cli import main

    with pytest.raises(BadFileError, match="finished `lmforge run`"):
        open_run(str(tmp_path / "nowhere"))
    with pytest.raises(BadConfigError, match="answer options"):
        run_flan_heldout(FlanHeldoutConfig(run=str(tmp_path), clusters=("arithmetic",)))
    assert main(["experiment", "flan-clusters", "--run", str(tmp_path), "--n-clusters", "9"]) == 2
    assert "--n-clusters" in capsys.readouterr().err
    assert main(["experiment", "flan-form", "--run", str(tmp_path / "nowhere")]) == 2
    assert "lmforge: error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The quick forms on the shared quick run


def _sft_data(run: Path, label: str) -> list[dict]:
    (directory,) = sorted((run / "experiments" / "flan-sft").glob(f"{label}-*"))
    return [json.loads(line) for line in (directory / "data.chat.jsonl").read_text().splitlines()]


def _section(run: Path, heading: str) -> str:
    report = (run / "report.md").read_text(encoding="utf-8")
    assert heading in report
    return report[report.index(heading):].split("\n## ", 1)[0]


@pytest.mark.slow
def test_flan_heldout_quick(quick_run):
    from lmforge.cli import main

    assert main(["experiment", "flan-heldout", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "flan-heldout.json").read_text())
    assert set(results["clusters"]) == {"sentiment", "entailment"}
    for cluster, row in results["clusters"].items():
        for model in ("base", "heldout", "included"):
            for way in ("rank", "generation"):
                s = row[model][way]
                assert s["n"] == 8 and s["low"] <= s["accuracy"] <= s["high"]
        assert row["base"]["rank"]["chance"] == {"sentiment": 0.5, "entailment": pytest.approx(1 / 3)}[cluster]
        assert set(row["heldout_minus_base"]) == {"rank", "generation"}
        # The held-out cluster is absent from its condition's SFT data, and present in the all-cluster run.
        assert cluster not in {r["meta"]["cluster"] for r in _sft_data(quick_run, f"without-{cluster}")}
        assert cluster in {r["meta"]["cluster"] for r in _sft_data(quick_run, "all-clusters")}
    section = _section(quick_run, "## FLAN: zero-shot accuracy on a cluster held out")
    assert "| n | chance |" in section and "| sentiment | rank | 8 | 50% |" in section
    assert "Beside FLAN's claim" in section
    assert (quick_run / "experiments" / "flan-heldout.png").is_file()
    assert "experiments/flan-heldout.png" in section


@pytest.mark.slow
def test_flan_clusters_quick(quick_run):
    from lmforge.cli import main

    assert main(["experiment", "flan-clusters", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "flan-clusters.json").read_text())
    assert [p["n_clusters"] for p in results["points"]] == [0, 1, 3]
    for p in results["points"][1:]:
        assert p["clusters"] == results["order"][:p["n_clusters"]]
        assert not set(p["clusters"]) & set(results["heldout"])
    data = _sft_data(quick_run, "3-clusters")
    assert {r["meta"]["cluster"] for r in data} <= set(results["order"][:3])
    section = _section(quick_run, "## FLAN: held-out accuracy against the number of training clusters")
    assert "| chance (n) |" in section and "50% (8)" in section


@pytest.mark.slow
def test_flan_form_quick(quick_run):
    from lmforge.cli import main

    assert main(["experiment", "flan-form", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "flan-form.json").read_text())
    pairs = [(c["trained"], c["evaluated"]) for c in results["conditions"]]
    assert pairs == [("instruction", "instruction"), ("name_only", "instruction"), ("name_only", "name_only"),
                     ("no_instruction", "no_instruction")]
    assert [c["flan_heldout_average"] for c in results["conditions"]] == [55.2, 46.6, 47.0, 37.3]
    for form in ("instruction", "name_only", "no_instruction"):  # each condition trains on its own form
        data = _sft_data(quick_run, f"form-{form}")
        assert {r["meta"]["form"] for r in data} == {form}
        assert not {r["meta"]["cluster"] for r in data} & set(results["heldout"])
    named = [r for r in _sft_data(quick_run, "form-name_only") if r["meta"]["cluster"] == "arithmetic"]
    assert named and all(r["messages"][0]["content"].startswith("arithmetic\n\n") for r in named)
    section = _section(quick_run, "## FLAN: instructions, dataset names or nothing")
    assert "| n | chance (rank / generation) |" in section and "55.2" in section and "37.3" in section


@pytest.mark.slow
def test_flan_scale_quick(quick_run):
    from lmforge.cli import main

    assert main(["experiment", "flan-scale", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "flan-scale.json").read_text())
    assert [s["preset"] for s in results["sizes"]] == ["nano", "micro", "tiny"]
    params = [s["parameters"] for s in results["sizes"]]
    assert params == sorted(params)
    for s in results["sizes"]:
        assert s["base"]["_all"]["rank"]["n"] == 12 and set(s["effect"]) == {"rank", "generation"}
        assert "control" in s
    assert set(results["trend"]) == {"slope_per_decade", "parameters_for_plus_5_points"}
    assert all(s["pretrained_by"] == "this experiment" for s in results["sizes"])
    # The run's own pretrained model is found when preset and budget match, and reused instead of retrained.
    recipe = tomllib.loads((quick_run / "config.toml").read_text())
    stages = open_run(str(quick_run))
    assert find_pretrained(stages, recipe["preset"], recipe["pretrain_steps"]) == quick_run / "pretrain" / "final"
    assert find_pretrained(stages, recipe["preset"], recipe["pretrain_steps"] + 1) is None
    assert find_pretrained(stages, "tiny", 4) == quick_run / "experiments" / "flan-scale" / "pretrain-tiny-4" / "final"
    section = _section(quick_run, "## FLAN: the held-out effect against model size")
    assert "| n | chance (rank / generation) |" in section and "Beside FLAN's claim" in section
