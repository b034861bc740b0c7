"""AI-text detection: the metrics against scikit-learn and hand cases, the per-token scores on scripted logits,
Binoculars against a direct unbatched computation, the command on small files, and the experiment's pieces."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from lmforge.apps.detect import (GLTR_BUCKETS, auroc, bootstrap_auroc, check_same_tokenizer, evaluate_detectors,
                                 fit_logistic, score_texts, score_token_ids, tpr_at_fpr)
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.errors import MismatchError
from lmforge.experiments.detect import (continuation_pairs, gutenberg_body, outside_sources, paragraphs,
                                        pick_passages, section)
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

from conftest import SHARED, tiny_config, train_a_little


# ---------------------------------------------------------------------------------------------------------
# Metrics


def test_auroc_matches_sklearn_on_random_and_tied_scores():
    rng = np.random.default_rng(0)
    cases = [(rng.normal(0, 1, 200), rng.normal(0.5, 1, 150)),        # continuous scores
             (rng.integers(0, 4, 300).astype(float), rng.integers(1, 5, 100).astype(float)),  # many ties
             (np.ones(10), np.ones(7))]                                 # all tied: 0.5
    for human, machine in cases:
        labels = np.r_[np.zeros(len(human)), np.ones(len(machine))]
        assert auroc(human, machine) == pytest.approx(roc_auc_score(labels, np.r_[human, machine]), abs=1e-12)
    assert auroc([1, 2, 3], [2, 4]) == 0.75  # the module docstring's worked example


def test_tpr_at_1pct_fpr_on_hand_cases():
    human = np.arange(100.0)  # k = 1 human text may be flagged: the threshold is the 2nd highest, 98
    result = tpr_at_fpr(human, np.array([98.5, 99, 98, 50, 120]))
    assert result == {"tpr": 0.6, "fpr": 0.01, "threshold": 98.0}  # 98 ties the threshold: counted as human
    tied = np.r_[np.zeros(95), np.full(5, 5.0)]  # five humans tied at the top: none may be flagged
    assert tpr_at_fpr(tied, np.array([5.0, 6.0])) == {"tpr": 0.5, "fpr": 0.0, "threshold": 5.0}
    assert tpr_at_fpr(np.arange(50.0), np.array([49.0, 49.5]))["tpr"] == 0.5  # under 100 humans: above all of them
    assert tpr_at_fpr(np.arange(300.0), np.array([296.5]))["threshold"] == 296.0  # k = 3 at n = 300


def test_bootstrap_interval_brackets_the_auroc_and_pairs_move_together():
    rng = np.random.default_rng(1)
    human = rng.normal(0, 1, 80)
    machine = human + 0.3  # every machine text beats its own pair, not every other human
    low, high = bootstrap_auroc(human, machine, rounds=200, seed=0, paired=True)
    assert low <= auroc(human, machine) <= high < 1.0


def test_logistic_regression_matches_sklearn():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (300, 4))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(0, 1, 300) > 0).astype(float)
    ours = fit_logistic(x, y, l2=1.0)
    ref = LogisticRegression(C=1.0, tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(ours, np.r_[ref.intercept_, ref.coef_[0]], atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Scores per text


class ScriptedModel(torch.nn.Module):
    """Returns the same logits row at every position: token i gets logit -0.01 i, so its rank is i + 1."""

    def __init__(self, logits_row: torch.Tensor, max_seq_len: int = 64):
        super().__init__()
        self.row = torch.nn.Parameter(logits_row, requires_grad=False)
        self.cfg = type("Cfg", (), {"max_seq_len": max_seq_len, "vocab_size": len(logits_row)})()

    def forward(self, input_ids):
        return self.row.expand(*input_ids.shape, -1)


def test_log_rank_and_gltr_buckets_on_scripted_logits():
    vocab = 1100
    row = -0.01 * torch.arange(vocab, dtype=torch.float)
    targets = [0, 9, 10, 99, 100, 999, 1000, 1099]  # ranks 1, 10 | 11, 100 | 101, 1000 | 1001, 1100
    [scores] = score_token_ids(ScriptedModel(row), [[5, *targets]], pad_id=0)
    ranks = np.array(targets) + 1
    assert [scores[b] for b in GLTR_BUCKETS] == [0.25, 0.25, 0.25, 0.25]
    assert scores["logrank"] == pytest.approx(np.log(ranks).mean())
    logp = torch.log_softmax(row.double(), -1)
    assert scores["loglik"] == pytest.approx(logp[targets].mean().item())
    assert scores["entropy"] == pytest.approx(-(logp.exp() * logp).sum().item())
    mean, var = (logp.exp() * logp).sum(), (logp.exp() * logp ** 2).sum() - (logp.exp() * logp).sum() ** 2
    curvature = (logp[targets].sum() - len(targets) * mean) / math.sqrt(len(targets) * var)
    assert scores["fast_detectgpt"] == pytest.approx(curvature.item(), rel=1e-5)

    tied = torch.tensor([2.0, 2.0, 1.0, 1.0, 0.0])  # a tie takes the best rank: 1, 1, 3, 3, 5
    [scores] = score_token_ids(ScriptedModel(tied), [[0, 1, 3, 4]], pad_id=0)
    assert scores["logrank"] == pytest.approx((math.log(1) + math.log(3) + math.log(5)) / 3)


@pytest.fixture(scope="module")
def model_pair(tokenizer):
    """A base model trained a little and a differently trained copy: observer and performer of one tokenizer."""
    torch.manual_seed(0)
    observer = train_a_little(Transformer(tiny_config(tokenizer.vocab_size)), tokenizer)
    torch.manual_seed(1)
    performer = train_a_little(Transformer(tiny_config(tokenizer.vocab_size)), tokenizer, steps=40, lr=5e-3)
    return observer, performer


TEXTS = ["The cat sat on the mat.", "Mina lives in Velmora. She is a baker. Her favourite food is soup.",
         "고양이가 생선을 먹는다.", "def add(a, b): return a + b", "x"]


def test_binoculars_batched_equals_a_direct_computation(model_pair, tokenizer):
    observer, performer = model_pair
    rows = score_texts(performer, tokenizer, TEXTS, observer=observer, batch_size=3)  # padded, reordered batches
    for text, row in zip(TEXTS, rows):
        ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(text)]])
        inputs, targets = ids[:, :-1], ids[0, 1:]
        with torch.no_grad():
            p_logits, o_logits = performer(inputs)[0].double(), observer(inputs)[0].double()
        log_ppl = F.cross_entropy(p_logits, targets).item()
        log_xppl = -(o_logits.softmax(-1) * p_logits.log_softmax(-1)).sum(-1).mean().item()
        assert row["log_ppl"] == pytest.approx(log_ppl, rel=1e-5)
        assert row["log_xppl"] == pytest.approx(log_xppl, rel=1e-5)
        assert row["binoculars"] == pytest.approx(log_ppl / log_xppl, rel=1e-5)
        assert row["loglik"] == pytest.approx(-log_ppl, rel=1e-5)  # single-model scores use the performer
        assert row["n_tokens"] == len(targets) and not row["truncated"]


def test_texts_longer_than_the_context_are_cut(model_pair, tokenizer):
    _, performer = model_pair
    [row] = score_texts(performer, tokenizer, [" ".join(["The cat sat on the mat."] * 40)])
    assert row["truncated"] and row["n_tokens"] == performer.cfg.max_seq_len


def test_binoculars_refuses_models_that_do_not_share_a_tokenizer(model_pair, tokenizer):
    other = train_tokenizer(["completely different words here"] * 50, vocab_size=300)
    observer, performer = model_pair
    with pytest.raises(MismatchError, match="tokenizer"):
        check_same_tokenizer(performer, tokenizer, observer, other, "perf", "obs")


def test_evaluate_detectors_reports_every_detector(model_pair, tokenizer):
    observer, performer = model_pair
    rows = score_texts(performer, tokenizer, TEXTS * 4, observer=observer)
    metrics = evaluate_detectors(rows[:10], rows[10:], rounds=20)
    assert set(metrics) == {"log-likelihood", "log-rank", "entropy", "GLTR top-10", "Fast-DetectGPT", "Binoculars",
                            "GLTR logistic regression"}
    for m in metrics.values():
        assert 0 <= m["auroc"] <= 1 and m["fpr"] <= 0.01 and m["auroc_interval"][0] <= m["auroc_interval"][1]


# ---------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def checkpoints(model_pair, tokenizer, tmp_path_factory):
    observer, performer = model_pair
    root = tmp_path_factory.mktemp("detect")
    save_checkpoint(root / "observer", observer, tokenizer, lineage={"stage": "test"})
    save_checkpoint(root / "performer", performer, tokenizer, lineage={"stage": "test"})
    return root / "observer", root / "performer"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_command_scores_labelled_files(checkpoints, tmp_path, capsys):
    observer, performer = checkpoints
    _write_jsonl(tmp_path / "human.jsonl", [{"text": t, "label": "human"} for t in TEXTS * 3])
    _write_jsonl(tmp_path / "machine.jsonl", [{"text": t[::-1], "label": 1} for t in TEXTS * 3])
    out = tmp_path / "scores.json"
    assert main(["detect", "--model", str(performer), "--observer", str(observer), str(tmp_path / "human.jsonl"),
                 str(tmp_path / "machine.jsonl"), "--bootstrap-rounds", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Binoculars" in printed and "TPR@1%FPR" in printed
    result = json.loads(out.read_text())
    assert result["n_texts"] == 30 and result["texts"][0]["source"].endswith("human.jsonl:1")
    assert "binoculars" in result["texts"][0] and set(result["metrics"]) >= {"log-rank", "Binoculars"}


def test_command_prints_scores_of_unlabelled_text(checkpoints, tmp_path, capsys):
    _, performer = checkpoints
    (tmp_path / "one.txt").write_text(TEXTS[1], encoding="utf-8")
    assert main(["detect", "--model", str(performer), str(tmp_path / "one.txt")]) == 0
    printed = capsys.readouterr().out
    assert "one.txt" in printed and "logrank" in printed and "binoculars" not in printed


@pytest.mark.parametrize("name, content, expected", [
    ("missing.jsonl", None, "missing.jsonl: no such file"),
    ("empty.txt", "", "empty.txt: empty file"),
    ("blank.jsonl", '{"text": " "}\n', "blank.jsonl:1: empty text"),
    ("empty.jsonl", "\n", "empty.jsonl: empty file"),
    ("bad.jsonl", '{"text": "a", "label": 7}\n', "bad.jsonl:1: label must be"),
    ("notext.jsonl", '{"body": "a"}\n', "notext.jsonl:1: no string field 'text'"),
])
def test_command_names_the_bad_file(checkpoints, tmp_path, capsys, name, content, expected):
    _, performer = checkpoints
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    assert main(["detect", "--model", str(performer), str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_command_asks_for_files(checkpoints, capsys):
    assert main(["detect", "--model", str(checkpoints[1])]) == 2
    assert "no files given" in capsys.readouterr().err


def test_command_refuses_an_observer_with_another_tokenizer(checkpoints, tmp_path, capsys):
    _, performer = checkpoints
    other = train_tokenizer(["completely different words here"] * 50, vocab_size=300)
    save_checkpoint(tmp_path / "other", Transformer(tiny_config(other.vocab_size)), other, lineage={"stage": "test"})
    (tmp_path / "a.txt").write_text("The cat sat.", encoding="utf-8")
    assert main(["detect", "--model", str(performer), "--observer", str(tmp_path / "other"),
                 str(tmp_path / "a.txt")]) == 2
    assert "share one tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The experiment


def test_continuation_pairs_are_trimmed_to_one_length(model_pair, tokenizer):
    _, performer = model_pair
    humans = [" ".join(TEXTS[:4]), TEXTS[1] + " " + TEXTS[0]]
    pairs, dropped = continuation_pairs(performer, tokenizer, humans, max_tokens=40, prompt_tokens=8,
                                        min_new_tokens=1, temperature=1.0, top_p=1.0, seed=0)
    assert len(pairs) + dropped == 2
    for p in pairs:
        human_ids = tokenizer.encode(humans[p["index"]])[:40]
        assert tokenizer.decode(human_ids[:p["tokens"]]) == p["human"]  # the human side is its own first n tokens
        assert p["prompt_tokens"] <= min(8, len(human_ids) // 2) and p["tokens"] <= 40
        assert p["machine"].startswith(tokenizer.decode(human_ids[:p["prompt_tokens"]]))


def test_outside_text_sources_and_their_absence(tmp_path, tokenizer):
    assert outside_sources(tmp_path) == {}  # no shared data: the setting is skipped
    book = ("Header line\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\n\r\nFirst para\r\ngoes on.\r\n\r\n"
            "Second.\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nLicence text")
    assert paragraphs(gutenberg_body(book)) == ["First para goes on.", "Second."]
    (tmp_path / "pretrain" / "gutenberg").mkdir(parents=True)
    (tmp_path / "pretrain" / "gutenberg" / "1.txt").write_text(book, encoding="utf-8")
    sources = outside_sources(tmp_path)
    assert list(sources) == ["gutenberg"]
    longer_than_second = len(tokenizer.encode("Second.")) + 1
    assert len(tokenizer.encode("First para goes on.")) >= longer_than_second
    assert pick_passages(sources["gutenberg"], tokenizer, 5, longer_than_second, seed=0) == ["First para goes on."]


def test_section_says_when_a_setting_was_skipped(tmp_path):
    metrics = {"auroc": 0.5, "tpr": 0.0, "fpr": 0.0, "threshold": 0.0, "mean_human": 0.0, "mean_machine": 0.0,
               "auroc_interval": [0.4, 0.6]}
    source = {"pairs": 2, "dropped": 0, "mean_tokens": 10.0, "identical": 0, "detectors": {"log-rank": metrics},
              "gltr": {"human": [1, 0, 0, 0], "machine": [1, 0, 0, 0]},
              "binoculars_terms": {s: {"log_ppl": 1.0, "log_xppl": 1.0} for s in ("human", "machine")},
              "example": {"human": "a\nb", "machine": "a c"}}
    results = {"config": {"prompt_tokens": 30, "max_tokens": 128},
               "settings": {"world": {"human_texts": 2, "sources": {"base, T=1": source}},
                            "tinystories": {"skipped": "/x/pretrain/tinystories is absent"}}}
    text = "\n".join(section(results, tmp_path))
    assert "| log-rank | 0.500 [0.400, 0.600] | 0% |" in text
    assert "Skipped: /x/pretrain/tinystories is absent." in text and "“a ⏎ b”" in text


def test_quick_detect_on_the_shared_run(quick_run):
    assert main(["experiment", "detect", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "detect.json").read_text())
    world = results["settings"]["world"]
    assert world["human_texts"] == 16 and {"base, T=1", "SFT, T=1"} <= set(world["sources"])
    base = world["sources"]["base, T=1"]
    assert base["pairs"] + base["dropped"] == 16 and "Binoculars" in base["detectors"]
    has_data = (SHARED / "data" / "pretrain" / "tinystories").is_dir()
    assert ("sources" in results["settings"]["tinystories"]) == has_data
    assert ("skipped" in results["settings"]["tinystories"]) == (not has_data)
    pairs = quick_run / "experiments" / "detect" / "world_base_t_1.jsonl"
    assert sum(1 for _ in pairs.open()) == 2 * base["pairs"]
    report = (quick_run / "report.md").read_text()
    assert "## Experiment: AI-text detection" in report and "TPR@1%FPR" in report
