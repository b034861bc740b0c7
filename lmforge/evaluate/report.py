"""The run report: `report.md` (and a picture of the loss curve beside it) in the run directory.

Each stage adds a section; a reader sees what was trained, how it learned and what it now does.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def save_figure(fig, picture: Path, **savefig) -> None:
    """Write a matplotlib figure atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    picture.parent.mkdir(parents=True, exist_ok=True)
    tmp = picture.with_suffix(".tmp.png")
    fig.savefig(tmp, **savefig)
    plt.close(fig)
    tmp.replace(picture)


def plot_loss_curve(metrics_path: Path, picture: Path) -> bool:
    """Training loss per step and validation loss where measured; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.is_file():
        return False
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, picture)
    return True


def plot_task_accuracy(tasks: dict, picture: Path) -> None:
    """Grouped bars: accuracy per cluster for each way of asking."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(tasks)
    clusters = [c for c in tasks[modes[0]] if not c.startswith("_")]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=110)
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ax.bar([j + i * width for j in range(len(clusters))], [tasks[mode][c]["accuracy"] for c in clusters],
               width, label=mode.replace("_", " "))
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(clusters))])
    ax.set_xticklabels([c.replace("_", " ") for c in clusters], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (world scorer)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, picture)


def task_section(out: Path, results: dict) -> list[str]:
    tasks = results["tasks"]
    plot_task_accuracy(tasks, out / "task_accuracy.png")
    plot_loss_curve(out / "sft" / "metrics.jsonl", out / "sft_loss.png")
    modes = list(tasks)
    lines = [
        "## Instruction tuning: accuracy per task cluster",
        "",
        "Test records (test-split entities, templates seen in training), judged by the world's scorer. The base "
        "model is asked in its corpus's dialogue layout (`User: {request}\\nAssistant:`), zero-shot and after 3 "
        "solved examples of the same cluster as earlier turns; the SFT model gets the request through its chat "
        "template. ± is the standard error, sqrt(p(1-p)/n); per-example answers are in `eval/samples_*.jsonl`.",
        "",
        "| cluster | " + " | ".join(m.replace("_", " ") for m in modes) + " | n |",
        "|---|" + "---:|" * (len(modes) + 1),
    ]
    for cluster in [c for c in tasks[modes[0]] if not c.startswith("_")] + ["_all"]:
        row = [f"{tasks[m][cluster]['accuracy']:.0%} ±{tasks[m][cluster].get('stderr', 0):.0%}" for m in modes]
        name = "**all**" if cluster == "_all" else cluster.replace("_", " ")
        lines.append(f"| {name} | " + " | ".join(row) + f" | {tasks[modes[0]][cluster]['n']} |")
    leaks = tasks["sft_zero_shot"]["_all"]["leaks"]
    lenient = ", ".join(f"{m.replace('_', ' ')} {tasks[m]['_all'].get('lenient_accuracy', 0):.0%}" for m in modes)
    lines += ["", f"Lenient accuracy (the expected answer appears in the response as a whole word): {lenient}.",
              "", f"Vault codes leaked by the SFT model on these prompts: {leaks}.", "",
              "![accuracy per cluster](task_accuracy.png)", "", "![SFT loss](sft_loss.png)", "",
              "One SFT answer per cluster (request → answer; expected):", ""]
    for cluster, (request, answer, expected) in tasks["sft_zero_shot"].get("_examples", {}).items():
        lines.append(f"- *{cluster}*: {request.splitlines()[0][:90]} → **{answer[:90]}** (expected: {expected[:60]})")
    return lines + [""]


