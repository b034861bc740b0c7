"""Preference data: every format parses to the same (prompt, chosen, rejected); useless records are skipped with a
count and the first file:line per reason; malformed ones are errors naming file:line; writers round-trip."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import SHARED
from lmforge.data.preferences import (Pair, Ranked, drop_too_long, format_skips, ranked_to_pairs, read_pairs,
                                      read_ranked, write_pairs, write_ranked)
from lmforge.errors import BadConfigError, BadFileError

PREFERENCE = SHARED / "data" / "preference"
HH_HELPFUL = PREFERENCE / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
DPO_EN_DEMO = PREFERENCE / "llamafactory" / "dpo_en_demo.json"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


# --- formats -----------------------------------------------------------------------------------------------

def test_pairs_strings(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Seven."},
                                              {"prompt": "2+2?", "chosen": "4", "rejected": "5", "id": 3}])
    pairs, skipped = read_pairs(path)
    assert pairs == [Pair([user("Name a colour.")], "Red.", "Seven.", f"{path}:1"),
                     Pair([user("2+2?")], "4", "5", f"{path}:2")]
    assert skipped == {}


def test_pairs_conversational_explicit_prompt(tmp_path):
    """TRL's conversational form: prompt messages, chosen/rejected as one-message assistant lists."""
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("A colour?")]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": [assistant("Red.")],
                                               "rejected": [assistant("Seven.")]}])
    assert read_pairs(path)[0] == [Pair(prompt, "Red.", "Seven.", f"{path}:1")]


def test_pairs_implicit_prompt_split_at_longest_shared_prefix(tmp_path):
    """TRL's implicit prompt: two whole conversations; the prompt is the messages they share."""
    shared = [user("Hi"), assistant("Hello!"), user("A colour?")]
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": shared + [assistant("Red.")],
                                               "rejected": shared + [assistant("Seven.")]}])
    assert read_pairs(path)[0] == [Pair(shared, "Red.", "Seven.", f"{path}:1")]


def test_pairs_json_list_names_record(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "Q", "chosen": "A", "rejected": "B"}] * 2))
    pairs, _ = read_pairs(path)
    assert [p.source for p in pairs] == [f"{path}: record 0", f"{path}: record 1"]


