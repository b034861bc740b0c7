"""PPO: the pieces against hand computation, a toy reward that rises with and without the KL leash, both
models changing after an update, and the command's bad inputs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import tiny_config, train_a_little
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main
from lmforge.model import RewardModel, Transformer
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loop import TrainConfig
from lmforge.train.ppo import (PPOConfig, PolicyAndValue, adapt_kl_coef, clipped_policy_loss, clipped_value_loss,
                               gae, kl_per_token, ppo_loss, ppo_train, rollout, whiten)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    u = ref - logp  # [-0.5, 1.0]
    assert torch.allclose(kl_per_token(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    assert torch.allclose(kl_per_token(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    assert torch.allclose(kl_per_token(logp, ref, "k3"), torch.exp(u) - 1 - u)
    assert (kl_per_token(logp, ref, "k3") >= 0).all()


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0, by hand: deltas from the end, V past the end = 0
    d2 = 1.0 + 0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.1
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # row 1 ends after two tokens: the padded value 9.0 must not leak in
    b1 = 2.0 + 0 - 0.5
    b0 = 0.5 + gamma * 0.5 - 0.4 + gamma * lam * b1
    expected = torch.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, (expected + values * mask) * mask, atol=1e-6)


def test_whitening_over_the_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = whiten(x, mask)
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert torch.allclose(out[mask.bool()], (kept - 3.0) / math.sqrt(2.0 + 1e-8), atol=1e-6)
    assert out[0, 2] == 0


def test_clipped_losses_by_hand():
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac = clipped_policy_loss(logp, logp_old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: max(-2.2, -2.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert clipfrac.item() == pytest.approx(2 / 3)

    values_old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    vloss, vclip = clipped_value_loss(values, values_old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-1)^2, (0.2-1)^2) = 0.64 (clipped); token 1: max(0.81, 0.81)
    assert vloss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)
    assert vclip.item() == pytest.approx(0.5)


def test_adaptive_kl_controller():
    assert adapt_kl_coef(0.2, 12.0, 6.0, 100, 10000) == pytest.approx(0.2 * (1 + 0.2 * 0.01))  # error clipped at 0.2
    assert adapt_kl_coef(0.2, 6.3, 6.0, 100, 10000) == pytest.approx(0.2 * (1 + 0.05 * 0.01))
    assert adapt_kl_coef(0.2, 0.0, 6.0, 100, 10000) < 0.2


# --- a toy reward: how often the policy says one of a set of chosen tokens ---------------------------------------------

@pytest.fixture(scope="module")
def toy(tokenizer):
    torch.manual_seed(0)
    policy = train_a_little(Transformer(tiny_config(tokenizer.vocab_size)), tokenizer)
    target = set(range(0, tokenizer.vocab_size, 10))  # one token in ten: a reward the barely trained model meets
    prompts = [tokenizer.render_prompt([{"role": "user", "content": text}])
               for text in ("Hi", "Tell me", "Mina", "cat", "apples", "Velmora", "dog", "soup")]
    return policy, target, prompts


def _toy_reward(target):
    # the share of chosen tokens, in [0, 1]: on the scale of rewards the KL penalty is meant to balance
    return lambda prompts, responses: [sum(t in target for t in r) / max(len(r), 1) for r in responses]


def _toy_config(tmp_path, kl_coef, name):
    return PPOConfig(out=str(tmp_path / name), iterations=12, rollouts=16, epochs=2, max_new_tokens=12,
                     kl_coef=kl_coef, missing_eos_penalty=0.0,
                     train=TrainConfig(steps=0, batch_size=8, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0,
                                       weight_decay=0.0, eval_every=10**9, seed=0, progress=False))


def test_a_toy_reward_rises_and_the_kl_leash_holds_the_policy_near_the_reference(toy, tokenizer, tmp_path):
    policy, target, prompts = toy
    runs = {}
    for kl_coef in (0.0, 0.1):
        runs[kl_coef] = ppo_train(copy.deepcopy(policy), tokenizer, prompts, _toy_reward(target),
                                  _toy_config(tmp_path, kl_coef, f"kl{kl_coef}"))
    free, leashed = runs[0.0], runs[0.1]
    first = sum(r["score"] for r in free[:3]) / 3
    last = sum(r["score"] for r in free[-3:]) / 3
    assert last > first + 0.2, [r["score"] for r in free]
    assert leashed[-1]["kl"] < 0.5 * free[-1]["kl"], ([r["kl"] for r in leashed], [r["kl"] for r in free])
    rows = [json.loads(line) for line in (tmp_path / "kl0.0" / "iterations.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"score", "kl", "entropy", "length", "eos_rate", "beta", "clipfrac", "value_loss",
                                "policy_loss", "approxkl"} <= set(rows[0])


def test_one_update_changes_the_policy_and_the_value_head_and_starts_at_ratio_one(toy, tokenizer, tmp_path):
    policy, target, prompts = toy
    cfg = _toy_config(tmp_path, 0.05, "one")
    model = PolicyAndValue(copy.deepcopy(policy), RewardModel(copy.deepcopy(policy)))
    reference = copy.deepcopy(policy)
    batch, stats, texts = rollout(model, reference, tokenizer, prompts, _toy_reward(target), cfg, beta=0.05, seed=0)
    assert len(texts) == len(prompts) and stats["kl"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    model.train()
    loss, metrics = ppo_loss(model, batch, clip=0.2, value_clip=0.2, value_coef=0.1, temperature=1.0)
    assert metrics["ratio"] == pytest.approx(1.0, abs=1e-5) and metrics["clipfrac"] == 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("policy.") for k in changed) and "value.score.weight" in changed
    assert any(k.startswith("value.body.") for k in changed)


# --- the command ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ppo_cli")
    torch.manual_seed(0)
    policy = train_a_little(Transformer(tiny_config(tokenizer.vocab_size)), tokenizer)
    save_checkpoint(directory / "sft", policy, tokenizer)
    save_checkpoint(directory / "rm", RewardModel(copy.deepcopy(policy)), tokenizer)
    other = train_tokenizer(["a completely different corpus of words"] * 30, vocab_size=300)
    save_checkpoint(directory / "rm_other", RewardModel(Transformer(tiny_config(other.vocab_size))), other)
    (directory / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ("Hi", "cat", "dog", "Mina")))
    (directory / "long.jsonl").write_text(json.dumps({"prompt": "word " * 200}) + "\n")
    return directory


def test_the_command_trains_and_saves_a_policy(checkpoints, tmp_path):
    from lmforge.checkpoint import load_checkpoint

    out = tmp_path / "ppo"
    assert main(["ppo", "--model", str(checkpoints / "sft"), "--reward-model", str(checkpoints / "rm"),
                 "--prompts", str(checkpoints / "prompts.jsonl"), "--out", str(out), "--iterations", "2",
                 "--rollouts", "8", "--epochs", "1", "--max-new-tokens", "8", "--train.batch-size", "4",
                 "--train.no-progress"]) == 0
    model, _, record = load_checkpoint(out / "final")
    assert record["lineage"]["stage"] == "ppo"
    assert len((out / "iterations.jsonl").read_text().splitlines()) == 2


def test_a_reward_model_with_another_tokenizer_is_a_clear_error(checkpoints, tmp_path, capsys):
    assert main(["ppo", "--model", str(checkpoints / "sft"), "--reward-model", str(checkpoints / "rm_other"),
                 "--prompts", str(checkpoints / "prompts.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "tokenizer differs" in capsys.readouterr().err


def test_prompts_with_no_usable_prompt_are_a_clear_error(checkpoints, tmp_path, capsys):
    assert main(["ppo", "--model", str(checkpoints / "sft"), "--reward-model", str(checkpoints / "rm"),
                 "--prompts", str(checkpoints / "long.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "no usable prompt" in capsys.readouterr().err


def test_a_causal_lm_given_as_the_reward_model_is_a_clear_error(checkpoints, tmp_path, capsys):
    assert main(["ppo", "--model", str(checkpoints / "sft"), "--reward-model", str(checkpoints / "sft"),
                 "--prompts", str(checkpoints / "prompts.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "reward model is needed" in capsys.readouterr().err


def test_lora_ppo_changes_only_the_adapted_projections(checkpoints, tmp_path):
    from lmforge.checkpoint import load_checkpoint

    out = tmp_path / "lora"
    assert main(["ppo", "--model", str(checkpoints / "sft"), "--reward-model", str(checkpoints / "rm"),
                 "--prompts", str(checkpoints / "prompts.jsonl"), "--out", str(out), "--iterations", "2",
                 "--rollouts", "8", "--epochs", "2", "--max-new-tokens", "8", "--train.batch-size", "4",
                 "--train.lr", "1e-2", "--lora", "--train.no-progress"]) == 0
    base, _, _ = load_checkpoint(checkpoints / "sft")
    tuned, _, _ = load_checkpoint(out / "final")
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], tuned_state[k])}
    assert changed and all(k.split(".")[-2].endswith("_proj") for k in changed), changed


@pytest.mark.skipif(__import__("shutil").which("torchrun") is None, reason="torchrun not on PATH")
def test_ppo_runs_under_torchrun_with_two_processes(checkpoints, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lmforge.checkpoint import load_checkpoint

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "lmforge", "ppo",
                           "--model", str(checkpoints / "sft"), "--reward-model", str(checkpoints / "rm"),
                           "--prompts", str(checkpoints / "prompts.jsonl"), "--out", str(out), "--iterations", "2",
                           "--rollouts", "8", "--epochs", "1", "--max-new-tokens", "8", "--train.batch-size", "4",
                           "--train.no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _, _, record = load_checkpoint(out / "final")
    assert record["lineage"]["stage"] == "ppo"
    assert len((out / "iterations.jsonl").read_text().splitlines()) == 2  # rank 0 alone writes the log
