"""`lmforge generate` and `lmforge chat` on a checkpoint from `lmforge run --quick` and on a local Hugging
Face directory; bad values give one line and a non-zero exit."""

import io
import json
import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.infer.generate import ChatConfig, run_chat
from lmforge.infer.sampling import SamplingParams

pytestmark = pytest.mark.slow


def lmforge(*args):
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_generate_prompt_file_with_logprobs(quick_run, tmp_path):
    model = quick_run / "pretrain" / "final"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The town of"}\n{"prompt": "Mina has 3 apples."}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                 "--temperature", "0.8", "--seed", "1", "--n", "2", "--logprobs", "--top-logprobs", "2",
                 "--max-new-tokens", "12"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt_index"], r["index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and len(r["logprobs"]) == len(r["token_ids"]) <= 12
        assert all(lp <= 0 for lp in r["logprobs"]) and len(r["top_logprobs"][0]) == 2


def test_generate_one_prompt_prints_text(quick_run):
    result = lmforge("generate", "--model", quick_run / "pretrain" / "final", "--prompt", "The town of",
                     "--temperature", "0", "--max-new-tokens", "8")
    assert result.returncode == 0 and result.stdout.strip()


def test_beam_search_from_the_cli(quick_run, tmp_path):
    out = tmp_path / "beams.jsonl"
    assert main(["generate", "--model", str(quick_run / "pretrain" / "final"), "--prompt", "The town of",
                 "--num-beams", "3", "--n", "2", "--temperature", "0", "--max-new-tokens", "8", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["score"] >= rows[1]["score"]


def test_generate_on_a_local_hugging_face_directory(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save(tmp_path / "gpt2")
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--model", str(tmp_path / "gpt2"), "--prompt", "hello", "--max-new-tokens", "5",
                 "--temperature", "0", "--ignore-eos", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_tokens"] == 5
    lines = iter(["hello there", "/quit"])
    printed = io.StringIO()
    messages = run_chat(ChatConfig(model=str(tmp_path / "gpt2"), sampling=SamplingParams(max_new_tokens=4)),
                        input_fn=lambda prompt: next(lines), output=printed)
    assert [m["role"] for m in messages] == ["user", "assistant"] and printed.getvalue().count("model> ") == 1


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-p", "0"], "top_p"),
    (["--max-new-tokens", "-3"], "max_new_tokens"),
    (["--prompt", "word " * 400], "context"),
])
def test_generate_bad_values(quick_run, flags, needle):
    args = ["generate", "--model", quick_run / "pretrain" / "final"]
    if "--prompt" not in flags:
        args += ["--prompt", "hi"]
    result = lmforge(*args, *flags)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_generate_unknown_checkpoint(tmp_path):
    result = lmforge("generate", "--model", tmp_path / "nope", "--prompt", "hi")
    assert result.returncode == 2 and "nope" in result.stderr and "Traceback" not in result.stderr


def test_chat_streams_keeps_history_and_obeys_commands(quick_run):
    lines = iter(["Hello", "/params temperature=0 max_new_tokens=5", "Again", "/reset", "Hi", "/quit"])
    out = io.StringIO()
    cfg = ChatConfig(model=str(quick_run / "pretrain" / "final"), system="Be brief.",
                     sampling=SamplingParams(max_new_tokens=8, temperature=0.7, seed=0))
    messages = run_chat(cfg, input_fn=lambda prompt: next(lines), output=out)
    text = out.getvalue()
    assert text.count("model> ") == 3 and "(conversation reset)" in text
    assert '"temperature": 0.0' in text and '"max_new_tokens": 5' in text
    # after /reset only the system message and the last exchange remain
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] and messages[1]["content"] == "Hi"
