"""Few-shot prompts: the exact lm-eval layout, seeded exemplar choice, and the multi-turn chat form."""

from __future__ import annotations

import random

import pytest

from lmforge.errors import BadConfigError
from lmforge.infer.prompting import FewShotFormat, choose_exemplars, few_shot_messages, few_shot_prompt
from lmforge.tokenizer import train_tokenizer

QA = FewShotFormat(doc_to_text="Question: {question}\nAnswer:", doc_to_target="{answer}")
POOL = [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(20)]
MINA = [
    {"question": "Where does Mina live?", "answer": "Velmora"},
    {"question": "What is Mina's job?", "answer": "baker"},
    {"question": "What is Mina's favourite food?", "answer": "soup"},
]


def test_two_shot_prompt_exact_string():
    fmt = FewShotFormat(
        doc_to_text="Q: {question}\nA:", doc_to_target="{answer}",
        description="Answer the questions.", target_delimiter=" ", fewshot_delimiter="\n\n",
    )
    assert few_shot_prompt(MINA[2], MINA[:2], fmt) == (
        "Answer the questions.\n\n"
        "Q: Where does Mina live?\nA: Velmora\n\n"
        "Q: What is Mina's job?\nA: baker\n\n"
        "Q: What is Mina's favourite food?\nA:"
    )


def test_custom_delimiters_and_no_description():
    fmt = FewShotFormat(
        doc_to_text="{question} =", doc_to_target="{answer}", target_delimiter="", fewshot_delimiter="\n"
    )
    expected = "What is 0 plus 1? =1\nWhat is 1 plus 1? =2\nWhat is 3 plus 1? ="
    assert few_shot_prompt(POOL[3], POOL[:2], fmt) == expected


def test_zero_shot_is_just_the_query():
    assert choose_exemplars(POOL, 0, seed=1234) == []
    assert few_shot_prompt(MINA[0], [], QA) == "Question: Where does Mina live?\nAnswer:"


def test_same_seed_same_exemplars_other_seed_differs():
    first = choose_exemplars(POOL, 5, seed=1234)
    assert first == choose_exemplars(POOL, 5, seed=1234)
    assert len(first) == 5 and all(ex in POOL for ex in first)
    others = [choose_exemplars(POOL, 5, seed=s) for s in range(10)]
    assert any(o != first for o in others)


def test_choice_ignores_the_global_rng():
    random.seed(0)
    a = choose_exemplars(POOL, 4, seed=7)
    random.seed(99)
    random.random()
    assert choose_exemplars(POOL, 4, seed=7) == a
    state = random.getstate()
    choose_exemplars(POOL, 4, seed=7)
    assert random.getstate() == state


def test_evaluated_doc_never_among_its_exemplars():
    for seed in range(50):
        for doc in POOL[:5]:
            chosen = choose_exemplars(POOL, 19, seed=seed, exclude=doc)
            assert doc not in chosen and len(chosen) == 19
    # a pool holding the doc twice still gives k exemplars, none of them the doc
    pool = POOL[:4] + [POOL[0]]
    for seed in range(20):
        chosen = choose_exemplars(pool, 3, seed=seed, exclude=POOL[0])
        assert sorted(ex["answer"] for ex in chosen) == ["2", "3", "4"]


def test_excluding_a_doc_outside_the_pool_matches_plain_draw():
    outside = {"question": "elsewhere", "answer": "x"}
    assert choose_exemplars(POOL, 3, seed=5, exclude=outside) == choose_exemplars(POOL, 3, seed=5)


def test_lm_eval_draws_k_plus_one_then_drops_the_doc():
    drawn = random.Random(1234).sample(POOL, 4)
    doc = drawn[1]
    assert choose_exemplars(POOL, 3, seed=1234, exclude=doc) == [ex for ex in drawn if ex != doc]


def test_first_method():
    assert choose_exemplars(POOL, 3, seed=0, method="first") == POOL[:3]
    assert choose_exemplars(POOL, 3, seed=99, method="first") == POOL[:3]
    assert choose_exemplars(POOL, 3, seed=0, exclude=POOL[1], method="first") == [POOL[0], POOL[2], POOL[3]]


def test_missing_key_names_the_key():
    with pytest.raises(BadConfigError, match="'question'") as e:
        few_shot_prompt({"query": "hi", "answer": "x"}, [], QA)
    assert "doc_to_text" in str(e.value)
    with pytest.raises(BadConfigError, match="doc_to_target.*'answer'"):
        few_shot_prompt(MINA[0], [{"question": "q"}], QA)
    with pytest.raises(BadConfigError, match="'answer'"):
        few_shot_messages(MINA[0], [{"question": "q"}], QA)


def test_k_larger_than_pool_names_the_sizes():
    with pytest.raises(BadConfigError, match="5.*only 3"):
        choose_exemplars(MINA, 5, seed=0)
    # the doc itself does not count as an exemplar
    with pytest.raises(BadConfigError, match="3.*only 2"):
        choose_exemplars(MINA, 3, seed=0, exclude=MINA[0])
    with pytest.raises(BadConfigError, match="method"):
        choose_exemplars(MINA, 1, seed=0, method="last")
    with pytest.raises(BadConfigError, match=">= 0"):
        choose_exemplars(MINA, -1, seed=0)


def test_messages_alternate_and_render_ends_with_assistant():
    fmt = FewShotFormat(doc_to_text="Q: {question}", doc_to_target="{answer}", description="Be brief.")
    messages = few_shot_messages(MINA[2], MINA[:2], fmt, system="You are a quiz bot.")
    assert messages[0] == {"role": "system", "content": "You are a quiz bot.\n\nBe brief."}
    roles = [m["role"] for m in messages[1:]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1:3] == [
        {"role": "user", "content": "Q: Where does Mina live?"},
        {"role": "assistant", "content": "Velmora"},
    ]
    assert messages[-1] == {"role": "user", "content": "Q: What is Mina's favourite food?"}
    assert [m["role"] for m in few_shot_messages(MINA[2], MINA[:2], QA)][0] == "user"  # no system turn

    tok = train_tokenizer([f"{ex['question']} {ex['answer']}" for ex in MINA] * 50, 300)
    ids = tok.render_prompt(messages)
    assert ids[-1] == tok.role_ids["assistant"]
    assert ids[:-1] == tok.render(messages)[0]
    assert tok.decode(ids, skip_special=False).endswith("favourite food?<|eos|><|assistant|>")
