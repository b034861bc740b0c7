"""Judge bias: a judge model trained in the world, its position, length and self-preference biases measured
against the gold oracle before and after the corrections, and arena leaderboards of the run's checkpoints.

    lmforge experiment judge-bias --run runs/world

- **The judges.** The held-out preference prompts are split in two by a hash of their text. On the first half
  (and the preference training prompts), every pair of distinct candidate answers (the SFT model's K samples
  and each checkpoint's greedy answer) becomes a judge example: the compact pair prompt, in a random order,
  answered `[[A]]`, `[[B]]` or `[[C]]` as the gold oracle orders them. The *self judge* is the SFT model
  fine-tuned on these examples mixed with instruction data, so it still answers questions; the *other judge*
  is the pretrained model fine-tuned on the same examples, so it never wrote an answer of its own.
- **Measured on the second half**, which neither judge saw: each checkpoint's answers (RS, PPO, DPO, and the
  self judge's own) against the SFT model's, every pair judged in both orders.
  - position: consistency under the swap, and the win rate from the first order alone against both orders;
  - length: the judge's length coefficient against the gold labels' on the same pairs, the length-controlled
    win rate, and a verbosity probe (an SFT answer against itself with its first sentence repeated at the end);
  - self-preference: the self judge's win rate for its own answers minus the gold win rate, and the same
    figure from the other judge, which is the correction.
- **Arena.** Battles between the run's checkpoints on the second half's prompts (random pairs, random sides),
  voted once by simulated users who follow the oracle but err with probability `--vote-noise` (both answers
  wrong: "tie (bothbad)"), and once by the self judge (both orders; a flip is a tie). Bradley-Terry ratings
  with bootstrap intervals for each, and how far the judge's leaderboard agrees with the users'.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from itertools import combinations
from pathlib import Path

from lmforge.errors import BadConfigError


@dataclass(frozen=True)
class Config:
    run: str = "runs/world"
    """Run directory (`lmforge run`): its checkpoints, preference data and held-out prompts are reused."""
    quick: bool = False
    """A few judge steps on a handful of prompts: checks the machinery, no finding promised."""
    judge_steps: int = 300
    """Fine-tuning steps of each judge (batches of --batch-size examples)."""
    judge_lr: float = 3e-4
    batch_size: int = 16
    instruction_share: float = 0.25
    """Share of the self judge's examples that are instruction data (keeps it a generator)."""
    max_pairs_per_prompt: int = 12
    """Judge examples drawn per training prompt (from all pairs of distinct candidates)."""
    eval_prompts: int = 0
    """Held-out prompts the judges are measured on (0: the whole second half)."""
    battles_per_prompt: int = 6
    vote_noise: float = 0.1
    """Probability that a simulated arena user votes against the oracle on a decided battle."""
    bootstrap_rounds: int = 100
    seed: int = 0
    progress: bool = True


QUICK = dict(judge_steps=6, batch_size=8, max_pairs_per_prompt=3, eval_prompts=16, battles_per_prompt=3,
             bootstrap_rounds=20)
POLICIES = ("sft", "rs", "ppo", "dpo")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _user_text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def question_of(record: dict) -> str:
    """The user's request of a world task record, or of a ranked preference record (a chat prompt)."""
    from lmforge.data.world_tasks import prompt_text

    return prompt_text(record) if "instruction" in record else _user_text(record["prompt"])


