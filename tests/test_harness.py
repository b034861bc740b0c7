"""The task harness: the metric formulas on hand-built inputs, then whole runs on the tiny trained checkpoint.

Formula tests use stand-ins whose log-likelihoods are known exactly: a scoring function keyed by the
continuation (lm-eval's DummyLM idea), a uniform model (every token log 1/V) and a bigram model (zeroed
blocks: the logits at a position depend on that token only, so any windowing must give the same sum).
"""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.errors import BadConfigError
from lmforge.evaluate import harness as h
from lmforge.evaluate.benchmarks import TASKS, Task, read_gsm8k
from lmforge.infer.prompting import COT_FORMAT
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer

from conftest import SHARED, tiny_config

needs_data = pytest.mark.skipif(not (SHARED / "data" / "eval").is_dir(), reason="../shared/data is absent")
MC = Task("mc", "multiple_choice", load=lambda src: [])


# --- multiple choice --------------------------------------------------------------------------------------


def test_acc_and_acc_norm_disagree_when_choice_lengths_differ(monkeypatch):
    """acc_norm divides by the choice's length in characters *without* the delimiter: ll (-2.2, -5.2) for
    "ab" / "abcde" is (-1.1, -1.04) per character -> "abcde"; counting the leading space (3, 6 characters)
    would give (-0.73, -0.87) -> "ab"."""
    lls = {" ab": -2.2, " abcde": -5.2, " no": -6.0, " not at all": -9.0}
    monkeypatch.setattr(h, "score_requests",
                        lambda model, tok, requests, batch_size: [(lls[c], False) for _, c in requests])
    docs = [{"query": "Q1", "choices": ["ab", "abcde"], "gold": 1, "target": "abcde"},
            {"query": "Q2", "choices": ["no", "not at all"], "gold": 0, "target": "no"}]
    metrics, records = h.evaluate_multiple_choice(None, None, MC, docs, [[], []])
    assert [(r["pred"], r["pred_norm"]) for r in records] == [(0, 1), (0, 1)]
    assert [(r["acc"], r["acc_norm"]) for r in records] == [(0.0, 1.0), (1.0, 0.0)]
    assert metrics["acc,none"] == metrics["acc_norm,none"] == 0.5
    assert metrics["acc_stderr,none"] == pytest.approx(0.5)  # sample std of (0, 1) = 0.707, / sqrt(2)
    assert records[0]["prompt"] == "Q1" and records[0]["loglikelihoods"] == [-2.2, -5.2]


def test_choice_requests_few_shot_exactly():
    arc = TASKS["arc_challenge"]
    ex = [{"query": "Question: Q1?\nAnswer:", "target": "A1"}, {"query": "Question: Q2?\nAnswer:", "target": "A2"}]
    doc = {"query": "Question: Q?\nAnswer:", "choices": ["yes", "no"], "gold": 0}
    prompt = "Question: Q1?\nAnswer: A1\n\nQuestion: Q2?\nAnswer: A2\n\nQuestion: Q?\nAnswer:"
    assert h.choice_requests(doc, ex, arc) == [(prompt, " yes"), (prompt, " no")]
    wino = {"contexts": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"], "continuation": "won.", "choices": ["Ann", "Bo"]}
    shot = {"context": "Cy fed Di so Cy", "continuation": "was kind."}
    assert h.choice_requests(wino, [shot], TASKS["winogrande"]) == [
        ("Cy fed Di so Cy was kind.\n\nAnn beat Bo so Ann", " won."),
        ("Cy fed Di so Cy was kind.\n\nAnn beat Bo so Bo", " won.")]


def test_gsm8k_cot_prompt_from_train_solutions(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "Tom has 2 and gets 1. How many?",
                                "answer": "He has 2 + 1 = <<2+1=3>>3.\nSo 3.\n#### 3"}) + "\n")
    [shot] = read_gsm8k(path)
    doc = {"question": "How many legs do 2 cats have?"}
    assert h.few_shot_prompt(doc, [shot], COT_FORMAT) == (
        "Q: Tom has 2 and gets 1. How many?\nA: He has 2 + 1 = 3. So 3. The answer is 3.\n\n"
        "Q: How many legs do 2 cats have?\nA:")


