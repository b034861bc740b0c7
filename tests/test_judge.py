"""LLM-as-judge: verdict parsing, both-order judging, the three bias measures, the command and its errors."""

from __future__ import annotations

import json
import random
import re

import pytest

from lmforge.cli import main
from lmforge.evaluate.judge import (gold_outcome, judge_pairs, length_controlled_win_rate, model_reply_fn,
                                    pairwise_summary, parse_rating, parse_verdict, position_figures,
                                    rate_answers, self_preference, win_rate)


def _answers_of(prompt: str) -> tuple[str, str]:
    """(answer in slot A, answer in slot B) read back from a pair prompt."""
    a = re.search(r"\[A\]\n(.*?)\n\[/A\]", prompt, re.S).group(1)
    b = re.search(r"\[B\]\n(.*?)\n\[/B\]", prompt, re.S).group(1)
    return a, b


def test_parse_verdict_and_rating():
    assert parse_verdict("Both are fine but [[B]] is clearer.") == "B"
    assert parse_verdict("[[C]]") == "C"
    assert parse_verdict("I cannot decide.") is None
    assert parse_verdict("[[A]] or maybe [[B]]") is None  # two verdicts: unparseable, not a guess
    assert parse_verdict("[[A]] ... final: [[A]]") == "A"
    assert parse_rating("Good answer. Rating: [[7]]") == 7.0
    assert parse_rating("score [8.5]") == 8.5
    assert parse_rating("no number") is None


def test_a_judge_that_always_picks_slot_a_yields_only_ties_after_the_swap():
    questions = [f"q{i}" for i in range(20)]
    rows = judge_pairs(lambda prompts: ["[[A]]"] * len(prompts), questions, ["x"] * 20, ["y"] * 20)
    assert all(r["outcome"] == 0.5 for r in rows)
    figures = position_figures(rows)
    assert figures["consistency"] == 0.0 and figures["first_slot_both_orders"] == 1.0
    assert win_rate([r["first_order"] for r in rows])["win_rate"] == 1.0  # one order alone: a always "wins"
    assert win_rate([r["outcome"] for r in rows])["ties"] == 20


def test_a_consistent_judge_keeps_its_verdicts_and_maps_them_to_the_right_side():
    def prefers_longer(prompts):
        out = []
        for p in prompts:
            a, b = _answers_of(p)
            out.append("[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]")
        return out

    rows = judge_pairs(prefers_longer, ["q1", "q2", "q3"], ["long answer", "s", "same"], ["s", "long answer", "same"])
    assert [r["outcome"] for r in rows] == [1.0, 0.0, 0.5]
    assert all(r["consistent"] for r in rows)
    assert position_figures(rows)["consistency"] == 1.0


def test_unparseable_verdicts_are_counted_and_left_out_never_a_tie():
    # both pairs in the first order, then both swapped: pair 1 says A then nothing; pair 2 says B then B
    replies = iter(["[[A]]", "[[B]]", "hmm", "[[B]]"])

    def judge(prompts):
        return [next(replies) for _ in prompts]

    rows = judge_pairs(judge, ["q1", "q2"], ["a1", "a2"], ["b1", "b2"])
    assert rows[0]["outcome"] is None and not rows[0]["parsed"]
    assert rows[1]["outcome"] == 0.5  # B in both orders: a flip of winner -> tie
    summary = pairwise_summary(rows, [2, 2], [2, 2])
    assert summary["position"]["unparseable"] == 1
    assert summary["both_orders"]["n"] == 1


def test_length_control_brings_a_length_biased_judge_closer_to_gold():
    """Gold preferences are known and independent of length; model a's answers are longer on average. A judge
    that follows gold but is pulled toward the longer answer inflates a's raw win rate; the length-controlled
    win rate is closer to the gold one."""
    rng = random.Random(0)
    n, gold_p, bias = 800, 0.4, 2.5
    gold, judged, len_a, len_b = [], [], [], []
    for _ in range(n):
        la, lb = rng.gauss(300, 80), rng.gauss(200, 80)
        g = 1.0 if rng.random() < gold_p else 0.0
        # the judge sees gold through a logit of +-1.5 plus a pull toward length
        import math
        z = (1.5 if g else -1.5) + bias * math.tanh((la - lb) / 120)
        judged.append(1.0 if rng.random() < 1 / (1 + math.exp(-z)) else 0.0)
        gold.append(g)
        len_a.append(la)
        len_b.append(lb)
    fit = length_controlled_win_rate(judged, len_a, len_b)
    gold_rate = sum(gold) / n
    assert fit["phi"] > 0
    assert fit["raw_win_rate"] > gold_rate + 0.1  # the bias is there
    assert abs(fit["lc_win_rate"] - gold_rate) < abs(fit["raw_win_rate"] - gold_rate)


def test_length_control_without_length_effect_changes_little():
    rng = random.Random(1)
    outcomes = [rng.choice([0.0, 0.5, 1.0]) for _ in range(400)]
    lens_a = [rng.randint(50, 150) for _ in range(400)]
    lens_b = [rng.randint(50, 150) for _ in range(400)]
    fit = length_controlled_win_rate(outcomes, lens_a, lens_b)
    assert abs(fit["lc_win_rate"] - fit["raw_win_rate"]) < 0.03


