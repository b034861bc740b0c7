"""`lmforge run --quick`, once per session (the `quick_run` fixture); later slow tests reuse its run."""

import json
import math
import time

import pytest
import torch

from lmforge.checkpoint import load_checkpoint
from lmforge.cli import main
from lmforge.pipeline import ngram_overlap, word_ngrams

pytestmark = pytest.mark.slow


def test_quick_run_writes_every_file(quick_run):
    for path in ["config.toml", "world/corpus/train.jsonl", "world/corpus/valid.jsonl", "world/facts.json",
                 "tokenizer/tokenizer.json", "pretrain/final/model.safetensors", "pretrain/final/lmforge.json",
                 "pretrain/metrics.jsonl", "eval/results.json", "report.md", "pretrain_loss.png"]:
        assert (quick_run / path).is_file(), path
    assert float((quick_run / "test_seconds.txt").read_text()) < 120


def test_quick_run_report_and_results(quick_run):
    results = json.loads((quick_run / "eval" / "results.json").read_text())
    ppl = results["perplexity"]
    assert ppl["model"]["n_tokens"] == ppl["unigram"]["n_tokens"] > 1000
    # Even the quick model must beat a context-free unigram model on held-out text.
    assert ppl["model"]["perplexity"] < ppl["unigram"]["perplexity"]
    assert len(results["samples"]) >= 3 and 0.0 <= results["ngram4_overlap"] <= 1.0
    report = (quick_run / "report.md").read_text()
    for section in ("## Pretraining", "## Perplexity on held-out world text", "## Greedy samples",
                    "![pretraining loss](pretrain_loss.png)"):
        assert section in report
    rows = [json.loads(line) for line in (quick_run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0  # it learned


def test_quick_run_instruction_tuning_section(quick_run):
    results = json.loads((quick_run / "eval" / "results.json").read_text())
    tasks = results["tasks"]
    assert set(tasks) == {"base_zero_shot", "base_few_shot", "sft_zero_shot", "rs_zero_shot", "ppo_zero_shot",
                          "dpo_zero_shot"}
    clusters = {c for c in tasks["sft_zero_shot"] if not c.startswith("_")}
    assert len(clusters) == 8 and "forbidden" in clusters
    for mode in tasks.values():
        assert mode["_all"]["n"] == sum(mode[c]["n"] for c in clusters)
        assert all(0.0 <= mode[c]["accuracy"] <= 1.0 for c in clusters)
    samples = [json.loads(line) for line in (quick_run / "eval" / "samples_sft_zero_shot.jsonl").read_text().splitlines()]
    assert len(samples) == tasks["sft_zero_shot"]["_all"]["n"]
    assert sum(s["correct"] for s in samples) / len(samples) == pytest.approx(tasks["sft_zero_shot"]["_all"]["accuracy"])
    report = (quick_run / "report.md").read_text()
    assert "## Instruction tuning: accuracy per task cluster" in report and "task_accuracy.png" in report
    assert (quick_run / "task_accuracy.png").is_file() and (quick_run / "sft" / "final" / "lmforge.json").is_file()
    _, _, record = load_checkpoint(quick_run / "sft" / "final")
    assert record["lineage"]["stage"] == "sft" and record["lineage"]["parent"].endswith("pretrain/final")


def test_quick_checkpoint_loads_in_transformers(quick_run):
    transformers = pytest.importorskip("transformers")
    final = quick_run / "pretrain" / "final"
    model, tokenizer, record = load_checkpoint(final)
    assert record["lineage"]["stage"] == "pretrain"
    hf = transformers.AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("The town of", add_bos=True)])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_rerun_skips_finished_stages(quick_run):
    stamp = json.loads((quick_run / "pretrain" / "stage.json").read_text())
    before = (quick_run / "pretrain" / "final" / "lmforge.json").stat().st_mtime
    start = time.perf_counter()
    assert main(["run", "--quick", "--out", str(quick_run), "--no-progress"]) == 0
    assert (quick_run / "pretrain" / "final" / "lmforge.json").stat().st_mtime == before
    assert time.perf_counter() - start < stamp["seconds"] + 30


def test_ngram_overlap():
    assert word_ngrams("a b c d e", 4) == [("a", "b", "c", "d"), ("b", "c", "d", "e")]
    assert ngram_overlap(["a b c d e"], ["x a b c d y"], 4) == 0.5
    assert ngram_overlap(["q r s t"], ["a b c d"], 4) == 0.0


def test_distinct_n_on_fixed_strings():
    from lmforge.evaluate.decoding import distinct_n

    assert distinct_n(["a b c", "a b c"], 2) == 2 / 4
    assert distinct_n(["a b c", "c b a"], 1) == 3 / 6
    assert distinct_n(["a b", "c d"], 2) == 1.0
    assert distinct_n(["a"], 2) == 0.0


