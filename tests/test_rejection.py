"""Rejection sampling and best-of-n: winners are the reward model's argmax, rounds keep earlier winners."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_config, train_a_little
from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.cli import main
from lmforge.model import RewardModel, Transformer
from lmforge.tokenizer import train_tokenizer
from lmforge.train.rejection import best_of_n
from lmforge.train.sample_preferences import reward_scores

PROMPTS = ["Hi", "cat", "dog", "Mina", "soup", "apples"]


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("rejection")
    torch.manual_seed(0)
    policy = train_a_little(Transformer(tiny_config(tokenizer.vocab_size)), tokenizer)
    save_checkpoint(directory / "sft", policy, tokenizer)
    torch.manual_seed(1)
    reward_model = RewardModel(copy.deepcopy(policy))
    torch.nn.init.normal_(reward_model.score.weight, std=1.0)  # a random but decisive scorer
    save_checkpoint(directory / "rm", reward_model, tokenizer)
    other = train_tokenizer(["a completely different corpus of words"] * 30, vocab_size=300)
    save_checkpoint(directory / "rm_other", RewardModel(Transformer(tiny_config(other.vocab_size))), other)
    (directory / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return directory


def test_the_winner_is_the_reward_models_argmax_among_n(checkpoints):
    policy, tokenizer, _ = load_checkpoint(checkpoints / "sft")
    reward_model, _, _ = load_checkpoint(checkpoints / "rm", kind="reward_model")
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    picked = best_of_n(policy, tokenizer, reward_model, prompts, n=4, temperature=1.0, max_new_tokens=10, seed=0)
    rescored = reward_scores(reward_model, tokenizer, prompts, [p["responses"] for p in picked])
    for p, scores in zip(picked, rescored):
        assert len(p["responses"]) == 4 and p["scores"] == pytest.approx(scores, abs=1e-5)
        assert p["best_index"] == max(range(4), key=lambda i: scores[i])
        assert p["best"] == p["responses"][p["best_index"]]
    assert len({tuple(p["responses"]) for p in picked}) > 1


def test_every_round_trains_on_the_winners_of_all_rounds_so_far(checkpoints, tmp_path):
    out = tmp_path / "rs"
    assert main(["rejection-sampling", "--model", str(checkpoints / "sft"), "--reward-model", str(checkpoints / "rm"),
                 "--prompts", str(checkpoints / "prompts.jsonl"), "--n", "3", "--rounds", "2", "--max-new-tokens",
                 "8", "--out", str(out), "--train.steps", "3", "--train.batch-size", "4", "--no-progress"]) == 0
    first = (out / "round_1" / "winners.jsonl").read_text().splitlines()
    second = (out / "round_2" / "winners.jsonl").read_text().splitlines()
    assert len(first) == len(PROMPTS) and second[:len(first)] == first and len(second) == 2 * len(PROMPTS)
    assert {json.loads(line)["round"] for line in second} == {1, 2}
    _, _, record = load_checkpoint(out / "final")
    assert record["lineage"]["stage"] == "rejection_sampling" and record["lineage"]["round"] == 2
    assert len((out / "rounds.jsonl").read_text().splitlines()) == 2


def test_generate_best_of_n_returns_the_highest_reward(checkpoints, tmp_path):
    out = tmp_path / "best.jsonl"
    assert main(["generate", "--model", str(checkpoints / "sft"), "--prompts", str(checkpoints / "prompts.jsonl"),
                 "--chat", "--best-of", "4", "--reward-model", str(checkpoints / "rm"), "--max-new-tokens", "8",
                 "--temperature", "1.0", "--seed", "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == list(range(len(PROMPTS)))
    for r in rows:
        assert len(r["rewards"]) == 4 and r["reward"] == max(r["rewards"])
        assert r["text"] == r["candidates"][r["index"]]


def test_bad_inputs_are_clear_errors(checkpoints, tmp_path, capsys):
    base = ["generate", "--model", str(checkpoints / "sft"), "--prompt", "Hi", "--chat", "--max-new-tokens", "4"]
    assert main(base + ["--best-of", "4"]) == 2
    assert "--reward-model" in capsys.readouterr().err
    assert main(base + ["--best-of", "4", "--reward-model", str(checkpoints / "rm"), "--temperature", "0"]) == 2
    assert "sampling" in capsys.readouterr().err
    assert main(["rejection-sampling", "--model", str(checkpoints / "sft"), "--reward-model",
                 str(checkpoints / "rm_other"), "--prompts", str(checkpoints / "prompts.jsonl"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "tokenizer differs" in capsys.readouterr().err
