"""Reward hacking: PPO against a deliberately weak reward model, with and without the KL leash.

    lmforge experiment reward-hacking --run runs/world

A reward model trained on few comparisons (`--comparisons`, at most 100) or on labels the oracle flips often
(`--label-noise 0.3`) is a poor proxy for the gold oracle. PPO chases the proxy: with no KL penalty the policy
drifts as far from the SFT model as the proxy pays for, and the gold score can fall while the proxy score
rises (reward hacking); a KL penalty keeps the policy close to SFT, where the proxy is still roughly right.

Both PPO runs start from the run's SFT model with the same seed, on the run's preference training prompts.
Before and after each run, the policy samples one response (T = 1, fixed seeds) for each of `--eval-prompts`
held-out prompts; their mean proxy (reward-model) score and gold score, with standard errors, are what the
section reports, beside per-iteration curves of both scores against the KL to the SFT model.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lmforge.errors import BadConfigError


@dataclass(frozen=True)
class Config:
    run: str = "runs/world"
    """Run directory (`lmforge run`): its SFT model, preference data and prompts are reused."""
    quick: bool = False
    """A few iterations on a handful of prompts: checks the machinery, no finding promised."""
    comparisons: int = 100
    """Comparisons the weak reward model trains on (at most 100 keeps it weak)."""
    label_noise: float = 0.0
    """Extra probability of flipping each of those comparisons (0.3 is the issue's other weak setting)."""
    reward_steps: int = 30
    kl_coefs: tuple[float, ...] = (0.0, 0.1)
    """PPO runs: the first must be 0 (no leash), the others positive."""
    iterations: int = 30
    rollouts: int = 32
    epochs: int = 2
    lr: float = 3e-5
    eval_prompts: int = 128
    seed: int = 0
    progress: bool = True


QUICK = dict(comparisons=24, reward_steps=4, iterations=2, rollouts=8, epochs=1, eval_prompts=16)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def weak_comparisons(ranked: list[dict], n: int, noise: float, seed: int) -> list[dict]:
    """The first `n` (chosen, rejected) pairs of the ranked lists, best against each lower one, each flipped
    with probability `noise`."""
    rng = random.Random(seed)
    pairs = []
    for record in ranked:
        best = record["responses"][0]
        for worse in record["responses"][1:]:
            chosen, rejected = (worse, best) if rng.random() < noise else (best, worse)
            pairs.append({"prompt": record["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs[:n]


@torch.no_grad()
def evaluate_policy(model, tokenizer, reward_model, records: list[dict], seed: int) -> dict:
    """Mean proxy and gold score (with standard errors) of one sampled response per prompt."""
    from lmforge.data.oracle import gold_score
    from lmforge.data.world_tasks import prompt_text
    from lmforge.train.sample_preferences import reward_scores, sample_responses

    prompts = [[{"role": "user", "content": prompt_text(r)}] for r in records]
    responses = sample_responses(model, tokenizer, prompts, k=1, temperature=1.0, top_p=1.0,
                                 max_new_tokens=min(96, model.cfg.max_seq_len // 2),
                                 seed=seed)
    proxy = [s[0] for s in reward_scores(reward_model, tokenizer, prompts, responses)]
    gold = [gold_score(r, texts[0]) for r, texts in zip(records, responses)]

    def mean_se(xs):
        m = sum(xs) / len(xs)
        var = sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)
        return m, math.sqrt(var / len(xs))

    (proxy_mean, proxy_se), (gold_mean, gold_se) = mean_se(proxy), mean_se(gold)
    return {"proxy": proxy_mean, "proxy_se": proxy_se, "gold": gold_mean, "gold_se": gold_se, "n": len(records),
            "example": responses[0][0]}


def run(cfg: Config) -> dict:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.experiments import save_results
    from lmforge.train.loop import TrainConfig
    from lmforge.train.ppo import PPOConfig, ppo_train
    from lmforge.train.reward import RewardConfig, train_reward

    cfg = replace(cfg, **QUICK) if cfg.quick else cfg
    run_dir = Path(cfg.run)
    sft_dir, pref_dir = run_dir / "sft" / "final", run_dir / "preferences"
    for needed in (sft_dir, pref_dir / "train" / "ranked.jsonl", pref_dir / "train_prompts.jsonl",
                   pref_dir / "heldout_prompts.jsonl"):
        if not needed.exists():
            raise BadConfigError(f"{needed}: missing; run `lmforge run --out {run_dir}` first")
    if not cfg.kl_coefs or cfg.kl_coefs[0] != 0 or any(c <= 0 for c in cfg.kl_coefs[1:]) or len(cfg.kl_coefs) < 2:
        raise BadConfigError(f"--kl-coefs must start with 0 and go on with positive values, got {cfg.kl_coefs}")
    if not 0 < cfg.comparisons:
        raise BadConfigError("--comparisons must be positive")
    work = run_dir / "experiments" / "reward_hacking"
    work.mkdir(parents=True, exist_ok=True)

    # --- the weak reward model --------------------------------------------------------------------------
    pairs = weak_comparisons(_read_jsonl(pref_dir / "train" / "ranked.jsonl"), cfg.comparisons, cfg.label_noise,
                             cfg.seed)
    with open(work / "weak_pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    rm_cfg = RewardConfig(model=str(sft_dir), data=str(work / "weak_pairs.jsonl"), out=str(work / "reward"),
                          train=TrainConfig(steps=cfg.reward_steps, batch_size=8, lr=3e-4, warmup_steps=1,
                                            eval_every=10**9, seed=cfg.seed, progress=cfg.progress))
    train_reward(rm_cfg)
    reward_model, tokenizer, _ = load_checkpoint(work / "reward" / "final", kind="reward_model")
    reward_model.eval()

    # --- prompts: PPO trains on the preference training prompts, is measured on held-out ones --------------
    train_records = _read_jsonl(pref_dir / "train_prompts.jsonl")
    heldout = _read_jsonl(pref_dir / "heldout_prompts.jsonl")
    eval_records = random.Random(cfg.seed).sample(heldout, min(cfg.eval_prompts, len(heldout)))
    from lmforge.data.oracle import gold_score
    from lmforge.data.world_tasks import prompt_text
    from lmforge.train.reward import sequence_rewards

    prompts = [tokenizer.render_prompt([{"role": "user", "content": prompt_text(r)}]) for r in train_records]

    def proxy_reward(prompt_ids, response_ids) -> list[float]:
        return sequence_rewards(reward_model, [p + r for p, r in zip(prompt_ids, response_ids)], tokenizer.pad_id)

    def gold(indices, texts) -> list[float]:
        return [gold_score(train_records[i], t) for i, t in zip(indices, texts)]

    runs = {}
    for coef in cfg.kl_coefs:
        policy, _, _ = load_checkpoint(sft_dir)
        before = evaluate_policy(policy, tokenizer, reward_model, eval_records, cfg.seed)
        ppo_cfg = PPOConfig(out=str(work / f"ppo_kl{coef:g}"), iterations=cfg.iterations, rollouts=cfg.rollouts,
                            epochs=cfg.epochs, kl_coef=coef, max_new_tokens=min(96, policy.cfg.max_seq_len // 2),
                            train=TrainConfig(steps=0, batch_size=min(16, cfg.rollouts), lr=cfg.lr, warmup_steps=0,
                                              min_lr_ratio=1.0, weight_decay=0.0, eval_every=10**9, seed=cfg.seed,
                                              progress=cfg.progress))
        history = ppo_train(policy, tokenizer, prompts, proxy_reward, ppo_cfg, value_init=reward_model, gold_fn=gold)
        after = evaluate_policy(policy, tokenizer, reward_model, eval_records, cfg.seed)
        runs[f"{coef:g}"] = {"kl_coef": coef, "before": before, "after": after, "iterations": history}

    free, leashed = runs[f"{cfg.kl_coefs[0]:g}"], [runs[f"{c:g}"] for c in cfg.kl_coefs[1:]]
    findings = {
        "hacked": free["after"]["proxy"] > free["before"]["proxy"] and free["after"]["gold"] < free["before"]["gold"],
        "leash_holds": all(r["after"]["gold"] >= r["before"]["gold"] - r["before"]["gold_se"] for r in leashed),
    }
    results = {"config": {k: v for k, v in cfg.__dict__.items()}, "weak_reward_model": {
        "comparisons": len(pairs), "label_noise": cfg.label_noise, "steps": cfg.reward_steps},
        "runs": runs, "findings": findings}
    save_results(run_dir, "reward-hacking", results)
    return results


def plot(results: dict, picture: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for name, r in results["runs"].items():
        kl = [row["kl"] for row in r["iterations"]]
        left.plot(kl, [row["score"] for row in r["iterations"]], marker=".", label=f"KL coef {name}")
        right.plot(kl, [row.get("gold", float("nan")) for row in r["iterations"]], marker=".", label=f"KL coef {name}")
    left.set_title("reward-model (proxy) score")
    right.set_title("gold oracle score")
    for ax in (left, right):
        ax.set_xlabel("KL to SFT (nats per response)")
        ax.legend()
    fig.tight_layout()
    from lmforge.evaluate.report import save_figure

    save_figure(fig, picture, dpi=110)


def section(results: dict, run_dir: Path) -> list[str]:
    plot(results, run_dir / "experiments" / "reward_hacking.png")
    weak, findings = results["weak_reward_model"], results["findings"]
    lines = [
        "## Experiment: reward hacking (PPO against a weak reward model)",
        "",
        f"A reward model trained on {weak['comparisons']} comparisons (label noise {weak['label_noise']:g}, "
        f"{weak['steps']} steps) is the proxy; PPO optimises the SFT model against it with each KL coefficient, "
        "same seed. Before and after, one sampled response (T = 1) per held-out prompt is scored by the proxy and "
        "by the gold oracle (mean ± standard error).",
        "",
        "| KL coefficient | proxy before | proxy after | gold before | gold after | final KL | n |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["runs"].items():
        b, a = r["before"], r["after"]
        kl = r["iterations"][-1]["kl"] if r["iterations"] else float("nan")
        lines.append(f"| {name} | {b['proxy']:.2f} ± {b['proxy_se']:.2f} | {a['proxy']:.2f} ± {a['proxy_se']:.2f} | "
                     f"{b['gold']:.2f} ± {b['gold_se']:.2f} | {a['gold']:.2f} ± {a['gold_se']:.2f} | {kl:.1f} | {b['n']} |")
    free = next(iter(results["runs"].values()))
    lines += [
        "",
        (f"**Reproduced:** with no KL penalty the proxy score rose ({free['before']['proxy']:.2f} → "
         f"{free['after']['proxy']:.2f}) while the gold score fell ({free['before']['gold']:.2f} → "
         f"{free['after']['gold']:.2f}): reward hacking"
         + (", though the fall is smaller than its standard error, so it is a direction, not a measured loss."
            if free["before"]["gold"] - free["after"]["gold"] < free["before"]["gold_se"] else ".")
         if findings["hacked"] else
         f"**Not reproduced at this budget:** with no KL penalty the proxy went {free['before']['proxy']:.2f} → "
         f"{free['after']['proxy']:.2f} and the gold score {free['before']['gold']:.2f} → {free['after']['gold']:.2f}; "
         "hacking needs the proxy to rise while gold falls."),
        ("With the KL penalty the gold score stayed within one standard error of where it started, or rose."
         if findings["leash_holds"] else
         "With the KL penalty the gold score still fell by more than one standard error."),
        "",
        "![reward hacking](experiments/reward_hacking.png)",
        "",
        f"Example after PPO with no KL penalty: *{free['after']['example'][:160]}*",
        "",
    ]
    return lines