def test_quick_run_decoding_and_prompting_sections(quick_run):
    results = json.loads((quick_run / "eval" / "results.json").read_text())
    decoding = results["decoding"]
    assert set(decoding) >= {"greedy", "beam search (4 beams)", "sampling, T=1.5", "top-p 0.9, T=1.0"}
    greedy, hot = decoding["greedy"], decoding["sampling, T=1.5"]
    # greedy repeats itself (4 identical samples: distinct-2 at most 1/4) and writes the model's likeliest text
    assert greedy["distinct_2"] <= 0.25 + 1e-9 < hot["distinct_2"]
    assert greedy["perplexity"] < hot["perplexity"]
    for model in ("base", "sft"):
        methods = results["prompting"][model]
        assert list(methods) == ["zero_shot", "few_shot", "few_shot_cot", "zero_shot_cot", "self_consistency"]
        for row in methods.values():
            assert 0 <= row["accuracy"] <= 1 and set(row["by_steps"]) == {"1", "2", "3"}
    assert "Let's think step by step." in results["prompting"]["base"]["zero_shot_cot"]["example"][0]
    assert "Therefore, the answer (arabic numerals) is" in results["prompting"]["base"]["zero_shot_cot"]["example"][0]
    report = (quick_run / "report.md").read_text()
    assert "## Decoding: quality against diversity" in report and "## Prompting: arithmetic" in report
    assert "| self consistency |" in report


def test_quick_run_preference_stages(quick_run):
    results = json.loads((quick_run / "eval" / "results.json").read_text())
    prefs = results["preferences"]
    assert prefs["data"]["train"]["ranked"] > 0 and prefs["data"]["heldout"]["ranked"] > 0
    assert 0 <= prefs["reward_model"]["accuracy"] <= 1 and prefs["reward_model"]["pairs"] > 0
    for method in ("bon", "rs", "ppo", "dpo"):
        comparison = prefs[f"{method}_vs_sft"]
        assert comparison["n"] == 60  # --quick compares on 60 held-out prompts (the full run on ~440)
        assert comparison["wins"] + comparison["ties"] + comparison["losses"] == comparison["n"]
        low, high = comparison["interval"]
        assert low <= comparison["win_rate"] <= high
        wrong = comparison["where_b_wrong"]
        assert 0 < wrong["n"] <= comparison["n"] and wrong["wins"] + wrong["ties"] + wrong["losses"] == wrong["n"]
        assert set(prefs["kl_to_sft"][method]) >= {"kl"} and prefs["seconds"][method] > 0
    for method, directory, stage in (("rs", "rejection", "rejection_sampling"), ("ppo", "ppo", "ppo"),
                                     ("dpo", "dpo", "dpo")):
        _, _, record = load_checkpoint(quick_run / directory / "final")
        assert record["lineage"]["stage"] == stage
    assert prefs["kl_to_sft"]["bon"]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    assert prefs["kl_to_sft"]["ppo"]["n"] == 16
    _, _, record = load_checkpoint(quick_run / "reward" / "final", kind="reward_model")
    assert record["kind"] == "reward_model" and record["lineage"]["stage"] == "reward"
    iterations = prefs["ppo_iterations"]
    assert [r["iteration"] for r in iterations] == [1, 2, 3]
    assert all({"score", "gold", "kl", "entropy", "length", "eos_rate"} <= set(r) for r in iterations)
    assert iterations[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the SFT model itself
    ranked = [json.loads(line) for line in (quick_run / "preferences" / "train" / "ranked.jsonl").read_text().splitlines()]
    assert all(len(set(r["scores"])) == len(r["scores"]) >= 2 for r in ranked)  # no ties kept
    assert "## Preference learning" in (quick_run / "report.md").read_text()


def test_quick_run_arena_of_its_checkpoints(quick_run):
    from lmforge.cli import main as cli_main

    prefs = json.loads((quick_run / "eval" / "results.json").read_text())["preferences"]
    arena = prefs["arena"]
    assert arena["battles"] == 60 * 4  # four random pairs on each of the 60 held-out prompts
    board = arena["leaderboard"]
    assert {r["model"] for r in board} == {"sft", "bon", "rs", "ppo", "dpo"}
    assert sum(r["battles"] for r in board) == 2 * arena["battles"]
    assert all(r["lower"] <= r["rating"] <= r["upper"] for r in board)
    answers = [json.loads(line) for line in (quick_run / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 60 and {"prompt", "sft", "bon", "rs", "ppo", "dpo"} <= set(answers[0])
    assert cli_main(["arena", "rate", str(quick_run / "eval" / "arena_battles.jsonl"), "--rounds", "10"]) == 0
    assert "Arena: 240 battles" in (quick_run / "report.md").read_text()


def test_quick_run_html_report_stands_alone(quick_run):
    html = (quick_run / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html
    assert html.count('src="data:image/png;base64,') >= 2  # pictures embedded, no file beside it needed
    assert 'src="pretrain_loss.png"' not in html
    for heading in ("Perplexity on held-out world text", "Decoding: quality against diversity", "Preference learning"):
        assert heading in html


def test_quick_run_compares_every_checkpoint(quick_run):
    results = json.loads((quick_run / "eval" / "results.json").read_text())
    assert set(results["checkpoints"]) == {"pretrain", "sft", "rs", "ppo", "dpo"}
    for row in results["checkpoints"].values():
        assert row["perplexity"]["perplexity"] > 1 and 0 <= row["task_accuracy"] <= 1
    assert {"rs_zero_shot", "ppo_zero_shot", "dpo_zero_shot"} <= set(results["tasks"])
    # the pretrained model fits the corpus better than the chat-tuned ones (alignment costs some LM fit)
    assert results["checkpoints"]["pretrain"]["perplexity"]["perplexity"] < results["checkpoints"]["sft"]["perplexity"]["perplexity"]
    contamination = results["contamination"]
    assert set(contamination) == {"arithmetic", "closed_book_qa", "entailment", "extraction", "forbidden",
                                  "open_ended", "sentiment", "translation"}
    assert all(0 <= row["share"] <= 1 for row in contamination.values())
    assert "## Every checkpoint of the run" in (quick_run / "report.md").read_text()