def in_first_half(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 2 == 0


def policy_answers(run_dir: Path, records: list[dict], models: dict, tokenizer, answer_tokens: int) -> dict:
    """Greedy answers per checkpoint to each record: from the run's eval/answers.jsonl when it covers them,
    else generated now."""
    from lmforge.data.world_tasks import prompt_text
    from lmforge.evaluate.preferences import greedy_answers

    saved = run_dir / "eval" / "answers.jsonl"
    if saved.exists():
        by_prompt = {row["prompt"]: row for row in _read_jsonl(saved)}
        if all(prompt_text(r) in by_prompt for r in records):
            rows = [by_prompt[prompt_text(r)] for r in records]
            return {name: [row[name] for row in rows] for name in rows[0] if name != "prompt"}
    return {name: greedy_answers(model, tokenizer, records, answer_tokens) for name, model in models.items()}


# ---------------------------------------------------------------------------------------------------------
# Judge training data


def judge_examples(records: list[dict], candidates: list[list[str]], max_pairs: int, rng: random.Random) -> list[dict]:
    """Chat examples: the compact pair prompt for up to `max_pairs` pairs of distinct candidates per record,
    sides drawn at random, answered with the oracle's verdict."""
    from lmforge.data.oracle import gold_score
    from lmforge.evaluate.judge import compact_pair_prompt

    examples = []
    for record, answers in zip(records, candidates):
        distinct = list(dict.fromkeys(a for a in answers if a.strip()))
        gold = {a: gold_score(record, a) for a in distinct}
        pairs = list(combinations(distinct, 2))
        for a, b in rng.sample(pairs, min(max_pairs, len(pairs))):
            if rng.random() < 0.5:
                a, b = b, a
            verdict = "[[A]]" if gold[a] > gold[b] else "[[B]]" if gold[b] > gold[a] else "[[C]]"
            examples.append({"messages": [{"role": "user", "content": compact_pair_prompt(question_of(record), a, b)},
                                          {"role": "assistant", "content": verdict}]})
    return examples


def train_judge(start: Path, examples: list[dict], out: Path, cfg: Config) -> Path:
    from lmforge.train.loop import TrainConfig
    from lmforge.train.sft import SFTConfig, sft

    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "examples.jsonl", examples)
    sft(SFTConfig(model=str(start), data=str(out / "examples.jsonl"), out=str(out),
                  train=TrainConfig(steps=cfg.judge_steps, batch_size=cfg.batch_size, lr=cfg.judge_lr,
                                    warmup_steps=max(1, cfg.judge_steps // 20), weight_decay=0.0,
                                    eval_every=10**9, seed=cfg.seed, progress=cfg.progress)))
    return out / "final"


# ---------------------------------------------------------------------------------------------------------
# Measurements


def verbosity_probe(records: list[dict], answers: list[str]) -> list[tuple[int, str, str]]:
    """(index, answer, padded copy) for each open-ended answer of two sentences or more: the copy repeats the
    first sentence at the end, which adds length and no new fact."""
    probes = []
    for i, (record, answer) in enumerate(zip(records, answers)):
        sentences = [s.strip() for s in answer.split(". ") if s.strip()]
        if record["meta"]["cluster"] == "open_ended" and len(sentences) >= 2:
            probes.append((i, answer, f"{answer.rstrip()} {sentences[0].rstrip('.')}."))
    return probes


def agreement(rows: list[dict], gold: list[float]) -> dict:
    """How often the judge's both-order verdict equals the oracle's, over parsed pairs the oracle decides."""
    decided = [(r["outcome"], g) for r, g in zip(rows, gold) if r["parsed"] and g != 0.5]
    return {"agreement": sum(o == g for o, g in decided) / max(len(decided), 1), "n": len(decided)}


def compare_to_sft(reply_fn, records, answers: dict[str, list[str]], names, seed: int) -> dict:
    """Each named side against SFT, judged in both orders, over the prompts where the two answers differ."""
    from lmforge.data.oracle import gold_score
    from lmforge.data.world_tasks import prompt_text
    from lmforge.evaluate.judge import compact_pair_prompt, gold_outcome, judge_pairs, pairwise_summary

    results = {}
    for name in names:
        keep = [i for i, (a, b) in enumerate(zip(answers[name], answers["sft"])) if a.strip() != b.strip()]
        if not keep:
            results[name] = {"pairs": 0}
            continue
        questions = [prompt_text(records[i]) for i in keep]
        side, sft = [answers[name][i] for i in keep], [answers["sft"][i] for i in keep]
        rows = judge_pairs(reply_fn, questions, side, sft, compact_pair_prompt)
        gold = [gold_outcome(gold_score(records[i], a), gold_score(records[i], b))
                for i, a, b in zip(keep, side, sft)]
        summary = pairwise_summary(rows, [len(a) for a in side], [len(b) for b in sft], gold, seed)
        results[name] = {"pairs": len(keep), "summary": summary, "agreement": agreement(rows, gold),
                         "outcomes": [r["outcome"] for r in rows], "gold": gold,
                         "identical_to_sft": len(records) - len(keep)}
    return results


def judge_votes(reply_fn, records, answers, battles: list[dict]) -> tuple[list[dict], int]:
    """The same battles voted by a judge in both orders (a flip is a tie); unparseable votes are dropped and
    counted."""
    from lmforge.data.world_tasks import prompt_text
    from lmforge.evaluate.judge import compact_pair_prompt, judge_pairs

    rows = judge_pairs(reply_fn, [prompt_text(records[b["index"]]) for b in battles],
                       [answers[b["model_a"]][b["index"]] for b in battles],
                       [answers[b["model_b"]][b["index"]] for b in battles], compact_pair_prompt)
    voted = []
    for battle, row in zip(battles, rows):
        if row["parsed"]:
            winner = {1.0: "model_a", 0.0: "model_b", 0.5: "tie"}[row["outcome"]]
            voted.append({**battle, "winner": winner})
    return voted, len(battles) - len(voted)


def kendall_tau(order_a: list[str], order_b: list[str]) -> float:
    from scipy.stats import kendalltau

    names = [m for m in order_a if m in order_b]
    tau = kendalltau([order_a.index(m) for m in names], [order_b.index(m) for m in names]).statistic
    return float(tau)


# ---------------------------------------------------------------------------------------------------------
# The experiment


def run(cfg: Config) -> dict:
    from lmforge.checkpoint import load_checkpoint
    from lmforge.evaluate.arena import leaderboard
    from lmforge.evaluate.judge import (compact_pair_prompt, judge_pairs, model_reply_fn, pairwise_summary,
                                        self_preference)
    from lmforge.evaluate.preferences import oracle_battles
    from lmforge.experiments import save_results

    cfg = replace(cfg, **QUICK) if cfg.quick else cfg
    run_dir = Path(cfg.run)
    pref_dir = run_dir / "preferences"
    dirs = {"sft": run_dir / "sft" / "final", "rs": run_dir / "rejection" / "final",
            "ppo": run_dir / "ppo" / "final", "dpo": run_dir / "dpo" / "final"}
    needed = [*dirs.values(), run_dir / "pretrain" / "final", pref_dir / "heldout_prompts.jsonl",
              pref_dir / "heldout" / "ranked.jsonl", pref_dir / "train" / "ranked.jsonl",
              run_dir / "world" / "tasks" / "train.chat.jsonl"]
    for path in needed:
        if not path.exists():
            raise BadConfigError(f"{path}: missing; run `lmforge run --out {run_dir}` first")
    work = run_dir / "experiments" / "judge_bias"
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    models = {name: load_checkpoint(path)[0].eval() for name, path in dirs.items()}
    _, tokenizer, _ = load_checkpoint(dirs["sft"])
    answer_tokens = min(96, models["sft"].cfg.max_seq_len // 2)
    from lmforge.data.world_tasks import prompt_text

    heldout = _read_jsonl(pref_dir / "heldout_prompts.jsonl")
    answers_all = policy_answers(run_dir, heldout, models, tokenizer, answer_tokens)
    train_idx = [i for i, r in enumerate(heldout) if in_first_half(prompt_text(r))]
    eval_idx = [i for i, r in enumerate(heldout) if not in_first_half(prompt_text(r))]
    if cfg.eval_prompts:
        eval_idx = sorted(random.Random(cfg.seed).sample(eval_idx, min(cfg.eval_prompts, len(eval_idx))))
    seconds["answers"] = time.perf_counter() - t0

    # --- judge examples: candidates on the first half and on the preference training prompts --------------
    t0 = time.perf_counter()
    samples = {_user_text(r["prompt"]): r["responses"] for r in _read_jsonl(pref_dir / "heldout" / "ranked.jsonl")}
    train_records = [heldout[i] for i in train_idx]
    train_candidates = [samples.get(prompt_text(heldout[i]), []) + [answers_all[n][i] for n in answers_all]
                        for i in train_idx]
    pref_ranked = _read_jsonl(pref_dir / "train" / "ranked.jsonl")
    train_records += pref_ranked
    train_candidates += [r["responses"] for r in pref_ranked]
    examples = judge_examples(train_records, train_candidates, cfg.max_pairs_per_prompt, rng)
    instructions = _read_jsonl(run_dir / "world" / "tasks" / "train.chat.jsonl")
    n_instr = round(len(examples) * cfg.instruction_share / (1 - cfg.instruction_share))
    mixed = examples + rng.sample(instructions, min(n_instr, len(instructions)))
    rng.shuffle(mixed)
    self_dir = train_judge(dirs["sft"], mixed, work / "self_judge", cfg)
    other_dir = train_judge(run_dir / "pretrain" / "final", examples, work / "other_judge", cfg)
    seconds["train_judges"] = time.perf_counter() - t0

    # --- both judges on the second half ------------------------------------------------------------------
    t0 = time.perf_counter()
    self_model = load_checkpoint(self_dir)[0].eval()
    other_model = load_checkpoint(other_dir)[0].eval()
    self_judge, other_judge = (model_reply_fn(m, tokenizer, max_new_tokens=8) for m in (self_model, other_model))
    eval_records = [heldout[i] for i in eval_idx]
    from lmforge.evaluate.preferences import greedy_answers

    answers = {name: [values[i] for i in eval_idx] for name, values in answers_all.items()}
    answers["judge"] = greedy_answers(self_model, tokenizer, eval_records, answer_tokens)
    sides = [n for n in ("rs", "ppo", "dpo", "bon", "judge") if n in answers]
    judged = {"self": compare_to_sft(self_judge, eval_records, answers, sides, cfg.seed),
              "other": compare_to_sft(other_judge, eval_records, answers, sides, cfg.seed)}

    for name in judged:  # agreement with gold over every policy-vs-SFT pair the judge saw
        blocks = [b for b in judged[name].values() if b["pairs"]]
        judged[name]["_pooled"] = agreement([{"outcome": o, "parsed": o is not None} for b in blocks
                                             for o in b["outcomes"]], [g for b in blocks for g in b["gold"]])

    probes = verbosity_probe(eval_records, answers["sft"])
    verbosity = {}
    if probes:
        from lmforge.data.oracle import gold_score
        from lmforge.evaluate.judge import gold_outcome

        records_p = [eval_records[i] for i, _, _ in probes]
        plain, padded = [p for _, p, _ in probes], [p for _, _, p in probes]
        gold_pad = [gold_outcome(gold_score(r, p), gold_score(r, a)) for r, a, p in zip(records_p, plain, padded)]
        for name, fn in (("self", self_judge), ("other", other_judge)):
            rows = judge_pairs(fn, [prompt_text(r) for r in records_p], padded, plain, compact_pair_prompt)
            summary = pairwise_summary(rows, [len(p) for p in padded], [len(a) for a in plain], gold_pad, cfg.seed)
            parsed = [r for r in rows if r["parsed"]]
            verbosity[name] = {"pairs": len(rows), "prefers_padded": sum(r["outcome"] == 1.0 for r in parsed)
                               / max(len(parsed), 1), "summary": summary}
        verbosity["gold_prefers_padded"] = sum(g == 1.0 for g in gold_pad) / len(gold_pad)

    self_pref = {}
    if judged["self"]["judge"]["pairs"]:
        gold = judged["self"]["judge"]["gold"]
        self_pref = {"self_judge": self_preference(judged["self"]["judge"]["outcomes"], gold, cfg.seed),
                     "other_judge": self_preference(judged["other"]["judge"]["outcomes"], gold, cfg.seed),
                     "pairs": judged["self"]["judge"]["pairs"]}
    seconds["judging"] = time.perf_counter() - t0

    # --- arena: simulated users and the self judge vote on the same battles -------------------------------
    t0 = time.perf_counter()
    arena_models = [n for n in ("sft", "rs", "ppo", "dpo", "bon") if n in answers]
    battles = oracle_battles(eval_records, answers, arena_models, cfg.battles_per_prompt, cfg.vote_noise, rng)
    judge_battles, unparseable_votes = judge_votes(self_judge, eval_records, answers, battles)
    _write_jsonl(work / "battles_users.jsonl", battles)
    _write_jsonl(work / "battles_judge.jsonl", judge_battles)
    users_board = leaderboard(battles, rounds=cfg.bootstrap_rounds, seed=cfg.seed)
    judge_board = leaderboard(judge_battles, rounds=cfg.bootstrap_rounds, seed=cfg.seed) if judge_battles else []
    seconds["arena"] = time.perf_counter() - t0

    for name in judged:  # per-pair outcomes stay in the work folder, not in the report's JSON
        for side in sides:
            block = judged[name][side]
            if block.get("pairs"):
                _write_jsonl(work / f"{name}_judge_{side}_vs_sft.jsonl",
                             [{"outcome": o, "gold": g} for o, g in zip(block.pop("outcomes"), block.pop("gold"))])
    results = {
        "config": asdict(cfg),
        "judge_examples": len(examples), "instruction_examples": len(mixed) - len(examples),
        "eval_prompts": len(eval_idx), "truncated_prompts": {"self": self_judge.truncated,
                                                             "other": other_judge.truncated},
        "judged": judged, "verbosity": verbosity, "self_preference": self_pref,
        "arena": {"battles": len(battles), "judge_battles": len(judge_battles),
                  "unparseable_votes": unparseable_votes, "users": users_board, "judge": judge_board,
                  "kendall_tau": kendall_tau([r["model"] for r in users_board], [r["model"] for r in judge_board])
                  if judge_board else None},
        "seconds": seconds,
    }
    save_results(run_dir, "judge-bias", results)
    return results


# ---------------------------------------------------------------------------------------------------------
# Report section


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _wr(block: dict) -> str:
    low, high = block["interval"]
    return f"{100 * block['win_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def section(results: dict, run_dir: Path) -> list[str]:
    from lmforge.evaluate.arena import format_leaderboard

    judged, cfg = results["judged"], results["config"]
    lines = [
        "## Experiment: LLM-as-judge biases and arena ratings",
        "",
        f"Two judges fine-tuned for {cfg['judge_steps']} steps on {results['judge_examples']} oracle-labelled "
        "comparisons (compact pair prompt, random sides): the *self judge* from the SFT model (with "
        f"{results['instruction_examples']} instruction examples mixed in, so it still answers questions) and the "
        "*other judge* from the pretrained model. Both are measured on "
        f"{results['eval_prompts']} held-out prompts neither saw, each checkpoint's greedy answer against the SFT "
        "model's (pairs with identical answers left out), every pair judged in both orders.",
        "",
        "| judge | side vs SFT | pairs | unparseable | consistency | first slot both orders | first order only | "
        "both orders | length-controlled | gold | same verdict as gold* | length coef. judge / gold |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("self", "other"):
        for side, block in judged[name].items():
            if side.startswith("_") or not block.get("pairs"):
                continue
            s = block["summary"]
            lines.append(
                f"| {name} | {side} | {block['pairs']} | {s['position']['unparseable']} | "
                f"{_pct(s['position']['consistency'])} | {_pct(s['position']['first_slot_both_orders'])} | "
                f"{_wr(s['first_order_only'])} | {_wr(s['both_orders'])} | "
                f"{_pct(s['length_controlled']['lc_win_rate'])} | {_wr(s['gold'])} | "
                f"{_pct(block['agreement']['agreement'])} (n={block['agreement']['n']}) | "
                f"{s['length_controlled']['phi']:+.2f} / {s['gold_length_fit']['phi']:+.2f} |")
    lines += ["", "\\* over the pairs gold decides; a judge's tie (including every verdict that flips with the order) "
              "counts as a miss. Length coefficient: phi of the length-controlled fit (tanh of the standardised "
              "character-length difference), for the judge's verdicts and for the gold labels on the same pairs.",
              "", "### The three biases, before and after their corrections", ""]
    lines += ["| bias | judge | before correction | after correction | gold |", "|---|---|---|---|---|"]
    for name in ("self", "other"):
        blocks = [b for side, b in judged[name].items() if not side.startswith("_") and b.get("pairs")]
        if not blocks:
            continue
        err_first = sum(abs(b["summary"]["first_order_only"]["win_rate"] - b["summary"]["gold"]["win_rate"])
                        for b in blocks) / len(blocks)
        err_both = sum(abs(b["summary"]["both_orders"]["win_rate"] - b["summary"]["gold"]["win_rate"])
                       for b in blocks) / len(blocks)
        err_lc = sum(abs(b["summary"]["length_controlled"]["lc_win_rate"] - b["summary"]["gold"]["win_rate"])
                     for b in blocks) / len(blocks)
        lines.append(f"| position: mean abs. win-rate error vs gold | {name} | {100 * err_first:.1f} points "
                     f"(first order only) | {100 * err_both:.1f} points (both orders) | 0 |")
        lines.append(f"| length: mean abs. win-rate error vs gold | {name} | {100 * err_both:.1f} points "
                     f"(both orders) | {100 * err_lc:.1f} points (length-controlled) | 0 |")
        v = results["verbosity"].get(name)
        if v:
            lines.append(f"| verbosity probe: prefers the padded copy | {name} | {_pct(v['prefers_padded'])} of "
                         f"{v['pairs']} | — | {_pct(results['verbosity']['gold_prefers_padded'])} |")
    sp = results["self_preference"]
    if sp:
        s, o = sp["self_judge"], sp["other_judge"]
        lines.append(
            f"| self-preference: win rate for the self judge's own answers minus gold | self → other judge | "
            f"{100 * s['self_preference']:+.1f} points [{100 * s['interval'][0]:+.1f}, {100 * s['interval'][1]:+.1f}] "
            f"(n={s['n']}) | {100 * o['self_preference']:+.1f} points [{100 * o['interval'][0]:+.1f}, "
            f"{100 * o['interval'][1]:+.1f}] (n={o['n']}) | 0 |")
    tr = results["truncated_prompts"]
    lines += ["", f"Judge prompts cut to fit the context: {tr['self']} (self), {tr['other']} (other). "
              "The length-controlled win rate removes *all* of the length effect, including the part gold itself has "
              "(in the world, made-up details make answers longer and worse), so it is compared with the gold win rate "
              "rather than assumed right.", ""]
    arena = results["arena"]
    lines += ["### Arena: the run's checkpoints", "",
              f"{arena['battles']} battles on the held-out prompts, voted by simulated users (the oracle, wrong on "
              f"{100 * cfg['vote_noise']:.0f}% of decided battles). Bradley-Terry ratings (mean 1000) with "
              f"{cfg['bootstrap_rounds']}-round bootstrap 95% intervals:", ""]
    lines += format_leaderboard(arena["users"]).splitlines()
    if arena["judge"]:
        lines += ["", f"The same battles voted by the self judge ({arena['judge_battles']} parsed, "
                  f"{arena['unparseable_votes']} unparseable); Kendall's tau with the users' order: "
                  f"{arena['kendall_tau']:+.2f}.", ""]
        lines += format_leaderboard(arena["judge"]).splitlines()
    seconds = results["seconds"]
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".", ""]
    return lines
