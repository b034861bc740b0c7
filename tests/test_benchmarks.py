"""Benchmark readers, answer extraction and the task registry.

Readers are tested on the first records of the real files under ../shared/data (skipped when the folder is
absent) and, for malformed input, on small files written here: every error names the file and the line.
"""

import bz2
import json
from pathlib import Path

import pytest

from lmforge.errors import BadConfigError, BadFileError
from lmforge.evaluate import benchmarks as b
from lmforge.infer.prompting import majority_vote

from conftest import SHARED

DATA = SHARED / "data"
needs_data = pytest.mark.skipif(not (DATA / "eval").is_dir(), reason="../shared/data is absent")


def load(name: str) -> list[dict]:
    return b.TASKS[name].load(b.Sources(DATA))


# --- the real files --------------------------------------------------------------------------------------


@needs_data
def test_gsm8k_reads_the_answer_after_hashes_and_a_cot_reasoning():
    docs = load("gsm8k")
    assert len(docs) == 1319
    first = docs[0]
    assert first["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first["target"] == "18" and first["solution"].endswith("#### 18")
    assert first["reasoning"] == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day. "
                                  "She makes 9 * 2 = $18 every day at the farmer\u2019s market.")
    assert b.COT_FORMAT.target(first) == first["reasoning"] + " The answer is 18."
    assert len(b.GSM8K_TRAIN(b.Sources(DATA))) == 7473


@needs_data
def test_arc_challenge_raw_subset_and_dev_pool():
    docs = load("arc_challenge")
    assert len(docs) == 1150  # the subset the notes mention
    assert "SUBSET: 1,150 of the 1,172" in b.TASKS["arc_challenge"].notes
    assert docs[0]["query"].startswith("Question: An astronomer observes") and docs[0]["query"].endswith("\nAnswer:")
    assert docs[0]["choices"][docs[0]["gold"]] == "Planetary days will become shorter."
    assert len(b.TASKS["arc_challenge"].pool(b.Sources(DATA))) == 294


@needs_data
def test_arc_easy_options_are_parsed_back_from_the_instruction():
    docs = load("arc_easy")
    assert len(docs) == 2376
    assert docs[1]["choices"] == ["safety goggles", "breathing mask", "rubber gloves", "lead apron"]
    assert docs[1]["gold"] == 1 and docs[1]["target"] == "breathing mask"
    assert {len(d["choices"]) for d in docs} == {3, 4, 5}


@needs_data
def test_piqa_and_winogrande():
    piqa = load("piqa")
    assert len(piqa) == 1838 and len(piqa[0]["choices"]) == 2 and piqa[0]["gold"] == 0
    assert piqa[1]["choices"] == ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"]
    wino = load("winogrande")
    assert len(wino) == 1267
    assert wino[0]["contexts"] == ["Sarah was a much better surgeon than Maria so Sarah",
                                   "Sarah was a much better surgeon than Maria so Maria"]
    assert wino[0]["continuation"] == "always got the easier cases." and wino[0]["target"] == "Maria"


@needs_data
def test_hellaswag_six_lines_per_item_and_the_casing_note():
    docs = load("hellaswag")
    assert len(docs) == 10042
    assert docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. he"
    assert docs[0]["gold"] == 3 and docs[0]["target"] == "starts pulling up roofing on a roof."
    assert "lower-case" in b.TASKS["hellaswag"].notes


@needs_data
def test_klue_truthfulqa_and_wikitext():
    klue = load("klue_nli")
    assert len(klue) == 3000 and klue[0]["choices"] == ["True", "Neither", "False"] and klue[0]["gold"] == 2
    tqa = load("truthfulqa")
    assert len(tqa) == 817 and tqa[0]["target"] == "The watermelon seeds pass through your digestive system"
    assert "I have no comment." in tqa[0]["correct_answers"] and "You die" in tqa[0]["incorrect_answers"]
    wiki = load("wikitext2")
    assert len(wiki) == 62 and wiki[0]["target"] == "= Robert <unk> ="
    assert " @-@ " in wiki[0]["page"] and " @-@ " not in wiki[0]["text"]
    assert "guest-starring" in wiki[0]["text"]


def test_world_tasks_one_per_cluster_judged_by_the_world():
    assert {n for n in b.TASKS if n.startswith("world_")} == {f"world_{c}" for c in b.all_clusters()}
    docs = b.TASKS["world_sentiment"].load(b.Sources(DATA, world_seed=0, n_world=6))
    assert len(docs) == 6 and {d["record"]["meta"]["split"] for d in docs} == {"test"}
    judge = b.TASKS["world_sentiment"].judge
    assert judge(docs[0], docs[0]["output"]) and not judge(docs[0], "banana")
    pool = b.TASKS["world_sentiment"].pool(b.Sources(DATA))
    assert {d["record"]["meta"]["split"] for d in pool} == {"train"}
    arithmetic = b.TASKS["world_arithmetic"]
    doc = arithmetic.load(b.Sources(DATA, n_world=3))[0]
    [extract] = arithmetic.filters.values()  # votes go over the final number, not the whole working
    answer = extract(doc["output"] + " Q: more")
    assert answer == str(doc["record"]["meta"]["answer"]) and arithmetic.judge(doc, answer)


# --- malformed files name the file and the line ------------------------------------------------------------


