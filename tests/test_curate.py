"""AlpaGasus curation: score parsing, the threshold with a judge of known scores, unparseable ratings, the
data formats and their errors, and the command on a tiny judge."""

from __future__ import annotations

import json

import pytest

from lmforge.apps.curate import (compact_rating_prompt, curate, parse_score, rating_prompt, read_data,
                                 score_summary, triplet)
from lmforge.cli import main
from lmforge.errors import BadFileError

RECORDS = [
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"},
    {"instruction": "Name the capital of Velmora.", "input": "", "output": "Velmora has no capital."},
    {"instruction": "Translate 'thank you' into Korean.", "output": "감사합니다"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 7 odd?"},
                  {"role": "assistant", "content": "Yes."}]},
    {"instruction": "Write a haiku about bread.", "input": "", "output": "Bread."},
    {"instruction": "Sort: 3, 1, 2.", "input": "", "output": "1, 2, 3"},
]
# The judge's reply to each record, in order: scores 5, 4.5, 4 (after "Score:"), none, 7 (out of range), 4.7.
REPLIES = ["5\nCorrect.", "4.5\nRight but terse.", "The translation is fine.\nScore: 4", "I cannot tell.",
           "7 out of 10", "4.7"]


def _judge_of_known_scores(prompts: list[str]) -> list[str]:
    """Answers by the record each prompt shows, so the test does not depend on the order of the calls."""
    replies = []
    for prompt in prompts:
        response = prompt.split("### Response:\n")[1].split("\n\n")[0]
        index = next(i for i, r in enumerate(RECORDS) if triplet(r)[2] == response)
        replies.append(REPLIES[index])
    return replies


def test_parse_score():
    assert parse_score("4.5\nThe response is accurate.") == 4.5
    assert parse_score("Score: 3") == 3.0
    assert parse_score("4/5 because it is right") == 4.0
    assert parse_score("**5**\nPerfect.") == 5.0
    assert parse_score("The answer is fine.\nscore: 2.5, mostly") == 2.5  # the fallback after "score:"
    assert parse_score("-1") is None and parse_score("7") is None and parse_score("5.5") is None  # outside 0-5
    assert parse_score("I cannot rate this.") is None and parse_score("") is None
    assert parse_score("0\nWrong.") == 0.0


def test_rating_prompts_show_the_triplet():
    prompt = rating_prompt("Add the numbers.", "2, 3", "5")
    assert prompt.index("### Instruction:\nAdd the numbers.") < prompt.index("### Input:\n2, 3") \
        < prompt.index("### Response:\n5") < prompt.index("0 to 5")
    assert "### Input:" not in rating_prompt("Name a fruit.", "", "Banana.")
    assert compact_rating_prompt("Add.", "2, 3", "5").endswith("Response: 5\n\nAccuracy from 0 to 5:")
    assert triplet(RECORDS[3]) == ("Is 7 odd?", "", "Yes.")


def test_the_threshold_keeps_exactly_the_records_at_or_above_it_and_unparseable_ones_never():
    kept, summary = curate(_judge_of_known_scores, RECORDS, threshold=4.5)
    assert kept == [RECORDS[0], RECORDS[1], RECORDS[5]]  # 5, 4.5 (at the threshold), 4.7
    assert summary["unparseable"] == 2 and summary["rated"] == 4 and summary["dropped"] == 1
    assert summary["kept"] + summary["dropped"] + summary["unparseable"] == summary["records"] == 6
    assert summary["mean"] == pytest.approx((5 + 4.5 + 4 + 4.7) / 4)
    assert summary["histogram"]["5.0"] == 1 and summary["histogram"]["4.5"] == 2 and summary["histogram"]["4.0"] == 1
    assert sum(summary["histogram"].values()) == summary["rated"]
    kept, summary = curate(_judge_of_known_scores, RECORDS, threshold=4.0)
    assert len(kept) == 4 and summary["kept"] == 4
    kept, summary = curate(lambda prompts: ["no idea"] * len(prompts), RECORDS)
    assert kept == [] and summary["unparseable"] == 6 and summary["mean"] is None


def test_score_summary_bins_in_half_points():
    summary = score_summary([0, 0.4, 0.5, 2.99, 3.0, 5, None], threshold=3)
    assert {k: v for k, v in summary["histogram"].items() if v} == {"0.0": 2, "0.5": 1, "2.5": 1, "3.0": 1, "5.0": 1}
    assert (summary["kept"], summary["dropped"], summary["unparseable"]) == (2, 4, 1)


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_data_errors_name_the_line_and_field(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    _write(path, [RECORDS[0], {"instruction": "No output here."}])
    with pytest.raises(BadFileError, match=r"data.jsonl:2: field 'output'"):
        read_data(str(path))
    _write(path, [{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}]}])
    with pytest.raises(BadFileError, match=r"data.jsonl:1: .*one user turn then one assistant turn"):
        read_data(str(path))
    (tmp_path / "list.json").write_text(json.dumps(RECORDS[:3]))
    assert read_data(str(tmp_path / "list.json")) == RECORDS[:3]
    _write(path, [RECORDS[0], {"instruction": "x", "output": 3}])
    assert main(["data", "curate", "--model", str(tmp_path), "--data", str(path),
                 "--out", str(tmp_path / "kept.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error:") and "data.jsonl:2" in err and "'output'" in err
    assert not (tmp_path / "kept.jsonl").exists()


def test_cli_on_a_tiny_judge_accounts_for_every_record(tmp_path, trained_checkpoint, capsys):
    _write(tmp_path / "data.jsonl", RECORDS)
    out = tmp_path / "curated" / "kept.json"
    assert main(["data", "curate", "--model", str(trained_checkpoint), "--data", str(tmp_path / "data.jsonl"),
                 "--out", str(out), "--compact", "--max-new-tokens", "8", "--threshold", "0"]) == 0
    kept = json.loads(out.read_text())
    rows = [json.loads(line) for line in (tmp_path / "curated" / "kept.scores.jsonl").read_text().splitlines()]
    assert [row["record"] for row in rows] == RECORDS and all("reply" in row for row in rows)
    assert kept == [row["record"] for row in rows if row["kept"]]
    unparseable = sum(row["score"] is None for row in rows)
    dropped = sum(row["score"] is not None and not row["kept"] for row in rows)
    assert len(kept) + dropped + unparseable == len(RECORDS)
    assert all(row["kept"] == (row["score"] is not None) for row in rows)  # threshold 0: every parsed score
    assert "unparseable" in capsys.readouterr().out
