"""RAG: BM25 against `bm25s`, dense search with a hashed bag-of-words encoder, reciprocal-rank fusion by hand,
the prompt, citations, the answer judge, files and commands, and the world experiment's pieces."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from lmforge.apps.rag import (
    BM25, STOPWORDS, Passage, Retriever, bm25_tokens, build_prompt, cite, judge_answer, load_index,
    mean_reciprocal_rank, parse_citations, read_passages, recall_at_k, reciprocal_rank_fusion,
)
from lmforge.cli import main
from lmforge.errors import BadConfigError, BadFileError

CORPUS = [
    Passage("mina", "Mina Velk was born in Velmora. Mina works as a baker and keeps a cat."),
    Passage("tomas", "Tomas Rell was born in Fawick. Tomas works as a smith and keeps a dog."),
    Passage("velmora", "Velmora is a town in Norla. The pride of Velmora is its old bridge."),
    Passage("review", "I read Brilse last week. The story was wonderful. I would recommend it to a friend."),
    Passage("story", "One day, Tomas Rell, a smith from Fawick, went to Velmora and bought some bread."),
]


def hashed_bag_of_words(texts, dim: int = 64) -> torch.Tensor:
    """A deterministic test encoder: each BM25 token adds 1 to the slot its SHA-256 picks."""
    out = torch.zeros(len(texts), dim)
    for row, text in enumerate(texts):
        for token in bm25_tokens(text):
            out[row, int(hashlib.sha256(token.encode()).hexdigest(), 16) % dim] += 1
    return out


# --- BM25 --------------------------------------------------------------------------------------------------

def test_tokens_are_lowercase_words_of_two_or_more_characters_without_stopwords():
    assert bm25_tokens("The cat, a Dog and 7 or 42 birds!") == ["cat", "dog", "42", "birds"]
    bm25s_stopwords = pytest.importorskip("bm25s.stopwords")
    assert STOPWORDS == set(bm25s_stopwords.STOPWORDS_EN)


def test_bm25_ranks_the_right_passage_first():
    retriever = Retriever(CORPUS)
    assert retriever.search("Where was Tomas Rell born?", k=1, method="bm25")[0].passage.id == "tomas"
    assert retriever.search("What is the pride of Velmora?", k=1, method="bm25")[0].passage.id == "velmora"


def test_bm25_scores_match_bm25s():
    bm25s = pytest.importorskip("bm25s")
    documents = [bm25_tokens(p.text) for p in CORPUS]
    reference = bm25s.BM25(k1=1.5, b=0.75, method="lucene", dtype="float64")
    reference.index(documents, show_progress=False)
    ours = BM25(documents, k1=1.5, b=0.75)
    for query in ("Where was Tomas Rell born?", "smith smith Velmora", "bridge of Norla", "unknown words here"):
        tokens = [t for t in bm25_tokens(query) if t in reference.vocab_dict]
        expected = reference.get_scores(tokens) if tokens else np.zeros(len(CORPUS))
        np.testing.assert_allclose(ours.scores(bm25_tokens(query)), expected, atol=1e-6)


def test_bm25_matches_the_formula_by_hand():
    documents = [["cat", "sat", "mat"], ["dog", "ate", "apples", "apples"], ["cat", "dog"]]
    scores = BM25(documents).scores(["cat"])
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # cat is in 2 of 3 documents
    avgdl = 3.0
    expected = [idf * 1 / (1 + 1.5 * (1 - 0.75 + 0.75 * 3 / avgdl)), 0.0,
                idf * 1 / (1 + 1.5 * (1 - 0.75 + 0.75 * 2 / avgdl))]
    np.testing.assert_allclose(scores, expected, atol=1e-12)


# --- dense and hybrid ----------------------------------------------------------------------------------------

def test_dense_search_with_a_hashed_bag_of_words_ranks_the_right_passage_first():
    retriever = Retriever(CORPUS, hashed_bag_of_words)
    hits = retriever.search("Mina Velk baker cat", k=3, method="dense")
    assert hits[0].passage.id == "mina"
    assert hits[0].score == pytest.approx(max(h.score for h in hits)) and -1 <= hits[-1].score <= 1


def test_reciprocal_rank_fusion_by_hand():
    fused = dict(reciprocal_rank_fusion([[7, 3], [3, 9]]))
    assert fused == pytest.approx({3: 1 / 62 + 1 / 61, 7: 1 / 61, 9: 1 / 62})
    assert [doc for doc, _ in reciprocal_rank_fusion([[7, 3], [3, 9]])] == [3, 7, 9]


def test_hybrid_search_equals_the_fusion_of_both_rankings_computed_by_hand():
    retriever = Retriever(CORPUS, hashed_bag_of_words)
    query = "Tomas smith Velmora"
    bm25_order = list(np.argsort(-retriever.scores(query, "bm25"), kind="stable"))
    dense_order = list(np.argsort(-retriever.scores(query, "dense"), kind="stable"))
    by_hand = {i: 1 / (60 + bm25_order.index(i) + 1) + 1 / (60 + dense_order.index(i) + 1) for i in range(len(CORPUS))}
    hits = retriever.search(query, k=len(CORPUS), method="hybrid")
    assert {h.index: h.score for h in hits} == pytest.approx(by_hand)
    assert [h.score for h in hits] == sorted(by_hand.values(), reverse=True)


def test_dense_search_without_an_encoder_is_a_config_error():
    with pytest.raises(BadConfigError, match="encoder"):
        Retriever(CORPUS).search("Mina", method="dense")


def test_recall_at_k_and_mean_reciprocal_rank():
    retrieved = [["a", "b", "c"], ["c", "a", "b"], ["b", "c", "d"]]
    assert recall_at_k(retrieved, ["a", "a", "a"], 1) == pytest.approx(1 / 3)
    assert recall_at_k(retrieved, ["a", "a", "a"], 2) == pytest.approx(2 / 3)
    assert mean_reciprocal_rank(retrieved, ["a", "a", "a"]) == pytest.approx((1 + 1 / 2 + 0) / 3)


# --- prompt, citations, judge -----------------------------------------------------------------------------

def test_the_prompt_keeps_the_passages_that_fit_and_cuts_a_first_one_that_does_not(tokenizer):
    question = "Where was Tomas Rell born?"
    ids, used = build_prompt(tokenizer, question, CORPUS[:3], max_prompt_tokens=10_000)
    assert [p.id for p in used] == ["mina", "tomas", "velmora"]
    text = tokenizer.decode(ids)
    assert text.index(question) < text.index("[1] Mina Velk") < text.index("[2] Tomas Rell")
    two = len(build_prompt(tokenizer, question, CORPUS[:2], 10_000)[0])
    ids, used = build_prompt(tokenizer, question, CORPUS[:3], max_prompt_tokens=two)
    assert [p.id for p in used] == ["mina", "tomas"] and len(ids) == two
    none = len(build_prompt(tokenizer, question, [], 10_000)[0])
    ids, used = build_prompt(tokenizer, question, CORPUS[:3], max_prompt_tokens=none + 8)
    assert len(used) == 1 and len(ids) <= none + 8 and CORPUS[0].text.startswith(used[0].text)
    with pytest.raises(BadConfigError, match="question alone"):
        build_prompt(tokenizer, question, CORPUS[:1], max_prompt_tokens=3)


def test_citations_are_parsed_or_attached():
    assert parse_citations("Velmora [2].", 2) == ("Velmora.", [2])
    assert parse_citations("Velmora [3] [1] [1]", 2) == ("Velmora", [1])
    marked = cite("baker [1]", CORPUS[:2])
    assert marked["answer"] == "baker" and marked["cited_by"] == "model" and marked["citations"][0]["id"] == "mina"
    attached = cite("smith", CORPUS[:2])
    assert attached["cited_by"] == "attached" and [c["id"] for c in attached["citations"]] == ["tomas"]
    assert cite("potter", CORPUS[:2])["cited_by"] == "none"


@pytest.mark.parametrize("answer, outcome", [
    ("baker", "correct"), ("Baker.", "correct"), ("smith", "misread"), ("miner", "hallucinated"),
    ("baker or miner", "hallucinated"), ("The passages do not say.", "abstained"), ("", "abstained"),
    ("a gaililor", "hallucinated"),
])
def test_judge_answer_outcomes(answer, outcome):
    context = "Where does Tom work? Mina works as a smith. Tom works as a baker."
    assert judge_answer(answer, "baker", context, ["baker", "smith", "miner"]) == outcome


def test_closed_book_answers_are_judged_against_the_question_alone():
    assert judge_answer("smith", "baker", "What is the job of Tom?", ["baker", "smith"]) == "hallucinated"
    assert judge_answer("17", "55", "How old is Tom?", [str(a) for a in range(100)]) == "hallucinated"
    assert judge_answer("55 years old", "55", "How old is Tom?", [str(a) for a in range(100)]) == "correct"


# --- files and commands ---------------------------------------------------------------------------------------

def test_read_passages_from_jsonl_and_text(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"id": "a", "text": "First  passage."}\n\n{"text": "Second.", "title": "Note"}\n')
    assert [(p.id, p.text) for p in read_passages(jsonl)] == [("a", "First passage."), ("docs:3", "Note. Second.")]
    text = tmp_path / "docs.txt"
    text.write_text("One line\nand more.\n\n\nTwo.\n")
    assert [(p.id, p.text) for p in read_passages(text)] == [("docs:1", "One line and more."), ("docs:5", "Two.")]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": \n', "docs.jsonl:2: not JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', 'docs.jsonl:2: expected an object with a non-empty string "text"'),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', "'a' appears more than once"),
    ("\n\n", "no passages"),
])
def test_bad_documents_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(BadFileError, match=message):
        read_passages(path)


def test_index_and_ask_from_the_command_line(trained_checkpoint, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": p.id, "text": p.text}) + "\n" for p in CORPUS))
    index = tmp_path / "index"
    assert main(["rag", "index", str(docs), "--out", str(index), "--encoder", str(trained_checkpoint)]) == 0
    settings = json.loads((index / "index.json").read_text())
    assert settings["passages"] == len(CORPUS) and np.load(index / "embeddings.npy").shape[0] == len(CORPUS)
    retriever, _ = load_index(index)
    assert retriever.search("Where was Tomas Rell born?", 1, "bm25")[0].passage.id == "tomas"

    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "Where was Tomas Rell born?"}\n{"question": "What is the pride of Velmora?"}\n')
    out = tmp_path / "answers.jsonl"
    assert main(["rag", "ask", "--model", str(trained_checkpoint), "--index", str(index), "--questions",
                 str(questions), "--method", "hybrid", "--k", "3", "--max-new-tokens", "6", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and len(rows[0]["retrieved"]) == 3 and len(rows[0]["in_prompt"]) >= 1
    assert rows[0]["cited_by"] in ("model", "attached", "none")
    assert "Q: Where was Tomas Rell born?" in capsys.readouterr().out


def test_bad_ask_and_index_requests_exit_with_one_line(trained_checkpoint, tmp_path, capsys):
    assert main(["rag", "ask", "--model", str(trained_checkpoint), "--index", str(tmp_path / "nowhere"),
                 "--question", "Who?"]) == 2
    assert "index.json: missing" in capsys.readouterr().err
    assert main(["rag", "index", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "i")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    docs = tmp_path / "docs.txt"
    docs.write_text("Mina Velk was born in Velmora.\n")
    assert main(["rag", "index", str(docs), "--out", str(tmp_path / "bm25_only")]) == 0
    assert main(["rag", "ask", "--model", str(trained_checkpoint), "--index", str(tmp_path / "bm25_only"),
                 "--question", "Who?", "--method", "dense"]) == 2
    assert "only --method bm25" in capsys.readouterr().err
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    assert main(["rag", "index", str(docs), "--out", str(tmp_path / "precious")]) == 2
    assert "is not an index" in capsys.readouterr().err and (tmp_path / "precious" / "notes.txt").is_file()


# --- the world experiment's pieces ------------------------------------------------------------------------

def test_the_world_corpus_holds_every_biography_and_no_vault_code():
    from lmforge.data.world import build_world
    from lmforge.experiments.rag import world_passages, world_questions

    world = build_world(0)
    passages = world_passages(world, n_distractors=30, seed=0)
    ids = {p.id for p in passages}
    assert {f"bio:{p.id}" for p in world.people} <= ids and len(passages) == len(world.people) + len(world.towns) + 30
    assert not any(code in p.text for p in passages for code in world.canaries.values())
    questions = world_questions(world, world.heldout_people, 0, seed=0)
    assert {q["fact_set"] for q in questions} == {"heldout"} and all(q["gold"] in ids for q in questions)
    assert len(world_questions(world, world.heldout_people, 10, seed=0)) == 10


def test_reading_examples_never_use_an_evaluation_person():
    from lmforge.data.world import build_world, describe_person
    from lmforge.experiments.rag import ABSTAIN_ANSWER, invented_people, reading_examples, world_questions

    world = build_world(0)
    invented = invented_people(world, 1, seed=0)
    assert invented and not {p.first for p in invented} & {p.first for p in world.people}
    assert all(p.town in {t.name for t in world.towns} and p.friend == "" for p in invented)
    questions = world_questions(world, invented[:5], 0, seed=0)
    passages = {f"bio:{p.id}": Passage(f"bio:{p.id}", describe_person(p)) for p in invented[:5]}
    retriever = Retriever(list(passages.values()))
    hits = [retriever.search(q["question"], 3, "bm25") for q in questions]
    examples = reading_examples(questions, hits, passages, 1, abstain_share=0.3, seed=0)
    answers = [e["messages"][1]["content"] for e in examples]
    assert ABSTAIN_ANSWER in answers
    for q, example, answer in zip(questions, examples, answers):
        if answer != ABSTAIN_ANSWER:
            assert answer == f"{q['truth']} [1]" and passages[q["gold"]].text in example["messages"][0]["content"]
    names = {p.name for p in world.people}
    assert not any(name in e["messages"][0]["content"] for e in examples for name in names)


@pytest.mark.slow
def test_quick_rag_experiment_on_the_shared_run(quick_run):
    assert main(["experiment", "rag", "--run", str(quick_run), "--quick", "--no-progress"]) == 0
    results = json.loads((quick_run / "experiments" / "rag.json").read_text())
    assert set(results["models"]) == {"sft", "aligned", "reader"}
    for by_set in results["models"].values():
        for summary in by_set.values():
            for condition in ("closed_book", "rag"):
                rates = summary[condition]
                assert sum(r["k"] for r in rates.values()) == rates["correct"]["n"] == 8
                assert all(0 <= r["interval"][0] <= r["rate"] <= r["interval"][1] <= 1 for r in rates.values())
    assert {"bm25", "dense", "hybrid"} == set(results["recall"]["heldout"]) and results["method"] in ("bm25", "dense",
                                                                                                         "hybrid")
    report = (quick_run / "report.md").read_text()
    assert "## Experiment: RAG" in report and "recall@5" in report
