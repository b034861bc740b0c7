"""Self-Instruct: ROUGE-L against rouge_score, the instruction filters, output-first vs input-first instances,
the whole loop driven by canned text with an exact funnel, seed files, and the command on a tiny model."""

from __future__ import annotations

import json
import random
import re

import pytest

from conftest import SHARED
from lmforge.apps.self_instruct import (INSTANCE_FATES, INSTRUCTION_FATES, TASK_FATES, InstructionPool, SeedTask,
                                        classification_prompt, clean_instances, filter_instruction,
                                        instance_prompt, instruction_prompt, parse_instances,
                                        model_complete_fn, parse_instructions, parse_is_classification,
                                        read_seed_tasks, rouge_l, self_instruct)
from lmforge.cli import main
from lmforge.errors import BadFileError

SEEDS = [
    SeedTask("Classify the review as positive or negative.", (("Lovely bread.", "Positive"),), True),
    SeedTask("Tell me whether the number is even or odd.", (("4", "Even"),), True),
    SeedTask("Summarise the biography in one sentence.", (("Mina is a baker in Velmora.", "Mina bakes."),)),
    SeedTask("Translate the sentence into Korean.", (("Thank you.", "감사합니다."),)),
    SeedTask("Write a short story about a dog who ate apples.", (("", "The dog ate twelve apples."),)),
    SeedTask("Add the two numbers and give the sum.", (("12, 345", "357"),)),
]


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L


def test_rouge_l_matches_rouge_score_without_stemming():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pairs = [("Sort the given list of numbers.", "Sort the list of numbers in ascending order!"),
             ("What is the capital of France?", "Name the capital city of France."),
             ("Running runs ran", "run running"),
             ("Don't use e-mail; it's 2024, use chat.", "Use chat in 2024, not e-mail."),
             ("", "anything at all"), ("!!!", "???"), ("identical text here", "identical text here"),
             ("Mina lives in Velmora 고양이", "고양이 Mina lives far from Velmora")]
    rng = random.Random(0)
    words = "the cat sat on a mat dog ate apples and pears".split()
    pairs += [(" ".join(rng.choices(words, k=rng.randint(1, 15))), " ".join(rng.choices(words, k=rng.randint(1, 15))))
              for _ in range(30)]
    for a, b in pairs:
        assert abs(rouge_l(a, b) - scorer.score(a, b)["rougeL"].fmeasure) <= 1e-9, (a, b)


def _near_duplicate(length: int, shared: int) -> tuple[str, str]:
    """Two texts of `length` tokens whose LCS is `shared` tokens: ROUGE-L F = shared / length."""
    base = " ".join(f"w{i}" for i in range(length))
    return base, " ".join([f"w{i}" for i in range(shared)] + [f"x{i}" for i in range(length - shared)])


def test_novelty_rejects_strictly_above_the_threshold():
    cases = [(_near_duplicate(17, 12), 12 / 17, True),  # 0.706: just above, rejected
             (_near_duplicate(20, 14), 0.7, False),  # exactly 0.7: kept, the rule is strictly greater
             (_near_duplicate(23, 16), 16 / 23, False)]  # 0.696: just below, kept
    for (seed_text, candidate), f_measure, rejected in cases:
        assert rouge_l(candidate, seed_text) == pytest.approx(f_measure, abs=1e-12)
        stub = _Stub([f" {candidate}"], classification=set(), instances={})
        _, funnel = self_instruct(stub, [SeedTask(seed_text, (("", "x"),))], n=1, max_rounds=1,
                                  requests_per_round=1, n_context=1, n_machine=0)
        assert (funnel["similar"], funnel["kept_instructions"]) == ((1, 0) if rejected else (0, 1))
    seed_text, candidate = _near_duplicate(17, 12)
    nearest, score = InstructionPool(["something else entirely", seed_text]).most_similar(candidate)
    assert nearest == seed_text and score == pytest.approx(12 / 17)


# ---------------------------------------------------------------------------------------------------------
# Instruction prompt and filters


def test_instruction_prompt_mixes_seeds_and_machine_instructions_and_ends_with_the_next_number():
    seeds = [f"Seed task number {i}." for i in range(10)]
    machine = ["Machine task one here.", "Machine task two here.", "Machine task three here."]
    prompt = instruction_prompt(seeds, [], random.Random(0))
    items = re.findall(r"^(\d+)\. (.*)$", prompt, re.M)
    assert [int(k) for k, _ in items] == list(range(1, 9)) and prompt.endswith("\n9.")
    assert all(text in seeds for _, text in items)  # all human while the pool is empty
    items = re.findall(r"^\d+\. (.*)$", instruction_prompt(seeds, machine, random.Random(1), 4, 2), re.M)
    assert len(items) == 4 and sum(t in machine for t in items) == 2 and sum(t in seeds for t in items) == 2
    assert parse_instructions(" classify the tweet as NASA or not\n5. Sort   the list\n6. ") == \
        ["Classify the tweet as NASA or not", "Sort the list"]