def test_self_preference_on_a_hand_built_case():
    # the judge gives its own answers 8 wins, 1 tie, 1 loss (0.85); gold gives them 4 wins, 2 ties, 4 losses (0.5)
    judge = [1.0] * 8 + [0.5, 0.0]
    gold = [1.0] * 4 + [0.5, 0.5] + [0.0] * 4
    result = self_preference(judge, gold)
    assert result["judge_win_rate"] == pytest.approx(0.85)
    assert result["gold_win_rate"] == pytest.approx(0.5)
    assert result["self_preference"] == pytest.approx(0.35)
    assert result["interval"][0] > 0
    # unparseable judgements are left out of both sides
    assert self_preference([None, 1.0], [0.0, 0.0])["self_preference"] == pytest.approx(1.0)


def test_gold_outcome():
    assert [gold_outcome(2, 1), gold_outcome(1, 1), gold_outcome(0, 1)] == [1.0, 0.5, 0.0]


def test_single_score_mode_counts_unparseable_ratings():
    replies = iter(["[[8]]", "no idea", "[6]"])
    result = rate_answers(lambda prompts: [next(replies) for _ in prompts], ["q"] * 3, ["a", "b", "c"])
    assert result["summary"] == {"answers": 3, "rated": 2, "unparseable": 1, "mean_rating": 7.0}


def test_a_real_tiny_model_judges_and_every_reply_is_accounted_for(trained_checkpoint):
    from lmforge.checkpoint import load_checkpoint

    model, tokenizer, _ = load_checkpoint(trained_checkpoint)
    reply = model_reply_fn(model, tokenizer, max_new_tokens=8)
    rows = judge_pairs(reply, ["Which town?"] * 3, ["Velmora."] * 3, ["The cat sat on the mat."] * 3)
    assert len(rows) == 3 and reply.truncated == 6  # a 64-token model cannot see a whole judge prompt
    figures = position_figures(rows)
    assert figures["unparseable"] + sum(r["parsed"] for r in rows) == 3


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_cli_judges_two_files_and_writes_the_summary(tmp_path, trained_checkpoint, capsys):
    a = [{"prompt": f"q{i}", "output": "Velmora.", "gold": 1.0} for i in range(4)]
    b = [{"prompt": f"q{i}", "output": "The cat.", "gold": 0.0} for i in reversed(range(4))]
    _write(tmp_path / "a.jsonl", a)
    _write(tmp_path / "b.jsonl", b)
    out = tmp_path / "judged.json"
    assert main(["judge", "--model", str(trained_checkpoint), "--a", str(tmp_path / "a.jsonl"), "--b",
                 str(tmp_path / "b.jsonl"), "--out", str(out), "--self-side", "a", "--max-new-tokens", "6"]) == 0
    result = json.loads(out.read_text())
    assert len(result["judgments"]) == 4 and result["judgments"][0]["b"] == "The cat."
    assert result["summary"]["gold"]["win_rate"] == 1.0 or result["summary"]["gold"]["n"] == 0
    assert "self_preference" in result["summary"]
    assert "position consistency" in capsys.readouterr().out


def test_cli_bad_input_names_the_file_and_line(tmp_path, trained_checkpoint, capsys):
    _write(tmp_path / "a.jsonl", [{"prompt": "q1", "output": "x"}, {"prompt": "q2"}])
    _write(tmp_path / "b.jsonl", [{"prompt": "q1", "output": "y"}])
    code = main(["judge", "--model", str(trained_checkpoint), "--a", str(tmp_path / "a.jsonl"), "--b",
                 str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "a.jsonl:2" in err and "output" in err
    _write(tmp_path / "a.jsonl", [{"prompt": "q1", "output": "x"}, {"prompt": "q2", "output": "z"}])
    assert main(["judge", "--model", str(trained_checkpoint), "--a", str(tmp_path / "a.jsonl"), "--b",
                 str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "o.json")]) == 2
    assert "not in" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()  # nothing half-written
    assert main(["judge", "--model", str(tmp_path / "nowhere"), "--a", str(tmp_path / "a.jsonl"),
                 "--mode", "single"]) == 2
    assert "no such judge" in capsys.readouterr().err


def test_a_hugging_face_directory_judges_like_the_same_weights_in_lmforge(trained_checkpoint, tmp_path):
    """A checkpoint without lmforge's record is read as a plain Hugging Face model with its own tokenizer and
    chat template; greedy verdicts match the native load of the same weights."""
    import shutil

    from lmforge.checkpoint import load_checkpoint
    from lmforge.evaluate.judge import load_judge

    hf_dir = tmp_path / "hf_judge"
    shutil.copytree(trained_checkpoint, hf_dir)
    (hf_dir / "lmforge.json").unlink()
    model, tokenizer, _ = load_checkpoint(trained_checkpoint)
    args = (["Where?"] * 2, ["Velmora.", "Soup."], ["The mat.", "Apples."])
    native = judge_pairs(model_reply_fn(model.eval(), tokenizer, max_new_tokens=6), *args)
    hf = judge_pairs(load_judge(str(hf_dir), max_new_tokens=6, device="cpu"), *args)
    assert [(r["reply_ab"], r["reply_ba"]) for r in hf] == [(r["reply_ab"], r["reply_ba"]) for r in native]
