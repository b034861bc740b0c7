"""Instruction data: every format parses to the same normalised conversations; bad input names file, line and field;
the SFT mask covers exactly the assistant content and its EOS; too-long examples are dropped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.instructions import Example, alpaca_prompt, load_sft_dataset, read_examples, tokenize_example
from lmforge.errors import BadConfigError, BadFileError
from lmforge.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok():
    texts = ["Hello there. How are you? I am fine, thank you.", "Name a colour. Red is a colour.",
             "질문과 답변. 안녕하세요!", "The capital of France is Paris."] * 20
    return train_tokenizer(texts, 400)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def user_assistant(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


# --- formats -----------------------------------------------------------------------------------------------

def test_alpaca_json_with_and_without_input(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello.", "meta": {"source": "x"}, "id": 7},
        {"instruction": "Say hi.", "output": "Hi."},  # no input at all
    ]))
    examples = read_examples(path)
    assert [e.messages for e in examples] == [
        user_assistant("Name a colour.", "Red."),
        user_assistant("Translate.\n\nBonjour", "Hello."),
        user_assistant("Say hi.", "Hi."),
    ]
    assert examples[0].meta == {} and examples[1].meta == {"source": "x", "id": 7}


def test_alpaca_jsonl_with_system(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q?", "input": "ctx", "output": "A.", "system": "Be brief."}])
    assert read_examples(path, format="alpaca")[0].messages == [
        {"role": "system", "content": "Be brief."}, *user_assistant("Q?\n\nctx", "A.")]


def test_alpaca_prompt_exact():
    assert alpaca_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert alpaca_prompt("Translate.", "Bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n")


def test_chat_multi_turn_with_system(tmp_path):
    messages = [{"role": "system", "content": "You are terse."}, *user_assistant("Hi", "Hello!"),
                *user_assistant("Bye", "Bye!")]
    path = write_jsonl(tmp_path / "chat", [{"messages": messages, "meta": {"lang": "en"}}])  # extension-less
    (example,) = read_examples(path)
    assert example == Example(messages=messages, meta={"lang": "en"})


def test_prompt_completion_strings_and_message_lists(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "2+2=", "completion": "4"},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hey"}]},
    ])
    assert [e.messages for e in read_examples(path)] == [user_assistant("2+2=", "4"), user_assistant("Hi", "Hey")]


def test_sharegpt(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}])
    assert read_examples(path)[0].messages == user_assistant("Hi", "Hello")


def test_column_mapping_csv(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('Q,A,label,sys\n안녕,"반가워요,\n친구",0,Be kind.\nWhat?,This.,1,\n', encoding="utf-8")
    examples = read_examples(path, columns={"instruction": "Q", "output": "A", "system": "sys"})
    assert examples[0].messages == [{"role": "system", "content": "Be kind."}, *user_assistant("안녕", "반가워요,\n친구")]
    assert examples[0].meta == {"label": "0"}
    assert examples[1].messages == user_assistant("What?", "This.")  # empty system cell: no system turn


def test_column_mapping_jsonl_and_bad_mappings(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "Q?", "answer": "A."}])
    assert read_examples(path, columns={"instruction": "question", "output": "answer"})[0].messages == \
        user_assistant("Q?", "A.")
    with pytest.raises(BadConfigError, match="instruction and output"):
        read_examples(path, columns={"instruction": "question"})
    with pytest.raises(BadConfigError, match="unknown"):
        read_examples(path, columns={"instruction": "question", "output": "answer", "reply": "x"})
    with pytest.raises(BadConfigError, match="format"):
        read_examples(path, format="vicuna")


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, pattern", [
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n{not json}\n', r"a\.jsonl:2: not valid JSON"),
    ("a.jsonl", '{"instruction": "x", "output": "y"}\n\n{"instruction": "x"}\n', r"a\.jsonl:3: no field 'output'"),
    ("a.jsonl", '{"instruction": "x", "output": "  "}\n', r"a\.jsonl:1: field 'output' is empty"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n'
                '{"text": "z"}\n', r"a\.jsonl:2: no field 'messages'"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}\n',
     r"a\.jsonl:1: messages\[1\] has unknown role 'bot'"),
    ("a.jsonl", '{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}\n',
     r"a\.jsonl:1: the last message of 'messages' is from the user"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}\n',
     r"a\.jsonl:1: messages\[1\] \(assistant\) has empty"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
                '{"role": "assistant", "content": "y"}]}\n', r"a\.jsonl:1: messages\[1\] is a system message"),
    ("a.jsonl", '{"foo": 1}\n', r"a\.jsonl:1: cannot tell the format"),
    ("a.jsonl", "\n\n", r"a\.jsonl: no examples"),
    ("a.json", '[{"instruction": "x", "output": "y"}, {"instruction": "x", "input": "z"}]',
     r"a\.json: record 1: no field 'output'"),
    ("a.json", '[{"instruction": "x",\n "output": }]', r"a\.json:2: not valid JSON"),
    ("a.json", "[]", r"a\.json: no examples"),
    ("a.csv", "", r"a\.csv: no examples"),
])
def test_bad_input_names_file_line_and_field(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BadFileError, match=pattern):
        read_examples(path)


def test_missing_mapped_column_is_named(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("Q,A\nhi,hello\nyo\n", encoding="utf-8")
    with pytest.raises(BadFileError, match=r"qa\.csv:2: no field 'Answer'"):
        read_examples(path, columns={"instruction": "Q", "output": "Answer"})
    with pytest.raises(BadFileError, match=r"qa\.csv:3: no field 'A'"):  # a short row: the cell is missing
        read_examples(path, columns={"instruction": "Q", "output": "A"})


def test_missing_file_and_missing_datasets_package(tmp_path):
    with pytest.raises(BadFileError, match="no such file"):
        read_examples(tmp_path / "nope.jsonl")
    hf_dir = tmp_path / "hf"  # looks like a `save_to_disk` directory
    hf_dir.mkdir()
    (hf_dir / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401  (optional; when installed there is nothing to check here)
    except ImportError:
        with pytest.raises(BadConfigError, match="pip install datasets"):
            read_examples(hf_dir)


# --- tokenizing --------------------------------------------------------------------------------------------

def test_tokenize_example_masks_exactly_assistant_content_and_eos(tok):
    example = Example(messages=[{"role": "system", "content": "Be brief."}, *user_assistant("Hello there", "I am fine"),
                                *user_assistant("Name a colour", "Red")])
    ids, loss_mask = tokenize_example(example, tok, max_len=1000)
    assert len(ids) == len(loss_mask)
    trained = [i for i, m in zip(ids, loss_mask) if m]
    assert trained == tok.encode("I am fine") + [tok.eos_id] + tok.encode("Red") + [tok.eos_id]
    assert tokenize_example(example, tok, max_len=len(ids)) is not None
    assert tokenize_example(example, tok, max_len=len(ids) - 1) is None


def test_load_sft_dataset_drops_too_long_and_counts(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"},
                                              {"instruction": "Hi", "output": "Hello there. " * 20}])
    short = len(tok.render(user_assistant("Hi", "Hello"))[0])
    rows, stats = load_sft_dataset(path, tok, max_len=short)
    assert rows == [tok.render(user_assistant("Hi", "Hello"))]
    assert stats["read"] == 2 and stats["kept"] == 1 and stats["dropped_too_long"] == 1
    assert stats["longest"] > short and stats["trained_tokens"] == sum(rows[0][1])
    with pytest.raises(BadFileError, match=rf"a\.jsonl: all 2 examples are longer than the context of {short - 1}"
                                           rf" tokens \(the longest has {stats['longest']}\)"):
        load_sft_dataset(path, tok, max_len=short - 1)


# --- real data ---------------------------------------------------------------------------------------------

def real(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path


def test_real_alpaca_demo():
    examples = read_examples(real("instruction/llamafactory/alpaca_en_demo.json"))
    assert len(examples) > 100
    assert all([m["role"] for m in e.messages] == ["user", "assistant"] for e in examples)
    assert all(m["content"].strip() for e in examples for m in e.messages)


def test_real_korean_chatbot_csv():
    examples = read_examples(real("instruction/korean_chatbot/ChatbotData.csv"), columns={"instruction": "Q", "output": "A"})
    assert len(examples) > 1000
    assert examples[0].messages[0] == {"role": "user", "content": "12시 땡!"} and "label" in examples[0].meta