def test_ranked_and_all_pairs(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Q", "responses": ["best", "middle", "worst"]}])
    ranked, skipped = read_ranked(path)
    assert ranked == [Ranked([user("Q")], ["best", "middle", "worst"], f"{path}:1")] and skipped == {}
    assert read_pairs(path)[0] == ranked_to_pairs(ranked)


def test_ranked_to_pairs_k3_gives_the_three_ordered_pairs():
    pairs = ranked_to_pairs([Ranked([user("Q")], ["a", "b", "c"], "f:1")])
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert all(p.prompt == [user("Q")] and p.source == "f:1" for p in pairs)


def test_pair_file_read_as_rankings_of_two(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    assert read_ranked(path)[0] == [Ranked([user("Q")], ["A", "B"], f"{path}:1")]


HH_TRANSCRIPT = ("\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour.\n\n"
                 "It should be warm.\n\nAssistant:")


def test_hh_rlhf_split_at_last_shared_assistant_turn(tmp_path):
    records = [
        {"chosen": HH_TRANSCRIPT + " Red.", "rejected": HH_TRANSCRIPT + " Blue, which is cold."},
        # The answers share a start: it stays in both responses; the prompt ends at the shared assistant turn.
        {"chosen": HH_TRANSCRIPT + " Red is warm.", "rejected": HH_TRANSCRIPT + " Red is cold.\n\nHuman: ok"},
    ]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    prompt = [user("Hi there"), assistant("Hello! How can I help?"), user("Name a colour.\n\nIt should be warm.")]
    pairs, skipped = read_pairs(path)
    assert skipped == {}
    assert pairs == [Pair(prompt, "Red.", "Blue, which is cold.", f"{path}:1"),
                     Pair(prompt, "Red is warm.", "Red is cold.\n\nHuman: ok", f"{path}:2")]
    assert read_pairs(path, format="hh_rlhf")[0] == pairs


def test_llamafactory_sharegpt(tmp_path):
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps([{
        "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                          {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "A colour?"}],
        "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "Seven."}}]))
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("A colour?")]
    assert read_pairs(path)[0] == [Pair(prompt, "Red.", "Seven.", f"{path}: record 0")]


def test_format_override_and_bad_format(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    assert read_pairs(path, format="pairs")[0] == read_pairs(path)[0]
    with pytest.raises(BadFileError, match=r"p\.jsonl:1: no field 'responses'"):
        read_pairs(path, format="ranked")
    with pytest.raises(BadConfigError, match="format must be one of"):
        read_pairs(path, format="csv")


# --- skipped records ---------------------------------------------------------------------------------------

def test_skip_reasons_counted_with_first_place(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": "Q1", "chosen": "A", "rejected": "B"},
        {"prompt": "Q2", "chosen": "same", "rejected": "same"},
        {"prompt": "Q3", "chosen": "A", "rejected": "  "},
        {"prompt": "Q4", "chosen": "same", "rejected": "same "},  # differs only in whitespace: still identical
        {"prompt": "Q5", "chosen": [assistant("")], "rejected": [assistant("B")]},
    ])
    pairs, skipped = read_pairs(path)
    assert [p.prompt[0]["content"] for p in pairs] == ["Q1"]
    assert skipped == {"identical chosen/rejected": {"count": 2, "first": f"{path}:2"},
                       "empty response": {"count": 2, "first": f"{path}:3"}}
    ranked_path = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "Q1", "responses": ["a", "b"]}, {"prompt": "Q2", "responses": ["only one"]},
        {"prompt": "Q3", "responses": ["x", "y", "x"]}, {"prompt": "Q4", "responses": ["alone"]}])
    ranked, ranked_skipped = read_ranked(ranked_path)
    assert [r.source for r in ranked] == [f"{ranked_path}:1"]
    assert ranked_skipped == {"ranked list of one": {"count": 2, "first": f"{ranked_path}:2"},
                              "identical responses": {"count": 1, "first": f"{ranked_path}:3"}}


def test_format_skips_line():
    skipped = {"identical chosen/rejected": {"count": 2, "first": "data.jsonl:4"},
               "empty response": {"count": 1, "first": "data.jsonl:9"}}
    assert format_skips(skipped) == ("skipped 3 pairs: 2 identical chosen/rejected (first data.jsonl:4), "
                                     "1 empty response (first data.jsonl:9)")
    assert format_skips({}) == ""


def test_all_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "A"},
                                              {"prompt": "Q", "chosen": "", "rejected": "B"}])
    with pytest.raises(BadFileError, match=r"no usable preference records \(skipped 2 records: "
                                           r"1 identical chosen/rejected \(first .*p\.jsonl:1\)"):
        read_pairs(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(BadFileError, match="the file is empty"):
        read_pairs(empty)


def test_drop_too_long_with_tokenizer_lengths(tokenizer):
    def length(prompt, response):  # what training renders: the prompt, the answer and its EOS
        return len(tokenizer.render(prompt + [assistant(response)])[0])

    short, long = Pair([user("Q")], "A.", "B.", "f:1"), Pair([user("Q")], "A.", "word " * 200, "f:2")
    kept, skipped = drop_too_long([short, long, long], length, max_len=32)
    assert kept == [short] and skipped == {"longer than context": {"count": 2, "first": "f:2"}}
    ranked = Ranked([user("Q")], ["A.", "B.", "word " * 200], "f:3")
    assert drop_too_long([ranked], length, max_len=2000) == ([ranked], {})
    with pytest.raises(BadFileError, match=r"all 1 pairs are longer than the context of 32 tokens \(first f:3"):
        drop_too_long([ranked], length, max_len=32)


# --- malformed records -------------------------------------------------------------------------------------

def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Q", "chosen": "A", "rejected": "B"}\n{"prompt": "Q", "chosen": \n')
    with pytest.raises(BadFileError, match=r"p\.jsonl:2: not valid JSON"):
        read_pairs(path)
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps({"chosen": HH_TRANSCRIPT + " x", "rejected": HH_TRANSCRIPT + " y"})
                                  + "\n\n{oops\n").encode()))
    with pytest.raises(BadFileError, match=r"p\.jsonl\.gz:3: not valid JSON"):
        read_pairs(gz)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q", "chosen": "A"}, r":2: no field 'rejected'"),
    ({"prompt": "Q", "chosen": "A", "rejected": 5}, r":2: field 'rejected' must be a string or a non-empty list"),
    ({"prompt": [{"role": "bot", "content": "Q"}], "chosen": "A", "rejected": "B"}, r":2: prompt\[0\] has unknown role"),
    ({"prompt": [user("Q"), assistant("A")], "chosen": "B", "rejected": "C"}, r":2: the prompt must end with a .*user"),
    ({"chosen": [user("Q"), assistant("A")], "rejected": [user("R"), assistant("B")]}, r":2: chosen and rejected must differ only"),
])
def test_missing_or_bad_field_names_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}, record])
    with pytest.raises(BadFileError, match=r"p\.jsonl" + message):
        read_pairs(path, format="pairs")