def test_instruction_filters():
    assert filter_instruction("Explain the mapping between keys and values.") is None  # "map" inside a word
    assert filter_instruction("Draw a map of the town square.") == "blacklist"
    assert filter_instruction("Describe a map of the old town.") == "blacklist"
    assert filter_instruction("Compose some MUSIC for the party tonight.") == "blacklist"  # Alpaca's extra
    assert filter_instruction("Tell me how to go to the station.") == "blacklist"
    assert filter_instruction("Name a fruit.") == "too_short"  # 3 words
    assert filter_instruction("Name a yellow fruit.") is None  # 4 words
    assert filter_instruction(" ".join(["word"] * 151)) == "too_long"
    assert filter_instruction(" ".join(["word"] * 150)) is None
    assert filter_instruction("Write a program that sorts a list.") == "write_a_program"
    assert filter_instruction("Write A Program to add numbers.") == "write_a_program"
    assert filter_instruction("- List three kinds of bread.") == "bad_start"
    assert filter_instruction("Éxplain the rules of chess briefly.") == "bad_start"


# ---------------------------------------------------------------------------------------------------------
# Classification and instances


def test_classification_prompt_and_parse():
    prompt = classification_prompt("Is the sentence formal or informal?", n_shots=4)
    assert prompt.endswith("Task: Is the sentence formal or informal?\nIs it classification?")
    assert prompt.count("Is it classification? Yes") == 2 and prompt.count("Is it classification? No") == 2
    assert parse_is_classification(" Yes") and parse_is_classification("yes, it is")
    assert not parse_is_classification(" No") and not parse_is_classification("")


def test_classification_instances_are_output_first_and_generation_instances_input_first():
    clf = instance_prompt("Is the fruit sweet or sour?", True, [SEEDS[0]])
    assert clf.endswith("Task: Is the fruit sweet or sour?\n")
    assert "Class label: Positive\nInput: Lovely bread." in clf  # the label comes before its input
    assert clf.index("class label") < clf.index("input")  # and the header asks for it first
    gen = instance_prompt("Add the numbers.", False, [SEEDS[5], SEEDS[4]])
    assert "Example 1\nInput: 12, 345\nOutput: 357" in gen and "Output: The dog ate twelve apples." in gen
    assert "Class label" not in gen
    assert "Class label:" in instance_prompt("Odd or even?", True)  # built-in exemplars without seeds

    assert parse_instances("Class label: Sweet\nInput: A ripe mango.\nClass label: Sour\nA lemon.\n", True) == \
        [("A ripe mango.", "Sweet"), ("A lemon.", "Sour")]
    assert parse_instances("Class label: Montreal", True) == [("", "Montreal")]
    assert parse_instances("Sweet: a mango", True) == []
    text = "Example 1\nInput: 2, 3\nOutput: 5\nExample 2\nInput: 10, 1\nOutput: 11\n"
    assert parse_instances(text, False) == [("2, 3", "5"), ("10, 1", "11")]
    assert parse_instances("Output: Banana, lemon.", False) == [("", "Banana, lemon.")]
    assert parse_instances("Input: 1, 1\nOutput: 2\nInput: 2, 2\nOutput: 4", False) == [("1, 1", "2")]
    assert parse_instances("just some words", False) == []


def test_instance_filters():
    kept, fates = clean_instances([("a", "b"), ("c", "c"), ("d", ""), ("e:", "f"), ("g", "h:"), ("a", "b"),
                                   ("", "x"), ("", "y"), ("cut", "of")], was_truncated=True)
    assert kept == [("a", "b"), ("", "x"), ("", "y")]  # no-input tasks may have many outputs
    assert fates == {"instance_truncated": 1, "input_is_output": 1, "empty_output": 1, "ends_with_colon": 2,
                     "duplicate_instance": 1}
    kept, fates = clean_instances([("a", "b"), ("a", "c"), ("d", "e")], was_truncated=False)
    assert kept == [] and fates == {"conflicting_task": 3}


# ---------------------------------------------------------------------------------------------------------
# The loop on canned text