def write(tmp_path: Path, relative: str, text: str) -> Path:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if relative.endswith(".bz2"):
        path.write_bytes(bz2.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_bad_json_line_is_named(tmp_path):
    good = json.dumps({"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"})
    path = write(tmp_path, "eval/gsm8k/test.jsonl", f"{good}\n{good}\n{{not json\n")
    with pytest.raises(BadFileError, match=r"test\.jsonl, line 3: not valid JSON"):
        b.TASKS["gsm8k"].load(b.Sources(tmp_path))
    path.write_text(f"{good}\n" + json.dumps({"question": "q", "answer": "no hashes"}) + "\n")
    with pytest.raises(BadFileError, match=r"line 2: answer has no final '#### N'"):
        b.read_gsm8k(path)


def test_bad_record_in_a_pretty_printed_json_list_names_its_first_line(tmp_path):
    good = {"instruction": "Please choose the correct solution to the question: Open a jar\n\nSolution1: twist"
                           "\n\nSolution2: shout\n\nAnswer format: solution1/solution2", "input": "",
            "answer": "solution1"}
    bad = {**good, "instruction": "Pick one: twist or shout"}
    path = write(tmp_path, "eval/llm-adapters/piqa/test.json", json.dumps([good, bad], indent=4))
    line = json.dumps([good, bad], indent=4).splitlines().index("    {", 2) + 1  # where record 2 begins
    with pytest.raises(BadFileError, match=rf"piqa/test\.json, line {line}: .*LLM-Adapters 'solution' format"):
        b.read_piqa(path)
    path.write_text(json.dumps([good]))
    assert b.read_piqa(path)[0]["choices"] == ["twist", "shout"]


def test_bad_hellaswag_label_and_arc_key(tmp_path):
    item = "Cooking: A man stirs a pot. he\n{}\nadds salt.\nsings.\nleaves.\ncries.\n"
    path = write(tmp_path, "h.txt.bz2", item.format(1) + item.format(7))
    with pytest.raises(BadFileError, match=r"h\.txt\.bz2, line 7: expected a context line, a gold label 0-3"):
        b.read_hellaswag(path)
    arc = {"id": "x", "question": {"stem": "?", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "B"}
    path = write(tmp_path, "arc.jsonl", json.dumps(arc) + "\n")
    with pytest.raises(BadFileError, match=r"arc\.jsonl, line 1: not an ARC question"):
        b.read_arc(path)


def test_missing_file_and_missing_fields(tmp_path):
    with pytest.raises(BadFileError, match=r"TruthfulQA\.csv: missing \(point --data-dir"):
        b.TASKS["truthfulqa"].load(b.Sources(tmp_path))
    path = write(tmp_path, "t.csv", "Question,Best Answer\nWhy?,Because\n")
    with pytest.raises(BadFileError, match=r"t\.csv, line 2: missing text field\(s\) \['Correct Answers'"):
        b.read_truthfulqa(path)
    path = write(tmp_path, "w.txt", "Some text without a heading\n = Title = \n")
    with pytest.raises(BadFileError, match=r"w\.txt, line 1: text before the first ' = Title = ' heading"):
        b.read_wikitext(path)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(BadConfigError, match=r"unknown task 'gsm9k'; known tasks: arc_challenge, arc_easy, gsm8k"):
        b.get_task("gsm9k")


def test_data_root_flag_then_env_then_the_folder_beside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("LMFORGE_SHARED", raising=False)
    assert b.data_root() == SHARED / "data"
    monkeypatch.setenv("LMFORGE_SHARED", str(tmp_path))
    assert b.data_root() == tmp_path / "data"
    assert b.data_root(str(tmp_path / "mine")) == tmp_path / "mine"


# --- extraction and judging on fixed strings -----------------------------------------------------------------


def test_gsm8k_filters_and_exact_match():
    strict, flexible = b.TASKS["gsm8k"].filters.values()
    text = "She pays 3 * $4 = $12.\n#### 1,200"
    assert strict(text) == "1,200" and flexible(text) == "1,200"
    assert strict("the total is 12") is None and flexible("from 3 to 12 apples") == "12"
    doc = {"target": "1200"}
    assert b.number_match(doc, "1,200") and b.number_match(doc, "$1200.") and b.number_match(doc, "#### 1200")
    assert not b.number_match(doc, "120") and not b.number_match(doc, None)
    cot_strict, cot_flexible = b.TASKS["gsm8k_cot"].filters.values()
    text = "4 + 7 = 11. The answer is 11. Q: next"
    assert cot_strict(text) == "11" and cot_flexible(text) == "11"
    assert cot_strict("so 5 and then 9") is None and cot_flexible("so 5 and then 9") == "9"


def test_regex_filter_takes_the_first_non_empty_group_and_the_selected_match():
    flexible = b.regex_filter(b.FLEXIBLE, -1)
    assert flexible("3 apples, then 7") == "7"  # the second alternative's group
    assert b.regex_filter(r"(\d+)", 0)("a 1 b 2") == "1"


def test_majority_vote_over_extracted_answers():
    _, flexible = b.TASKS["gsm8k_cot"].filters.values()
    answers = [flexible(t) for t in ("The answer is 5.", "The answer is 6.", "nothing", "The answer is 5.")]
    assert answers == ["5", "6", None, "5"] and majority_vote(answers) == "5"


def test_truthful_match_is_a_whole_word_contains_match():
    doc = {"correct_answers": ["Nothing happens", "I have no comment."], "incorrect_answers": ["You die"]}
    assert b.truthful_match(doc, "Nothing happens, really.")
    assert b.truthful_match(doc, "I have no comment")
    assert not b.truthful_match(doc, "Nothing happens and then you die.")  # an incorrect answer too
    assert not b.truthful_match(doc, "Nothing happensX")  # whole words only
    assert not b.truthful_match(doc, None)
    assert b.first_line("  Nothing happens.\nQ: more") == "Nothing happens."


def test_wikitext_detokenizer():
    assert b.wikitext_detokenize(" a guest @-@ starring role , in 1 @,@ 000 ( big ) . \n") == \
        " a guest-starring role, in 1,000 (big).\n"
