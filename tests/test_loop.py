"""The one training loop: accumulation, schedule, a foreign loss, exact resume after SIGKILL, atomic
checkpoints under crashes, the NaN guard, and 2-process data parallelism."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_checkpoint
from lmforge.model import Transformer
from lmforge.train.loop import TrainConfig, latest_checkpoint, lr_at, train

from conftest import tiny_config

SCRIPT = Path(__file__).with_name("train_script.py")


def run_script(out, *args, check=True, env=None, launcher=None):
    cmd = [*(launcher or [sys.executable]), str(SCRIPT), str(out), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = Transformer(tiny_config(50))
    x = torch.randint(0, 50, (8, 17))

    def grads(chunks):
        model.zero_grad()
        for chunk in x.chunk(chunks):
            loss = F.cross_entropy(model(chunk[:, :-1]).reshape(-1, 50), chunk[:, 1:].reshape(-1))
            (loss / chunks).backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(1), grads(4)):  # batch 8 in one step vs 2 x 4 micro-steps
        assert (a - b).abs().max().item() <= 1e-6


def test_accumulation_inside_the_loop_matches(tmp_path):
    run_script(tmp_path / "one", "--steps", 4, "--batch-size", 8)
    run_script(tmp_path / "acc", "--steps", 4, "--batch-size", 8, "--micro-batch-size", 2)
    for a, b in zip(losses(tmp_path / "one"), losses(tmp_path / "acc")):
        assert abs(a - b) <= 1e-5


def test_lr_schedule_values():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_a_loss_function_from_a_test_trains_through_the_loop(tmp_path):
    """Not next-token prediction: make the model's mean logit of token 3 at every position large."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(30))
    x = torch.randint(0, 30, (4, 8))

    def push_token_three(m, batch):
        logits = m(batch)
        loss = -F.log_softmax(logits, dim=-1)[..., 3].mean()
        return loss, {"p3": logits.softmax(-1)[..., 3].mean().item()}

    cfg = TrainConfig(steps=30, batch_size=4, lr=1e-2, warmup_steps=2, progress=False, log_every=1)
    last = train(model, lambda step: [x], push_token_three, cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"] * 0.2
    assert last["p3"] > 0.5


def test_sigkill_then_resume_gives_bitwise_identical_losses(tmp_path):
    run_script(tmp_path / "straight", "--steps", 16, "--save-every", 4)
    killed = run_script(tmp_path / "killed", "--steps", 16, "--save-every", 4, "--kill-at-step", 10, check=False)
    assert killed.returncode == -9
    assert latest_checkpoint(tmp_path / "killed").name == "step_000008"
    run_script(tmp_path / "killed", "--steps", 16, "--save-every", 4)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")  # bitwise: same floats
    a, _, _ = load_checkpoint(tmp_path / "straight" / "final")
    b, _, _ = load_checkpoint(tmp_path / "killed" / "final")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("crash_in,call", [
    ("save_file", 2),     # while writing the weights of the second checkpoint
    ("torch.save", 2),    # while writing its trainer state
    ("_write_json", 6),   # while writing its config / lmforge.json
    ("_fsync_tree", 2),   # everything written, nothing renamed yet
    ("os.replace", 6),    # at its rename into place (2 tokenizer files, then the directory)
])
def test_sigkill_during_a_checkpoint_write_leaves_the_last_complete_one(tmp_path, crash_in, call):
    out = tmp_path / "run"
    crashed = run_script(out, "--steps", 12, "--save-every", 4, "--crash-in", crash_in, "--crash-call", call,
                         check=False)
    assert crashed.returncode == -9
    for directory in (out / "checkpoints").glob("step_*"):  # whatever is in place must load
        load_checkpoint(directory)
    assert latest_checkpoint(out) is not None
    run_script(out, "--steps", 12, "--save-every", 4)
    run_script(tmp_path / "straight", "--steps", 12, "--save-every", 4)
    assert losses(out) == losses(tmp_path / "straight")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = run_script(out, "--steps", 12, "--save-every", 4, "--nan-at-step", 6, check=False)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "step 7" in last_line and "not finite" in last_line
    good = latest_checkpoint(out)
    assert good.name == "step_000004"
    model, _, _ = load_checkpoint(good)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (out / "final").exists()


def test_nan_error_through_the_cli_is_one_line(tmp_path):
    """The CLI turns NonFiniteError (a UserError) into one line and exit status 2."""
    from lmforge.train.loop import NonFiniteError
    from lmforge.errors import UserError

    assert issubclass(NonFiniteError, UserError)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_process_torchrun_matches_one_process(tmp_path):
    env = {"OMP_NUM_THREADS": "1"}
    run_script(tmp_path / "one", "--steps", 10, "--batch-size", 8, "--dump-grads", tmp_path / "g1.pt", env=env)
    run_script(tmp_path / "two", "--steps", 10, "--batch-size", 8, "--dump-grads", tmp_path / "g2.pt", env=env,
               launcher=["torchrun", "--standalone", "--nproc_per_node", "2"])
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    assert max((a - b).abs().max().item() for a, b in zip(g1, g2)) <= 1e-6
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 10
    assert max(abs(a - b) for a, b in zip(l1, l2)) <= 1e-5
    assert math.isfinite(l2[-1])
