import itertools
import json

import pytest

from lmforge.errors import BadConfigError
from lmforge.tokenizer import Tokenizer, train_tokenizer

from conftest import SHARED

EDGE_STRINGS = [
    "",
    "a",
    "Hello, world!",
    "안녕하세요, 세계! 한국어 문장입니다.",
    "🙂🚀👩‍👩‍👧 emoji with ZWJ",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # code\n",
    "   leading and trailing   ",
    "runs\n\n\n\nof\t\t\twhitespace     here",
    "numbers 0123456789 and 3.14159 and 1,000,000",
    "mixed English and 한국어 and 日本語 and Ελληνικά",
]


@pytest.mark.parametrize("text", EDGE_STRINGS)
def test_round_trip_edge_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_korean_petitions(tokenizer):
    path = SHARED / "data" / "pretrain" / "korean_petitions" / "petitions_2019-04"
    if not path.is_file():
        pytest.skip("../shared/data is absent")
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line)["content"] for line in itertools.islice(f, 200) if line.strip()]
    assert docs
    for doc in docs:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


def test_every_digit_is_its_own_token(tokenizer):
    ids = tokenizer.encode("year 2024 and 31415926535")
    pieces = [tokenizer.hf.id_to_token(i) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("2024") + list("31415926535")


def test_special_tokens(tokenizer):
    assert tokenizer.pad_id != tokenizer.eos_id
    assert len({tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, *tokenizer.role_ids.values()}) == 6
    assert tokenizer.decode([tokenizer.bos_id, *tokenizer.encode("hi"), tokenizer.eos_id]) == "hi"


def test_vocab_size_is_respected():
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 200, vocab_size=300)
    assert tok.vocab_size <= 300
    with pytest.raises(BadConfigError):
        train_tokenizer(["x"], vocab_size=100)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi 안녕"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_render_exact_ids_and_mask(tokenizer):
    t = tokenizer
    ids, mask = t.render(CONVERSATION)
    expected_ids, expected_mask = [t.bos_id], [0]
    for m in CONVERSATION:
        content = t.encode(m["content"])
        expected_ids += [t.role_ids[m["role"]], *content, t.eos_id]
        trained = 1 if m["role"] == "assistant" else 0
        expected_mask += [0] + [trained] * (len(content) + 1)
    assert ids == expected_ids and mask == expected_mask
    # What is trained is exactly the assistant contents, each followed by its EOS.
    trained_ids = [i for i, m in zip(ids, mask) if m]
    assert trained_ids == t.encode("Hello!") + [t.eos_id] + t.encode("4") + [t.eos_id]
    assert t.render_prompt(CONVERSATION[:2]) == t.render(CONVERSATION[:2])[0] + [t.role_ids["assistant"]]


def test_render_rejects_unknown_role(tokenizer):
    with pytest.raises(BadConfigError, match="role must be one of"):
        tokenizer.render([{"role": "wizard", "content": "hi"}])


def test_transformers_chat_template_gives_the_same_ids(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for conversation in (CONVERSATION, CONVERSATION[:2], CONVERSATION[1:3]):
        out = hf.apply_chat_template(conversation, tokenize=True)
        ids = out["input_ids"] if not isinstance(out, list) else out
        assert ids == tokenizer.render(conversation)[0]
    prompt = hf.apply_chat_template(CONVERSATION[:2], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if not isinstance(prompt, list) else prompt
    assert prompt == tokenizer.render_prompt(CONVERSATION[:2])
    assert hf.pad_token_id == tokenizer.pad_id != hf.eos_token_id


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.encode("안녕 hello 42") == tokenizer.encode("안녕 hello 42")
