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


# -- chain of thought (evaluation.md §5-6) -----------------------------------------------------------------

from lmforge.infer.prompting import (ANSWER_TRIGGER, COT_FORMAT, DIRECT_FORMAT, extract_answer, majority_vote,
                                     zero_shot_cot, zero_shot_cot_answer_prompt, zero_shot_cot_prompt,
                                     zero_shot_prompt)

SUMS = [{"question": "Mina has 4 pears. A friend gives Mina 7 more. How many pears does Mina have now?",
         "reasoning": "4 + 7 = 11.", "answer": "11"},
        {"question": "Tor has 9 coins. Tor loses 2. How many coins does Tor have now?",
         "reasoning": "9 - 2 = 7.", "answer": "7"}]


def test_few_shot_cot_prompt_exact_string():
    query = {"question": "Ana has 3 figs. Ana buys 2 more. How many figs does Ana have now?"}
    assert few_shot_prompt(query, SUMS, COT_FORMAT) == (
        "Q: Mina has 4 pears. A friend gives Mina 7 more. How many pears does Mina have now?\n"
        "A: 4 + 7 = 11. The answer is 11.\n\n"
        "Q: Tor has 9 coins. Tor loses 2. How many coins does Tor have now?\n"
        "A: 9 - 2 = 7. The answer is 7.\n\n"
        "Q: Ana has 3 figs. Ana buys 2 more. How many figs does Ana have now?\nA:")
    assert few_shot_prompt(query, SUMS[:1], DIRECT_FORMAT).startswith(
        "Q: Mina has 4 pears. A friend gives Mina 7 more. How many pears does Mina have now?\nA: The answer is 11.\n\n")


def test_zero_shot_and_zero_shot_cot_prompts_exact_strings():
    q = "Tor has 9 coins. Tor loses 2. How many coins does Tor have now?"
    assert zero_shot_prompt(q) == f"Q: {q}\nA: The answer (arabic numerals) is"
    assert zero_shot_cot_prompt(q) == f"Q: {q}\nA: Let's think step by step."
    assert zero_shot_cot_answer_prompt(q, " 9 - 2 = 7.\n") == (
        f"Q: {q}\nA: Let's think step by step. 9 - 2 = 7.\nTherefore, the answer (arabic numerals) is")


@pytest.mark.parametrize("text,method,expected", [
    ("4 + 7 = 11. The answer is 11.", "after_phrase", "11"),
    ("The answer is 1,200 coins. Then 5 more.", "after_phrase", "1200"),
    ("2 * 5 = 10. 10 + 3 = 13.", "after_phrase", "13"),  # no phrase: the last number
    ("the answer is -4.", "after_phrase", "-4"),
    ("The answer is 3.0.", "after_phrase", "3"),
    ("No idea.", "after_phrase", None),
    (" 12. Then 4 + 4 = 8.", "first_number", "12"),
    (" 2,500 apples", "first_number", "2500"),
    (" not sure", "first_number", None),
])
def test_extract_answer(text, method, expected):
    assert extract_answer(text, method) == expected


def test_majority_vote():
    assert majority_vote(["3", "4", "4", None, "3", "4"]) == "4"
    assert majority_vote([None, "3", "4", "4", "3"]) == "3"  # a tie goes to the answer reached first
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    with pytest.raises(BadConfigError, match="extraction"):
        extract_answer("1", "last")


def test_zero_shot_cot_runs_both_stages_and_answers_from_the_second():
    q = SUMS[1]["question"]
    calls = []

    def generate(prompts):
        calls.append(prompts)
        if len(calls) == 1:
            return [" There were 99 coins once, then 9 - 2 = 7."]
        return [" 7. The 99 is a distraction."] if "99" in prompts[0] else [" 5."]

    [(reasoning, answer)] = zero_shot_cot([zero_shot_cot_prompt(q)], generate,
                                          lambda p, r: p + " " + r.strip() + "\n" + ANSWER_TRIGGER)
    assert len(calls) == 2
    assert calls[1] == [zero_shot_cot_answer_prompt(q, reasoning)]  # stage 2 saw stage 1's reasoning
    assert answer == "7"  # the first number of stage 2, not the reasoning's 99


def test_second_stage_ids_are_the_text_layout():
    from lmforge.evaluate.prompting import second_stage_prompt

    tok = train_tokenizer(["Q: A: Let's think step by step. Therefore, the answer (arabic numerals) is 9 - 2 = 7."] * 5,
                          vocab_size=300)
    q = SUMS[1]["question"]
    ids = second_stage_prompt(tok, tok.encode(zero_shot_cot_prompt(q), add_bos=True), " 9 - 2 = 7.")
    assert ids == tok.encode(zero_shot_cot_answer_prompt(q, " 9 - 2 = 7."), add_bos=True)