def test_hh_without_shared_assistant_turn_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: A\n\nAssistant: x",
                                                "rejected": "\n\nHuman: B\n\nAssistant: y"}])
    with pytest.raises(BadFileError, match=r"hh\.jsonl:1: chosen and rejected share no"):
        read_pairs(path)


# --- writing -----------------------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, user("안녕? Name a colour.")]
    pairs = [Pair(prompt, "Red 🙂", "Seven.", "x:1"), Pair([user("Q")], "A\nB", "C", "x:2")]
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    back, skipped = read_pairs(tmp_path / "pairs.jsonl")
    assert skipped == {} and [(p.prompt, p.chosen, p.rejected) for p in back] == [
        (p.prompt, p.chosen, p.rejected) for p in pairs]
    ranked = [Ranked(prompt, ["a", "b", "c"], "x:1")]
    write_ranked(tmp_path / "ranked.jsonl", ranked)
    back_ranked, _ = read_ranked(tmp_path / "ranked.jsonl")
    assert [(r.prompt, r.responses) for r in back_ranked] == [(prompt, ["a", "b", "c"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "ranked.jsonl"]  # no temp files left


# --- the real files ----------------------------------------------------------------------------------------

@pytest.mark.skipif(not HH_HELPFUL.exists(), reason="shared HH-RLHF data not available")
def test_real_hh_rlhf(tokenizer):
    pairs, skipped = read_pairs(HH_HELPFUL)
    assert 2300 < len(pairs) <= 2354  # 2,354 records (SOURCES.md), a few skipped
    assert skipped["identical chosen/rejected"]["count"] == 2 and skipped["empty response"]["count"] == 4
    assert all(s["first"].startswith(f"{HH_HELPFUL}:") for s in skipped.values())
    assert all(p.prompt and p.prompt[-1]["role"] == "user" and p.prompt[-1]["content"] for p in pairs)
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in pairs)
    assert any(len(p.prompt) >= 5 for p in pairs)  # multi-turn conversations kept as messages
    # Some real records are longer than a small context: dropped and counted, not truncated.
    some = pairs[:300]
    kept, too_long = drop_too_long(
        some, lambda prompt, response: len(tokenizer.render(prompt + [{"role": "assistant", "content": response}])[0]),
        max_len=512)
    assert 0 < too_long["longer than context"]["count"] < len(some)
    assert len(kept) + too_long["longer than context"]["count"] == len(some)


@pytest.mark.skipif(not DPO_EN_DEMO.exists(), reason="shared LLaMA-Factory data not available")
def test_real_llamafactory_dpo_en_demo():
    pairs, skipped = read_pairs(DPO_EN_DEMO)
    assert len(pairs) == 300 and skipped == {}
    assert all(p.prompt and p.prompt[-1]["role"] == "user" and p.prompt[-1]["content"] for p in pairs)
    assert sum(p.prompt[0]["role"] == "system" for p in pairs) > 0
    assert sum(len(p.prompt) > 1 for p in pairs) > 100  # multi-turn prompts keep their earlier turns