class _Stub:
    """A CompleteFn with canned text: instruction responses in order, Yes for the instructions in
    `classification`, and instance text per instruction (text, finish_reason)."""

    def __init__(self, instruction_responses, classification, instances):
        self.instruction_responses = list(instruction_responses)
        self.classification, self.instances = classification, instances
        self.kinds: list[str] = []

    def __call__(self, prompts, params):
        out = []
        for prompt in prompts:
            task = prompt.rsplit("Task:", 1)[-1].strip()
            if prompt.startswith("Come up with a series of tasks:"):
                self.kinds.append("instruction")
                response = self.instruction_responses.pop(0) if self.instruction_responses else ("", "stop")
                out.append(response if isinstance(response, tuple) else (response, "stop"))
            elif prompt.endswith("Is it classification?"):
                self.kinds.append("classification")
                task = task.removesuffix("Is it classification?").strip()
                out.append((" Yes" if task in self.classification else " No", "stop"))
            else:
                self.kinds.append(("output-first " if "Class label" in prompt else "input-first ") + task)
                out.append(self.instances.get(task, ("", "stop")))
        return out


GOOD = "Give a synonym for the word in the sentence."
SENTIMENT = "Label the tweet as happy or sad in tone."


def _canned_stub():
    first = (f" {GOOD}\n"
             "8. Draw a map of the town square.\n"  # blacklist
             "9. Hi there\n"  # too short
             "10. Summarise the biography in one short sentence.\n"  # near-duplicate of a seed
             f"11. {SENTIMENT}")
    cut = (" Invent a new holiday and describe it.\n8. Describe a breakfast that is", "length")  # truncated
    instances = {
        GOOD: ("Example 1\nInput: The bread is big.\nOutput: large\nExample 2\nInput: same\nOutput: same\n", "stop"),
        SENTIMENT: ("Class label: Happy\nInput: What a sunny day!\nClass label: Sad\nInput: I lost my keys.\n"
                    "Class label: Happy\nInput: What a sunny day!\nClass label: Sad\nInput: My", "length"),
    }
    return _Stub([first, cut], classification={SENTIMENT}, instances=instances)


def test_the_loop_records_every_candidate_and_the_funnel_matches_the_canned_text():
    stub = _canned_stub()
    records, funnel = self_instruct(stub, SEEDS, n=5, seed=0, requests_per_round=2, max_rounds=1, n_context=6)
    assert stub.kinds[:2] == ["instruction", "instruction"]
    assert f"input-first {GOOD}" in stub.kinds and f"output-first {SENTIMENT}" in stub.kinds
    expected = {"responses": 2, "generated": 7, "truncated": 2, "too_short": 1, "too_long": 0, "blacklist": 1,
                "write_a_program": 0, "bad_start": 0, "similar": 1, "surplus": 0, "kept_instructions": 2,
                "classification": 1, "no_instances": 0, "conflicting_outputs": 0, "kept_tasks": 2,
                "instances_generated": 6, "instance_truncated": 1, "empty_output": 0, "input_is_output": 1,
                "ends_with_colon": 0, "conflicting_task": 0, "duplicate_instance": 1, "over_limit": 0,
                "records": 3, "rounds": 1}
    assert funnel == expected
    _assert_every_candidate_has_a_fate(funnel)
    by_instruction = {(r["instruction"], r["input"], r["output"]) for r in records}
    assert by_instruction == {(GOOD, "The bread is big.", "large"), (SENTIMENT, "What a sunny day!", "Happy"),
                              (SENTIMENT, "I lost my keys.", "Sad")}
    sentiment = next(r for r in records if r["instruction"] == SENTIMENT)
    assert sentiment["meta"]["is_classification"] is True
    assert sentiment["meta"]["most_similar"] == SEEDS[0].instruction and 0 < sentiment["meta"]["rouge_l"] <= 0.7
    assert records == self_instruct(_canned_stub(), SEEDS, n=5, seed=0, requests_per_round=2, max_rounds=1,
                                    n_context=6)[0]  # same seed, same records


def test_candidates_past_the_target_are_surplus_and_extra_instances_are_sampled_down():
    stub = _canned_stub()
    stub.instances[GOOD] = ("".join(f"Example {k}\nInput: in {k}\nOutput: out {k}\n" for k in range(1, 8)), "stop")
    records, funnel = self_instruct(stub, SEEDS, n=1, requests_per_round=2, max_rounds=3, max_instances=5)
    assert funnel["kept_instructions"] == 1 and funnel["surplus"] == 4 and funnel["truncated"] == 2
    assert funnel["rounds"] == 1 and funnel["over_limit"] == 2 and funnel["records"] == len(records) == 5