def test_exemplar_draws_are_seeded_per_doc_and_never_the_doc_itself():
    docs = [{"query": f"q{i}", "target": str(i)} for i in range(30)]
    first = h.draw_exemplars(docs, docs, 3, seed=0, exclude_self=True)
    assert first == h.draw_exemplars(docs, docs, 3, seed=0, exclude_self=True)
    assert first != h.draw_exemplars(docs, docs, 3, seed=1, exclude_self=True)
    assert all(doc not in shots and len(shots) == 3 for doc, shots in zip(docs, first))
    assert h.draw_exemplars(docs, docs, 0, seed=0, exclude_self=True) == [[]] * 30


# --- generation: filters, first sample and majority vote (a scripted engine) ------------------------------


def test_generation_metrics_first_sample_and_majority(monkeypatch, tokenizer):
    responses = iter(["The answer is 5.", "The answer is 6.", "The answer is 6.",
                      "The answer is 2.", "so 2", "The answer is 3."])

    class ScriptedEngine:
        max_len = 64

        def __init__(self, model, tokenizer, max_batch_size):
            pass

        def generate(self, prompts, params):
            return [SimpleNamespace(text=next(responses)) for _ in prompts for _ in range(params.n)]

    monkeypatch.setattr(h, "Engine", ScriptedEngine)
    docs = [{"question": "a", "target": "6"}, {"question": "b", "target": "2"}]
    params = SamplingParams(temperature=0.7, n=3, max_new_tokens=8)
    metrics, records = h.evaluate_generation(None, tokenizer, TASKS["gsm8k_cot"], docs, [[], []], params)
    assert metrics["exact_match,strict-match"] == 0.5  # doc 1 first says 5, doc 2 first says 2
    assert metrics["exact_match,strict-match-maj@3"] == 1.0  # 6 beats 5; 2 ties 3 and came first
    assert metrics["exact_match,flexible-extract"] == 0.5 and metrics["exact_match,flexible-extract-maj@3"] == 1.0
    assert records[1]["filtered"]["strict-match"] == ["2", "[invalid]", "3"]
    assert records[1]["prompt"].endswith("Q: b\nA:") and records[0]["correct"] is False


def test_majority_vote_needs_a_temperature(tmp_path):
    with pytest.raises(BadConfigError, match="needs --temperature above 0"):
        h.run(h.TasksConfig(model=str(tmp_path), tasks="gsm8k", num_samples=4))


# --- rolling log-likelihood ----------------------------------------------------------------------------------


class UniformLM(torch.nn.Module):
    """Every next-token distribution uniform: log P = -log V for every token, whatever the context."""

    def __init__(self, vocab_size: int, max_seq_len: int):
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.cfg.vocab_size)


def test_rolling_scores_each_token_once_and_the_corpus_metrics_by_hand(tokenizer):
    V = tokenizer.vocab_size
    docs = [{"page": "x @-@ y . The cat sat on the mat .", "text": "x-y. The cat sat on the mat.", "target": ""},
            {"page": "Mina lives in Velmora .", "text": "Mina lives in Velmora.", "target": ""}]
    n_tokens = [len(tokenizer.encode(d["text"])) for d in docs]
    assert min(n_tokens) > 8  # several windows of 8
    metrics, records = h.evaluate_rolling(UniformLM(V, 8), tokenizer, MC, docs)
    assert [r["tokens"] for r in records] == n_tokens  # each token scored exactly once
    assert [r["loglikelihood"] for r in records] == pytest.approx([-n * math.log(V) for n in n_tokens])
    # Words and bytes of the ORIGINAL pages, counted by hand: 11 + 5 words, 34 + 23 bytes.
    assert [(r["words"], r["bytes"]) for r in records] == [(11, 34), (5, 23)]
    total = sum(n_tokens)
    assert metrics["word_perplexity,none"] == pytest.approx(V ** (total / 16))
    assert metrics["byte_perplexity,none"] == pytest.approx(V ** (total / 57))
    assert metrics["bits_per_byte,none"] == pytest.approx(total * math.log2(V) / 57)
    assert metrics["bits_per_byte_stderr,none"] > 0


