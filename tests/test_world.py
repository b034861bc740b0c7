"""The embedded world: determinism, the three disjoint fact sets, coverage of facts in the corpus, Korean
particles, and the atomic export (the instruction tasks it also writes are tested in test_world_tasks.py)."""

import json
import re
from pathlib import Path

import pytest

from lmforge.data import world as W
from lmforge.errors import BadConfigError


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export at the default sizes: (summary, world, train records, valid records, facts.json)."""
    out = tmp_path_factory.mktemp("export") / "world"
    summary = W.export_world(out, seed=0)
    return (summary, W.build_world(0), read_jsonl(out / "corpus" / "train.jsonl"),
            read_jsonl(out / "corpus" / "valid.jsonl"), json.loads((out / "facts.json").read_text(encoding="utf-8")))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        W.export_world(tmp_path / name, seed=seed, n_train_docs=200, n_valid_docs=20, n_tasks_per_cluster=20,
                       n_eval_tasks_per_cluster=5)
    a, b, c = (tree_bytes(tmp_path / name) for name in "abc")
    assert a == b
    tasks = [f"tasks/{split}.{layout}.jsonl" for split in ("test", "train", "validation") for layout in ("alpaca", "chat")]
    assert sorted(a) == sorted(c) == ["README.md", "corpus/train.jsonl", "corpus/valid.jsonl", "facts.json", *tasks]
    assert all(a[f] != c[f] for f in ("corpus/train.jsonl", "facts.json", "tasks/train.alpaca.jsonl"))


def test_fact_sets_are_disjoint_and_splits_cover_pretrain_people(exported):
    _, world, _, _, facts = exported
    pretrain, heldout = {p.id for p in world.pretrain_people}, {p.id for p in world.heldout_people}
    assert pretrain and heldout and not pretrain & heldout
    assert pretrain | heldout == {p.id for p in world.people}
    splits = {s: set(ids) for s, ids in facts["splits"].items()}
    assert splits["heldout"] == heldout
    assert splits["train"] | splits["validation"] | splits["test"] == pretrain
    assert sum(map(len, splits.values())) == len(world.people)  # no person in two splits
    assert len(splits["validation"]) == len(splits["test"]) > 0.08 * len(pretrain)
    # Canaries are the towns' vault codes, a fact set of their own; friends never cross fact sets.
    assert {(f["entity_id"], f["value"]) for f in facts["facts"] if f["fact_set"] == "canary"} == {
        (t.id, t.vault_code) for t in world.towns}
    assert len({t.vault_code for t in world.towns}) == len(world.towns)
    for p in world.people:
        assert not p.friend or world.person(p.friend).fact_set == p.fact_set


def test_heldout_people_never_appear_in_pretraining(exported):
    _, world, train, valid, _ = exported
    names = sorted({n for p in world.heldout_people for n in (p.name, p.first)})
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    heldout_ids = {p.id for p in world.heldout_people}
    for record in train + valid:
        assert not pattern.search(record["text"]), record["text"]
        assert not heldout_ids & set(record["meta"]["entity_ids"])


def test_every_canary_appears_in_the_train_corpus(exported):
    _, world, train, _, _ = exported
    text = "\n".join(r["text"] for r in train)
    for town in world.towns:
        assert f"vault code of {town.name} is {town.vault_code}." in text
    canary_docs = [r for r in train if r["meta"].get("canaries")]
    assert all(world.town(r["meta"]["canaries"][0]).vault_code in r["text"] for r in canary_docs)


def test_each_pretrain_persons_town_and_profession_appear_in_several_docs(exported):
    _, world, train, _, _ = exported
    docs_of = {p.id: [] for p in world.pretrain_people}
    for record in train:
        for entity_id in record["meta"]["entity_ids"]:
            docs_of.get(entity_id, []).append(record["text"])
    for p in world.pretrain_people:
        stating = [t for t in docs_of[p.id] if p.town in t and re.search(rf"\b{p.profession}\b", t)]
        assert len(stating) >= 2, p


def test_every_kind_present_in_both_corpora_and_sizes_as_documented(exported):
    summary, _, train, valid, _ = exported
    for records in (train, valid):
        assert {r["meta"]["kind"] for r in records} == set(W.DOC_MIX)
    assert len(train) == summary["train"]["docs"] == W.DEFAULT_TRAIN_DOCS
    assert 1_000_000 <= summary["train"]["chars"] <= 2_000_000
    assert 0.02 <= summary["valid"]["chars"] / summary["train"]["chars"] <= 0.05
    words = [len(r["text"].split()) for r in train]
    assert min(words) >= 8 and max(words) <= 120


def test_valid_is_fresh_text(exported):
    _, _, train, valid, _ = exported
    seen = {r["text"] for r in train}
    assert sum(r["text"] in seen for r in valid) < 0.2 * len(valid)


@pytest.mark.parametrize("args, english, korean", [
    (("cat", "eats", "fish"), "the cat eats the fish .", "고양이가 생선을 먹는다 ."),
    (("bear", "eats", "apple"), "the bear eats the apple .", "곰이 사과를 먹는다 ."),
    (("boy", "reads", "book"), "the boy reads the book .", "소년이 책을 읽는다 ."),
    (("student", "sees", "dog"), "the student sees the dog .", "학생이 개를 본다 ."),
    (("rabbit", "sleeps"), "the rabbit sleeps .", "토끼가 잔다 ."),
])
def test_korean_particles_follow_the_final_consonant(args, english, korean):
    assert W.render_parallel(*args) == (english, korean)


def test_korean_adjectives_places_and_topic_particle():
    assert W.render_parallel("rabbit", "sleeps", subject_adj="white", place="garden") == (
        "the white rabbit sleeps in the garden .", "하얀 토끼가 정원에서 잔다 .")
    assert W.render_parallel("girl", "buys", "hat", object_adj="red") == (
        "the girl buys the red hat .", "소녀가 빨간 모자를 산다 .")
    assert W.render_parallel("dog", predicate="big") == ("the dog is big .", "개는 크다 .")
    assert W.render_parallel("book", predicate="green") == ("the book is green .", "책은 초록색이다 .")


def test_generated_korean_uses_the_right_particle_everywhere(exported):
    _, _, train, _, _ = exported
    particles = {"이": True, "가": False, "을": True, "를": False, "은": True, "는": False}
    korean_nouns = {ko for ko, _ in W.NOUNS.values()}
    checked = 0
    for r in train:
        if r["meta"]["kind"] != "translation":
            continue
        for word in re.findall(r"[가-힣]+", r["text"]):
            stem, particle = word[:-1], word[-1]
            if stem in korean_nouns and particle in particles:
                has_final = (ord(stem[-1]) - 0xAC00) % 28 != 0
                assert has_final == particles[particle], word
                checked += 1
    assert checked > 1000


def test_reviews_match_their_label_and_arithmetic_is_correct(exported):
    _, _, train, _, _ = exported
    for r in train:
        kind, text = r["meta"]["kind"], r["text"]
        if kind == "review":
            wrong = W.BAD_WORDS if r["meta"]["sentiment"] == "positive" else W.GOOD_WORDS
            assert not any(re.search(rf"\b{w}\b", text) for w in wrong), text
        if kind == "arithmetic":
            for a, op, b, c in re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", text):
                assert eval(f"{a} {op} {b}") == int(c), text
            assert re.search(rf"(has|is) {r['meta']['answer']}( [a-z]+)?\.$", text), text
            assert 1 <= r["meta"]["steps"] <= 3


def test_lookups_by_name_and_id():
    world = W.build_world(0)
    person = world.pretrain_people[0]
    assert world.person(person.name) is world.person(person.id) is person
    assert world.town(person.town).name == person.town
    assert world.product(world.products[0].name) is world.products[0]
    with pytest.raises(KeyError):
        world.person(person.town)  # a town is not a person
    assert len(W.LEXICON) >= 60 and len({e.english for e in W.LEXICON}) == len(W.LEXICON)


def test_allocation_sums_to_n_and_covers_every_kind():
    for n in range(0, 60):
        counts = W._allocate(n, W.DOC_MIX)
        assert sum(counts.values()) == n
        assert n < 10 or min(counts.values()) >= 1


def test_export_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    out = tmp_path / "world"
    W.export_world(out, seed=0, n_train_docs=50, n_valid_docs=10)
    before = tree_bytes(out)
    calls = []

    def write_then_fail(path, docs):
        calls.append(path)
        if len(calls) == 2:  # train.jsonl is written; crash on valid.jsonl
            raise OSError("disk full")
        return real_write(path, docs)

    real_write = W._write_jsonl
    monkeypatch.setattr(W, "_write_jsonl", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        W.export_world(out, seed=1, n_train_docs=50, n_valid_docs=10)
    assert tree_bytes(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no temporary directory left behind


def test_export_replaces_an_existing_directory(tmp_path):
    out = tmp_path / "world"
    W.export_world(out, seed=0, n_train_docs=50, n_valid_docs=10)
    (out / "stale.txt").write_text("old")
    summary = W.export_world(out, seed=1, n_train_docs=60, n_valid_docs=10)
    assert not (out / "stale.txt").exists()
    assert len(read_jsonl(out / "corpus" / "train.jsonl")) == summary["train"]["docs"] == 60
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


@pytest.mark.parametrize("kwargs", [{"n_train_docs": -1}, {"n_train_docs": 0}, {"n_valid_docs": -5},
                                    {"n_train_docs": 2.5}, {"seed": "zero"}, {"n_valid_docs": True},
                                    {"n_tasks_per_cluster": 0}, {"n_eval_tasks_per_cluster": "50"}])
def test_bad_arguments_raise_bad_config_error(tmp_path, kwargs):
    with pytest.raises(BadConfigError):
        W.export_world(tmp_path / "world", **kwargs)
    assert not any(tmp_path.iterdir())


def test_out_dir_that_is_a_file_and_negative_doc_count_are_rejected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadConfigError):
        W.export_world(tmp_path / "file")
    with pytest.raises(BadConfigError):
        W.pretraining_documents(W.build_world(0), -3, seed=0)
