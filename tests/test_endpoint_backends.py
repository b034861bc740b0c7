"""The harness and the judge against a running `lmforge serve` through the OpenAI-compatible endpoint backend:
the same greedy answers, metrics and verdicts as the local model, and clear errors where the backend cannot go."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import tiny_config, train_a_little
from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.cli import main
from lmforge.evaluate.judge import judge_pairs, load_judge, model_reply_fn
from lmforge.model import Transformer

KEY = "sk-backend"


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(1)
    # a long context, so neither side has to cut a prompt (the server refuses what the engine would cut)
    model = train_a_little(Transformer(tiny_config(tokenizer.vocab_size, max_seq_len=2048)), tokenizer)
    directory = tmp_path_factory.mktemp("backend") / "judge"
    save_checkpoint(directory, model, tokenizer, lineage={"stage": "sft"})
    return directory


@pytest.fixture(scope="module")
def endpoint(checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", str(checkpoint), "--port", str(port),
         "--api-key", KEY, "--no-access-log"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield f"openai:{url}/v1/judge"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_harness_gives_the_same_answers_and_metrics_through_the_server(checkpoint, endpoint, tmp_path):
    common = ["--tasks", "world_closed_book_qa", "--limit", "6", "--max-gen-tokens", "12", "--no-progress"]
    assert main(["eval", "tasks", "--model", str(checkpoint), "--out", str(tmp_path / "local"), *common]) == 0
    assert main(["eval", "tasks", "--model", endpoint, "--api-key", KEY, "--out", str(tmp_path / "remote"),
                 *common]) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    remote = json.loads((tmp_path / "remote" / "results.json").read_text())
    assert local["chat_template"] and remote["chat_template"]
    assert remote["results"] == local["results"]
    read = lambda d: [json.loads(line)["responses"]
                      for line in (tmp_path / d / "samples_world_closed_book_qa.jsonl").read_text().splitlines()]
    assert read("remote") == read("local") and len(read("local")) == 6


def test_the_harness_refuses_loglikelihood_tasks_on_an_endpoint(endpoint, capsys):
    code = main(["eval", "tasks", "--model", endpoint, "--tasks", "wikitext2", "--no-progress"])
    assert code == 2 and "endpoint runs generation tasks only" in capsys.readouterr().err


def test_the_judge_gives_the_same_verdicts_through_the_server(checkpoint, endpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    questions = ["Where does Mina live?", "What is 2 + 3?", "Name a fruit."]
    a, b = ["Velmora.", "5", "Apple."], ["The cat sat.", "I do not know.", "Soup."]
    local = judge_pairs(model_reply_fn(model.eval(), tokenizer, max_new_tokens=12), questions, a, b)
    remote = judge_pairs(load_judge(endpoint, max_new_tokens=12, api_key=KEY), questions, a, b)
    assert [(r["reply_ab"], r["reply_ba"]) for r in remote] == [(r["reply_ab"], r["reply_ba"]) for r in local]


def test_the_judge_command_through_the_server_and_a_wrong_key(endpoint, tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "output": f"answer {i}"} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({**r, "output": "no"}) + "\n" for r in rows))
    args = ["judge", "--model", endpoint, "--a", str(tmp_path / "a.jsonl"), "--b", str(tmp_path / "b.jsonl"),
            "--out", str(tmp_path / "j.json"), "--max-new-tokens", "8"]
    assert main([*args, "--api-key", KEY]) == 0
    assert len(json.loads((tmp_path / "j.json").read_text())["judgments"]) == 3
    (tmp_path / "j.json").unlink()
    assert main([*args, "--api-key", "wrong"]) == 2
    assert "401" in capsys.readouterr().err and not (tmp_path / "j.json").exists()
