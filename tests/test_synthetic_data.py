"""The synthetic-data experiment: seeds, task typing, output-first inputs, the instruction funnel with a stub
generator, and its quick form on the shared run."""

from __future__ import annotations

import json
import random
from collections import Counter

from lmforge.cli import main
from lmforge.experiments.synthetic_data import (Config, choose_seeds, draw_inputs, generate_instructions,
                                                task_type)


def _record(cluster: str, instruction: str, answer=None, input_: str = "x") -> dict:
    return {"instruction": instruction, "input": input_, "output": str(answer),
            "meta": {"cluster": cluster, "answer": answer, "form": "instruction"}}


TRAIN = ([_record("sentiment", "Classify the review as positive or negative.", "positive", f"good {i}")
          for i in range(9)]
         + [_record("sentiment", "Is this review positive or negative?", "negative", f"bad {i}") for i in range(3)]
         + [_record("open_ended", "Write a few sentences about this town.", None, f"Town{i}") for i in range(5)])


def test_seeds_take_distinct_instructions_per_cluster():
    seeds = choose_seeds(TRAIN, ["sentiment", "open_ended"], 2, random.Random(0))
    assert Counter(s["meta"]["cluster"] for s in seeds) == {"sentiment": 2, "open_ended": 2}
    assert len({s["instruction"] for s in seeds if s["meta"]["cluster"] == "sentiment"}) == 2


def test_task_type_is_the_cluster_of_the_most_similar_seed():
    seeds = choose_seeds(TRAIN, ["sentiment", "open_ended"], 1, random.Random(0))
    assert task_type("Classify this review as good or bad.", seeds) == "sentiment"
    assert task_type("Write two sentences about the town.", seeds) == "open_ended"


def test_classification_inputs_are_drawn_label_first_so_labels_are_balanced():
    drawn = draw_inputs("sentiment", TRAIN, 400, random.Random(0))
    labels = Counter(r["meta"]["answer"] for r in drawn)
    assert 0.4 < labels["negative"] / 400 < 0.6  # 3 of 12 records are negative, half the draws are
    generation = draw_inputs("open_ended", TRAIN, 3, random.Random(0))
    assert len({r["input"] for r in generation}) == 3  # input-first: distinct world inputs


def test_the_instruction_funnel_counts_every_candidate_once():
    replies = iter([
        (" Name a town in the north.\n6. Classify the review as positive or negative.\n7. Draw a map of Donis.", "stop"),
        (" Hi\n6. Tell a short story about the baker of Velmora, with a happy end.", "stop"),
        (" Describe the river near Kiford in two sentences.", "length"),
    ])

    def complete(prompts, params):
        return [next(replies, (" Hi", "stop")) for _ in prompts]

    cfg = Config(n_instructions=3, max_rounds=1, n_context=2)
    kept, funnel = generate_instructions(complete, ["Classify the review as positive or negative.",
                                                    "Write a few sentences about this town."],
                                         cfg, random.Random(0), progress=False)
    assert [k["instruction"] for k in kept] == ["Name a town in the north.",
                                                "Tell a short story about the baker of Velmora, with a happy end."]
    assert funnel["similar"] == 1 and funnel["blacklist"] == 1 and funnel["truncated"] == 1
    assert funnel["generated"] == sum(v for k, v in funnel.items() if k != "generated")


def test_quick_synthetic_data_on_the_shared_run(quick_run):
    assert main(["experiment", "synthetic-data", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "synthetic-data.json").read_text())
    assert results["synthetic"] > 0 and set(results["variants"]) == {"seeds", "all", "curated", "random"}
    cur = results["curation"]
    assert cur["kept"] + cur["dropped"] + cur["unparseable"] == results["synthetic"]
    assert results["variants"]["random"]["examples"] == results["variants"]["curated"]["examples"] == cur["kept"]
    assert results["variants"]["all"]["examples"] == results["synthetic"]
    funnel = results["instruction_funnel"]
    assert funnel["generated"] == sum(v for k, v in funnel.items() if k != "generated")
    assert "## Experiment: synthetic instructions" in (quick_run / "report.md").read_text()