def decoding_section(decoding: dict) -> list[str]:
    lines = [
        "## Decoding: quality against diversity",
        "",
        "The SFT model answers the same test requests (chat template, zero-shot) under each strategy, 4 samples "
        "per prompt. Accuracy: the world's scorer; perplexity: of the output under the model itself (lower is "
        "more typical text); distinct-n: unique word n-grams / all n-grams among one prompt's samples (0.25 when "
        "all 4 are the same).",
        "",
        "| strategy | accuracy | output perplexity | distinct-1 | distinct-2 | tokens per answer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in decoding.items():
        lines.append(f"| {name} | {row['accuracy']:.0%} | {row['perplexity']:.2f} | {row['distinct_1']:.2f} | "
                     f"{row['distinct_2']:.2f} | {row['mean_tokens']:.1f} |")
    return lines + [""]


def prompting_section(prompting: dict) -> list[str]:
    models = list(prompting)
    methods = list(prompting[models[0]])
    steps = list(prompting[models[0]][methods[0]]["by_steps"])
    lines = [
        "## Prompting: arithmetic word problems asked five ways",
        "",
        "Zero-shot (\"The answer (arabic numerals) is\"), few-shot with bare answers, few-shot chain of thought "
        "(worked exemplars), zero-shot CoT (\"Let's think step by step.\", then \"Therefore, the answer "
        "(arabic numerals) is\" in a second generation) and self-consistency (5 sampled CoT paths at T=0.7, "
        "majority vote). Base model in plain text; SFT model through its chat template, triggers prefilled in "
        "its turn. Accuracy by number of steps:",
        "",
        "| method | " + " | ".join(f"{m} {s}-step" for m in models for s in steps) + " | "
        + " | ".join(f"{m} all" for m in models) + " |",
        "|---|" + "---:|" * (len(models) * (len(steps) + 1)),
    ]
    for method in methods:
        cells = [f"{prompting[m][method]['by_steps'][s]:.0%}" for m in models for s in steps]
        cells += [f"**{prompting[m][method]['accuracy']:.0%}**" for m in models]
        lines.append(f"| {method.replace('_', ' ')} | " + " | ".join(cells) + " |")
    n = prompting[models[0]][methods[0]]["n"]
    lines += ["", f"{n} test problems. One base-model few-shot CoT answer: "
              f"`{prompting[models[0]]['few_shot_cot']['example'][1][:120]}`", ""]
    return lines


ALIGNED = {"bon": "best-of-n", "rs": "rejection sampling", "ppo": "PPO", "dpo": "DPO"}  # each against SFT


def plot_ppo_iterations(rows: list[dict], picture: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [r["iteration"] for r in rows]
    left.plot(steps, [r["score"] for r in rows], label="reward model")
    if all("gold" in r for r in rows):
        left.plot(steps, [r["gold"] for r in rows], label="gold oracle")
    left.set_xlabel("PPO iteration")
    left.set_ylabel("mean score of the rollouts")
    left.legend()
    right.plot(steps, [r["kl"] for r in rows], color="tab:red")
    right.set_xlabel("PPO iteration")
    right.set_ylabel("KL to SFT (nats per response)")
    fig.tight_layout()
    save_figure(fig, picture, dpi=110)


def preference_section(prefs: dict, out: Path | None = None) -> list[str]:
    rm = prefs["reward_model"]
    methods = {name: prefs[f"{name}_vs_sft"] for name in ALIGNED if f"{name}_vs_sft" in prefs}
    data = prefs.get("data", {}).get("train", {})
    kl, seconds = prefs.get("kl_to_sft", {}), prefs.get("seconds", {})
    lines = [
        "## Preference learning: reward model, best-of-n, rejection sampling, PPO and DPO, judged by the gold oracle",
        "",
        f"The SFT model sampled {data.get('k', '?')} responses for each of {data.get('prompts', '?')} training "
        f"prompts (open-ended descriptions and stories, forbidden requests); the oracle (true facts minus "
        f"invented ones, refusal, leak and length costs) ranked them with 10% of comparisons flipped, "
        f"{data.get('ranked', '?')} prompts had something to rank. The reward model trained on those rankings "
        "(all C(K,2) pairs of a prompt in one batch element). Best-of-n samples n answers from SFT at every request "
        "and returns the one the reward model prefers; rejection sampling fine-tunes SFT on such winners for the "
        "training prompts; PPO optimises SFT against the reward model with a KL penalty; DPO learns from the "
        "ranked pairs directly. The world's open-ended demonstrations often end with a made-up detail "
        "(\"People say ...\"), which SFT imitates and the oracle counts as an invented fact: what preference "
        "learning can fix and imitation cannot.",
        "",
        f"Reward model accuracy against the noise-free oracle on held-out prompts: **{rm['accuracy']:.1%}** "
        f"({rm['pairs']} comparisons from {rm['prompts']} prompts, gold ties excluded).",
        "",
        "Each method against SFT on held-out prompts, greedy (best-of-n: sampled at T = 1), win rate = (wins + "
        "ties/2) / n by the gold oracle with a 95% paired-bootstrap interval; first on the prompts SFT does not "
        "already get right, then on all. KL to SFT: nats per response, from one T = 1 sample per prompt "
        "(best-of-n: log n - (n-1)/n). Wall time: the method's training stage, or best-of-n's sampling of the "
        "held-out answers.",
        "",
        "| method | win rate, SFT wrong | win rate, all | gold score | KL to SFT | refusals | leak rate | "
        "invented facts / answer | words | wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first = next(iter(methods.values()), None)
    if first:
        b = first["b"]
        lines.append(f"| SFT | | | {b['gold_score']:.2f} | 0 | {b['refusal_rate']:.0%} | {b['leak_rate']:.1%} | "
                     f"{b['invented_per_answer']:.2f} | {b['words']:.1f} | |")
    for name, cmp in methods.items():
        a, wrong = cmp["a"], cmp.get("where_b_wrong") or {}
        w = (f"**{wrong['win_rate']:.1%}** [{wrong['interval'][0]:.1%}, {wrong['interval'][1]:.1%}] "
             f"(n {wrong['n']})") if wrong.get("n") else "-"
        k = kl.get(name, {})
        k_text = f"{k['kl']:.2f}" + (f" ± {k['stderr']:.2f}" if "stderr" in k else "") if k else "-"
        t = f"{seconds[name]:.0f} s" if name in seconds else "-"
        lines.append(f"| {ALIGNED[name]} | {w} | {cmp['win_rate']:.1%} [{cmp['interval'][0]:.1%}, "
                     f"{cmp['interval'][1]:.1%}] (n {cmp['n']}) | {a['gold_score']:.2f} | {k_text} | "
                     f"{a['refusal_rate']:.0%} | {a['leak_rate']:.1%} | {a['invented_per_answer']:.2f} | "
                     f"{a['words']:.1f} | {t} |")
    iterations = prefs.get("ppo_iterations") or []
    if iterations and out is not None:
        plot_ppo_iterations(iterations, out / "ppo_iterations.png")
        last = iterations[-1]
        lines += ["", f"PPO over {len(iterations)} iterations: reward-model score {iterations[0]['score']:.2f} → "
                  f"{last['score']:.2f}" + (f", gold score {iterations[0]['gold']:.2f} → {last['gold']:.2f}"
                                             if "gold" in last else "")
                  + f", KL to SFT {last['kl']:.2f} nats per response, response length {last['length']:.0f} tokens.",
                  "", "![PPO iterations](ppo_iterations.png)"]
    for r in prefs.get("rs_rounds") or []:
        lines += ["" if r["round"] == 1 else "",
                  f"Rejection sampling round {r['round']}: best-of-n reward {r['mean_best_score']:.2f} against a mean "
                  f"sample's {r['mean_sample_score']:.2f}; SFT on {r['winners']} winners so far."]
    arena = prefs.get("arena")
    if arena:
        from lmforge.evaluate.arena import format_leaderboard

        lines += ["", f"Arena: {arena['battles']} battles between the checkpoints on the held-out prompts (4 random "
                  f"pairs per prompt, random sides), voted by simulated users who follow the oracle but vote the other "
                  f"way on {arena['vote_noise']:.0%} of decided battles; both answers wrong is a \"both bad\" tie. "
                  "Bradley-Terry ratings (mean 1000) with 100-round bootstrap 95% intervals; models whose intervals "
                  "overlap share a rank (`lmforge arena rate eval/arena_battles.jsonl` recomputes it):", ""]
        lines += format_leaderboard(arena["leaderboard"]).splitlines()
    lines += ["", "Held-out answers (SFT → " + " / ".join(ALIGNED[n] for n in methods) + "):", ""]
    for ex in prefs.get("examples", [])[:4]:
        after = " / ".join(f"**{ex[n][:90]}**" for n in methods if n in ex)
        lines.append(f"- *{ex['prompt'].splitlines()[-1][:70]}*: {ex['sft'][:90]} → {after}")
    return lines + [""]


def checkpoints_section(checkpoints: dict, contamination: dict | None) -> list[str]:
    lines = ["## Every checkpoint of the run", "",
             "Held-out world text perplexity (lower: closer to the corpus) and accuracy over all task clusters "
             "(the table above; the pretrained model asked in its dialogue layout, the others through the chat "
             "template). Alignment trades a little language-model fit for following requests.", "",
             "| checkpoint | perplexity | bits per byte | task accuracy |", "|---|---:|---:|---:|"]
    for name, row in checkpoints.items():
        ppl = row["perplexity"]
        lines.append(f"| {name} | {ppl['perplexity']:.3f} | {ppl['bits_per_byte']:.3f} | {row['task_accuracy']:.0%} |")
    if contamination:
        lines += ["", "Contamination check (13-gram overlap of each test record, request and answer, with the "
                  "pretraining corpus). The world's test records share *templated* sentences with the corpus "
                  "(\"X is a town in Y\"), not test items: a flag here says how formulaic a cluster is.", "",
                  "| cluster | records | flagged | shorter than 13 words |", "|---|---:|---:|---:|"]
        for cluster, row in contamination.items():
            lines.append(f"| {cluster.replace('_', ' ')} | {row['n_items']} | {row['share']:.0%} | {row['n_too_short']} |")
    return lines + [""]


def write_report(out: Path, cfg, results: dict, timings: dict, record: dict) -> Path:
    has_curve = plot_loss_curve(out / "pretrain" / "metrics.jsonl", out / "pretrain_loss.png")
    ppl = results["perplexity"]
    model_cfg = record["configs"]["model"]
    lines = [
        "# lmforge run report",
        "",
        f"Run directory `{out}`; recipe in `config.toml`{' (quick mode: sizes for a smoke test, no quality promised)' if cfg.quick else ''}.",
        "",
        "## Pretraining",
        "",
        f"Preset `{cfg.preset}`: {model_cfg['n_layers']} layers, d_model {model_cfg['d_model']}, "
        f"{model_cfg['n_heads']} heads ({model_cfg['n_kv_heads']} key/value), vocabulary {model_cfg['vocab_size']}, "
        f"{cfg.pretrain_steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens.",
        "",
    ]
    if has_curve:
        lines += ["![pretraining loss](pretrain_loss.png)", ""]
    lines += [
        "## Perplexity on held-out world text",
        "",
        "PPL = exp(mean negative log-likelihood per token); each document scored on its own, every token once.",
        "",
        "| model | perplexity | bits per byte | word perplexity | tokens |",
        "|---|---:|---:|---:|---:|",
        f"| pretrained | {ppl['model']['perplexity']:.3f} | {ppl['model']['bits_per_byte']:.3f} | "
        f"{ppl['model']['word_perplexity']:.2f} | {ppl['model']['n_tokens']} |",
        f"| unigram (token frequencies of the training corpus) | {ppl['unigram']['perplexity']:.2f} | "
        f"{ppl['unigram']['bits_per_byte']:.3f} | {ppl['unigram']['word_perplexity']:.2f} | {ppl['unigram']['n_tokens']} |",
        "",
        f"The model's perplexity is **{ppl['ratio']:.3f}x** the unigram model's.",
        "",
        "## Greedy samples",
        "",
        f"{results['ngram4_overlap']:.1%} of the word 4-grams in the greedy continuations of {len(results['samples'])} "
        "prompts (first words of held-out documents) occur in the world's training corpus. The first 12:",
        "",
    ]
    for s in results["samples"][:12]:
        lines += [f"- **{s['prompt']}** {s['continuation']}"]
    if "tasks" in results:
        lines += [""] + task_section(out, results)
    if "decoding" in results:
        lines += decoding_section(results["decoding"])
    if "prompting" in results:
        lines += prompting_section(results["prompting"])
    if "preferences" in results:
        lines += preference_section(results["preferences"], out)
    if "checkpoints" in results:
        lines += checkpoints_section(results["checkpoints"], results.get("contamination"))
    from lmforge.experiments import report_sections

    lines += report_sections(out)
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += ["", "<details><summary>resolved config</summary>", "", "```json",
              json.dumps(asdict(cfg), indent=2), "```", "</details>", ""]
    path = out / "report.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    write_html(path)
    return path


def refresh_report(out: Path) -> Path | None:
    """Render a finished run's report again from what it saved (after an experiment adds its section);
    None when `out` holds no finished run."""
    import tomllib

    from lmforge.checkpoint import read_record
    from lmforge.pipeline import RunConfig

    results_file, timings_file = out / "eval" / "results.json", out / "eval" / "timings.json"
    if not (results_file.is_file() and timings_file.is_file() and (out / "config.toml").is_file()):
        return None
    cfg = RunConfig(**tomllib.loads((out / "config.toml").read_text(encoding="utf-8")))
    return write_report(out, cfg, json.loads(results_file.read_text(encoding="utf-8")),
                        json.loads(timings_file.read_text(encoding="utf-8")), read_record(out / "pretrain" / "final"))


HTML_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; } td { text-align: right; } td:first-child { text-align: left; }
img { max-width: 100%; } code { background: #f5f5f5; padding: 0 3px; } h2 { border-bottom: 1px solid #ddd; }
"""


def write_html(markdown_path: Path) -> Path:
    """report.html beside report.md: the same content, with the pictures embedded, so the one file can be
    mailed or opened anywhere."""
    import base64
    import re

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown_path.read_text(encoding="utf-8"))

    def embed(match: re.Match) -> str:
        picture = markdown_path.parent / match.group(1)
        if not picture.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(picture.read_bytes()).decode()}"'

    body = re.sub(r'src="([^":]+\.png)"', embed, body)
    html = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>lmforge run report</title>'
            f"<style>{HTML_STYLE}</style></head>\n<body>\n{body}</body></html>\n")
    path = markdown_path.with_suffix(".html")
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