def test_bootstrap_is_seeded_and_matches_the_analytic_error_of_a_mean():
    values = np.random.default_rng(0).normal(size=400)
    rows = np.stack([values, np.ones_like(values)], axis=1)
    mean = lambda sums: sums[0] / sums[1]  # noqa: E731
    boot = h.bootstrap_stderr(mean, rows, 1000, seed=3)
    assert boot == h.bootstrap_stderr(mean, rows, 1000, seed=3)
    assert boot == pytest.approx(h.mean_stderr(values), rel=0.1)
    assert h.bootstrap_stderr(mean, rows[:1], 1000, seed=3) is None and h.mean_stderr([1.0]) is None
    assert h.mean_stderr([0, 1, 1, 0]) == pytest.approx(math.sqrt(1 / 3) / 2)


def bigram_model(vocab_size: int, max_seq_len: int) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size, max_seq_len=max_seq_len, tie_embeddings=False))
    with torch.no_grad():
        for p in model.layers.parameters():
            p.zero_()
        model.embed_tokens.weight.mul_(20)
    return model.eval()


def test_a_continuation_longer_than_the_context_is_scored_in_windows(tokenizer):
    model = bigram_model(tokenizer.vocab_size, max_seq_len=16)
    context = tokenizer.encode("Mina lives in Velmora.", add_bos=True)
    continuation = tokenizer.encode(" She is a baker. Her favourite food is soup. The cat sat on the mat.")
    assert len(continuation) > 16
    ids = torch.tensor(context + continuation)
    with torch.no_grad():  # the bigram's log-probs without the model's windows
        logp = torch.log_softmax(model.lm_head(model.norm(model.embed_tokens(ids[:-1]))), -1)
    targets = ids[len(context):]
    expected = logp[len(context) - 1:].gather(-1, targets[:, None]).sum().item()
    ll, greedy = h.windowed_loglikelihood(model, context, continuation)
    assert ll == pytest.approx(expected, rel=1e-5)
    # Through score_requests: the long request goes to the windows, a short one to the batched scorer.
    short = " She is a baker."
    requests = [("Mina lives in Velmora.", tokenizer.decode(continuation)), ("Mina lives in Velmora.", short)]
    [(ll_long, _), (ll_short, _)] = h.score_requests(model, tokenizer, requests)
    assert ll_long == pytest.approx(expected, rel=1e-5)
    n = len(tokenizer.encode("Mina lives in Velmora." + short)) - len(context) + 1
    short_expected = logp[len(context) - 1:len(context) - 1 + n].gather(-1, targets[:n, None]).sum().item()
    assert ll_short == pytest.approx(short_expected, rel=1e-5)


# --- whole runs on the tiny trained checkpoint ----------------------------------------------------------------


