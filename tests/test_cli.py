"""Bad input through the real command: one line naming the place, a non-zero exit, no traceback, and no
half-written output."""

import json
import shutil
import subprocess
import sys

import pytest

from lmforge.cli import main


def lmforge(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("train")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def test_help_lists_commands():
    result = lmforge("--help")
    assert result.returncode == 0 and "pretrain" in result.stdout and "eval perplexity" in result.stdout
    assert lmforge("pretrain", "--help").returncode == 0


def test_unknown_command_exits_non_zero(capsys):
    assert main(["frobnicate"]) == 2


def test_unknown_preset():
    assert_one_line_error(lmforge("info", "--preset", "gpt5"), "unknown preset 'gpt5'")


@pytest.fixture
def good_jsonl(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i} about cats and dogs."}) + "\n" for i in range(50)))
    return path


@pytest.mark.parametrize("case", ["not_json", "no_field", "empty", "missing", "negative_weight"])
def test_pretrain_bad_data(tmp_path, good_jsonl, case):
    bad = tmp_path / "bad.jsonl"
    args = ["--data", bad]
    if case == "not_json":
        bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{this is not json}\n')
        needles = [bad, ":3"]
    elif case == "no_field":
        bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
        needles = [bad, ":2", "text"]
    elif case == "empty":
        bad.write_text("")
        needles = [bad, "empty"]
    elif case == "missing":
        needles = [bad, "no such file"]
    else:
        args = ["--data", good_jsonl, good_jsonl.with_name("other.jsonl"), "--weights", "1", "-0.5"]
        shutil.copy(good_jsonl, good_jsonl.with_name("other.jsonl"))
        needles = ["weight"]
    out = tmp_path / "out"
    result = lmforge("pretrain", *args, "--out", out, "--preset", "nano", "--train.steps", "2")
    assert_one_line_error(result, *needles)
    assert not out.exists()


def test_damaged_checkpoint_and_mismatched_tokenizer(trained_checkpoint, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world")
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_checkpoint, damaged)
    (damaged / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(lmforge("eval", "perplexity", "--model", damaged, "--data", text), damaged / "model.safetensors")
    (damaged / "model.safetensors").unlink()
    assert_one_line_error(lmforge("eval", "perplexity", "--model", damaged, "--data", text), "missing")
    assert_one_line_error(lmforge("eval", "perplexity", "--model", tmp_path / "nope", "--data", text), "nope")

    from lmforge.tokenizer import train_tokenizer

    swapped = tmp_path / "swapped"
    shutil.copytree(trained_checkpoint, swapped)
    train_tokenizer(["zebras and 42 giraffes"] * 30, vocab_size=300).hf.save(str(swapped / "tokenizer.json"))
    assert_one_line_error(lmforge("eval", "perplexity", "--model", swapped, "--data", text), "tokenizer.json")


def test_a_group_word_lists_its_commands(capsys):
    assert main(["experiment", "--help"]) == 0
    out = capsys.readouterr().out
    assert "experiment scaling" in out and "experiment reward-hacking" in out and "pretrain" not in out
    assert main(["eval"]) == 0 and "eval tasks" in capsys.readouterr().out
    assert main(["experiment", "bogus"]) == 2 and "experiment lima" in capsys.readouterr().err