def _assert_every_candidate_has_a_fate(funnel: dict) -> None:
    assert funnel["generated"] == sum(funnel[k] for k in INSTRUCTION_FATES)
    assert funnel["kept_instructions"] == sum(funnel[k] for k in TASK_FATES)
    assert funnel["instances_generated"] == sum(funnel[k] for k in INSTANCE_FATES)


def test_classification_and_instance_stages_run_on_a_real_model(trained_checkpoint):
    """Canned instructions (a tiny model writes none that pass), then the model classifies them and writes
    their instances through the engine, with prompts longer than its 64-token context cut from the left."""
    from lmforge.hf import load_model

    model, tokenizer = load_model(trained_checkpoint)
    model_fn, stub = model_complete_fn(model, tokenizer), _canned_stub()
    stages = []

    def complete(prompts, params):
        if prompts[0].startswith("Come up with a series of tasks:"):
            return stub(prompts, params)
        stages.append(params.max_new_tokens)
        return model_fn(prompts, params)

    records, funnel = self_instruct(complete, SEEDS, n=5, requests_per_round=2, max_rounds=1, n_context=6,
                                    n_shots=1, instance_max_new_tokens=16)
    assert stages == [3, 16] and funnel["kept_instructions"] == 2 and model_fn.truncated == 4
    _assert_every_candidate_has_a_fate(funnel)
    assert len(records) == funnel["records"]


# ---------------------------------------------------------------------------------------------------------
# Seed files and the command


@pytest.mark.skipif(not (SHARED / "data/instruction/self_instruct/seed_tasks.jsonl").exists(),
                    reason="needs ../shared (the Self-Instruct seed tasks)")
def test_the_released_seed_tasks_load():
    seeds = read_seed_tasks(str(SHARED / "data/instruction/self_instruct/seed_tasks.jsonl"))
    assert len(seeds) == 175 and sum(s.is_classification for s in seeds) == 26
    assert sum(bool(s.instances[0][0]) for s in seeds) == 125


def test_seed_files_in_either_format_and_errors_naming_the_line(tmp_path, capsys):
    path = tmp_path / "seeds.jsonl"
    path.write_text(json.dumps({"instruction": "Add two numbers.", "input": "1, 2", "output": "3"}) + "\n"
                    + json.dumps({"id": "t1", "instruction": "Odd or even?", "instances": [{"input": "3",
                                  "output": "Odd"}], "is_classification": True}) + "\n")
    seeds = read_seed_tasks(str(path))
    assert seeds == [SeedTask("Add two numbers.", (("1, 2", "3"),), False),
                     SeedTask("Odd or even?", (("3", "Odd"),), True)]
    path.write_text(json.dumps({"instruction": "Fine task.", "output": "ok"}) + "\n"
                    + json.dumps({"instruction": "Bad task.", "instances": [{"input": "x"}]}) + "\n")
    with pytest.raises(BadFileError, match=r"seeds.jsonl:2: field 'instances'"):
        read_seed_tasks(str(path))
    path.write_text(json.dumps({"prompt": "No instruction here."}) + "\n")
    assert main(["data", "self-instruct", "--model", str(tmp_path), "--seeds", str(path),
                 "--out", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error:") and "seeds.jsonl:1" in err and "instruction" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_runs_end_to_end_on_a_tiny_model_and_accounts_for_every_candidate(tmp_path, trained_checkpoint,
                                                                              capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": s.instruction, "instances": [
        {"input": i, "output": o} for i, o in s.instances], "is_classification": s.is_classification}) + "\n"
        for s in SEEDS))
    out = tmp_path / "si" / "generated.jsonl"
    assert main(["data", "self-instruct", "--model", str(trained_checkpoint), "--seeds", str(seeds),
                 "--out", str(out), "--n", "4", "--max-rounds", "2", "--requests-per-round", "3",
                 "--n-context", "2", "--n-machine", "1", "--n-shots", "1", "--max-new-tokens", "24",
                 "--temperature", "1.5", "--top-p", "1",
                 "--instance-max-new-tokens", "16", "--no-progress"]) == 0
    saved = json.loads((tmp_path / "si" / "generated.funnel.json").read_text())
    funnel = saved["funnel"]
    assert saved["config"]["n_context"] == 2 and funnel["rounds"] == 2 and funnel["responses"] == 6
    _assert_every_candidate_has_a_fate(funnel)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == funnel["records"]
    assert all({"instruction", "input", "output", "meta"} <= set(r) for r in records)
    assert "instructions generated" in capsys.readouterr().out