@needs_data
def test_gsm8k_arc_easy_hellaswag_end_to_end(trained_checkpoint, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "tasks", "--model", str(trained_checkpoint), "--tasks", "gsm8k,arc_easy,hellaswag",
                 "--limit", "200", "--out", str(out), "--no-progress", "--chat", "no"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "samples_arc_easy.jsonl",
                                                       "samples_gsm8k.jsonl", "samples_hellaswag.jsonl"]
    for task in ("arc_easy", "hellaswag"):
        r = results["results"][task]
        assert 0 <= r["acc,none"] <= 1 and 0 <= r["acc_norm,none"] <= 1
        p = r["acc,none"]
        assert r["acc_stderr,none"] == pytest.approx(math.sqrt(p * (1 - p) / 199))  # sample std, n = 200
        assert results["chance"][task] == pytest.approx(0.25, abs=0.02)
        records = [json.loads(line) for line in (out / f"samples_{task}.jsonl").read_text().splitlines()]
        assert len(records) == 200 and records[3]["doc_id"] == 3
        assert all(r["correct"] == (int(np.argmax(r["loglikelihoods"])) == r["gold"]) for r in records)
    gsm = results["results"]["gsm8k"]
    assert set(gsm) == {"alias", "exact_match,strict-match", "exact_match_stderr,strict-match",
                        "exact_match,flexible-extract", "exact_match_stderr,flexible-extract"}
    assert results["n-shot"] == {"gsm8k": 5, "arc_easy": 0, "hellaswag": 0}
    assert results["n-samples"]["hellaswag"] == {"original": 10042, "effective": 200}
    assert results["sampling"]["gsm8k"]["temperature"] == 0 and results["sampling"]["gsm8k"]["max_new_tokens"] == 32
    assert results["config"]["limit"] == 200 and results["model"] == str(trained_checkpoint)
    assert "lower-case" in results["notes"]["hellaswag"] and results["chat_template"] is False
    sample = json.loads((out / "samples_gsm8k.jsonl").read_text().splitlines()[0])
    assert sample["target"] == "18" and len(sample["responses"]) == 1 and "Answer:" in sample["prompt"]


@needs_data
def test_wikitext_end_to_end_one_article(trained_checkpoint, tmp_path):
    results = h.run(h.TasksConfig(model=str(trained_checkpoint), tasks="wikitext2", limit=1, out=str(tmp_path),
                                  progress=False))
    r = results["results"]["wikitext2"]
    [record] = [json.loads(line) for line in (tmp_path / "samples_wikitext2.jsonl").read_text().splitlines()]
    assert record["target"] == "= Robert <unk> =" and record["words"] > 1000
    assert r["word_perplexity,none"] == pytest.approx(math.exp(-record["loglikelihood"] / record["words"]))
    assert r["bits_per_byte,none"] == pytest.approx(-record["loglikelihood"] / record["bytes"] / math.log(2))
    assert r["word_perplexity_stderr,none"] is None  # one document: nothing to resample
    assert "TOKENIZED variant" in results["notes"]["wikitext2"]


def test_world_cluster_through_the_chat_template_or_plain_text(trained_checkpoint, tmp_path):
    chat = h.run(h.TasksConfig(model=str(trained_checkpoint), tasks="world_sentiment", limit=2, progress=False,
                               out=str(tmp_path / "chat")))
    plain = h.run(h.TasksConfig(model=str(trained_checkpoint), tasks="world_sentiment", limit=2, progress=False,
                                chat="no", out=str(tmp_path / "plain")))
    prompts = {mode: json.loads((tmp_path / mode / "samples_world_sentiment.jsonl").read_text().splitlines()[0])
               ["prompt"] for mode in ("chat", "plain")}
    # (the starts were cut: a 64-token model keeps 32 prompt tokens to leave 32 for the answer)
    assert prompts["chat"].endswith("<|eos|><|assistant|>") and prompts["plain"].endswith("\nAssistant:")
    assert chat["chat_template"] is True and plain["chat_template"] is False  # the fixture's stage is "test"
    assert chat["sampling"]["world_sentiment"]["stop"] == () and plain["sampling"]["world_sentiment"]["stop"] == ("\n",)
    for results in (chat, plain):
        assert 0 <= results["results"]["world_sentiment"]["acc,none"] <= 1


def test_unknown_task_and_malformed_file_give_one_clear_line(trained_checkpoint, tmp_path, capsys):
    assert main(["eval", "tasks", "--model", str(trained_checkpoint), "--tasks", "gsm8k,hellaswagg"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'hellaswagg'; known tasks: arc_challenge" in err and "wikitext2" in err
    bad = tmp_path / "eval" / "gsm8k" / "test.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"question": "q", "answer": "1\n#### 1"}) + "\n{broken\n")
    assert main(["eval", "tasks", "--model", str(trained_checkpoint), "--tasks", "gsm8k", "--num-fewshot", "0",
                 "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert re.search(r"gsm8k/test\.jsonl, line 2: not valid JSON", capsys.readouterr().err)
