"""`lmforge pretrain` end to end: SIGKILL in the middle then resume gives the same per-step losses as an
uninterrupted run; a diverging run stops with one line; a mixture trains."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.checkpoint import load_checkpoint

WORDS = "the cat dog bird sees eats finds likes a red blue small big fish apple town river".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "."}) + "\n")
    return path


def pretrain_cmd(corpus, out, *extra):
    return [sys.executable, "-m", "lmforge", "pretrain", "--data", str(corpus), "--out", str(out), "--preset", "nano",
            "--vocab-size", "300", "--seq-len", "32", "--train.batch-size", "8", "--train.steps", "24",
            "--train.save-every", "4", "--train.warmup-steps", "2", "--train.eval-every", "8", "--train.no-progress",
            *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_mid_run_then_resume_matches_uninterrupted(corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(pretrain_cmd(corpus, tmp_path / "straight"), check=True, env=env, capture_output=True, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(corpus, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once it is past its second checkpoint
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -9
    assert not (out / "final").exists()
    subprocess.run(pretrain_cmd(corpus, out), check=True, env=env, capture_output=True, timeout=300)

    assert losses(out) == losses(tmp_path / "straight")  # bitwise, step by step
    a, _, _ = load_checkpoint(tmp_path / "straight" / "final")
    b, _, _ = load_checkpoint(out / "final")
    assert all((p == q).all() for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_diverging_run_stops_with_one_line(corpus, tmp_path):
    out = tmp_path / "diverge"
    result = subprocess.run(pretrain_cmd(corpus, out, "--train.lr", "1e30", "--train.save-every", "1",
                                         "--train.grad-clip", "0"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("lmforge:")]
    assert len(lines) == 1 and "not finite" in lines[0] and "step" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (out / "final").exists()
    good = sorted((out / "checkpoints").glob("step_*"))
    assert good, "a checkpoint before the divergence is kept"
    load_checkpoint(good[-1])


def test_mixture_of_two_sources_trains(corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("a quite different kind of text, written as one plain document. " * 200)
    out = tmp_path / "mix"
    subprocess.run(pretrain_cmd(corpus, out, "--data", str(corpus), str(other), "--weights", "3", "1",
                                "--train.steps", "12"), check=True, capture_output=True, timeout=300)
    info = json.loads((out / "data" / "corpus.json").read_text())
    assert len(info["sources"]) == 2
    rows = losses(out)
    assert rows[-1] < rows[0]
