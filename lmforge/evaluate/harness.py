"""The task harness: `lmforge eval tasks --model PATH --tasks gsm8k,arc_easy,hellaswag,wikitext2`.

Each task of `evaluate/benchmarks.py` is run through one of lm-eval's three requests (evaluation.md §1-5):

- **multiple choice** (`loglikelihood`): one request per choice, continuation = target delimiter + choice.
  `acc` picks argmax_i ll_i; `acc_norm` picks argmax_i ll_i / len(choice_i) with the length in *characters*
  (lm-eval's definition, not tokens). Worked example: ll = (-6.0, -9.0) for choices "no" and "not at all":
  acc picks "no"; per character (-3.0, -0.9), so acc_norm picks "not at all". A continuation longer than the
  model's context (a long PIQA solution on a 64-token model) is scored in windows (`windowed_loglikelihood`);
- **generation** (`generate_until`): greedy by default, or n samples at a temperature; each response goes
  through the task's filters (regex, first line, ...) and each filter is reported as `<metric>,<filter>` for
  the first sample and, with n > 1, as `<metric>,<filter>-maj@n` for the majority vote (self-consistency);
- **rolling log-likelihood**: each document scored on its own with the disjoint windows of
  `infer/scoring.py` (every token exactly once); corpus-level word perplexity, byte perplexity and bits per
  byte, with words and bytes counted on the original text.

Prompts are few-shot with the seeded sampler of `infer/prompting.py` (each doc draws its own exemplars).
Generation goes through the chat template when the model is a chat model (`--chat auto`: a tokenizer with a
template, and for an lmforge checkpoint a stage past pretraining, since base checkpoints carry the template
but never saw its role tokens); the turn then ends at end-of-sequence instead of at the task's stop strings.
Multiple choice and perplexity always score plain text.

Standard errors: std / sqrt(n) (sample std) for per-doc means; for corpus metrics, the std of the metric over
`bootstrap_iters` resamples of the documents with replacement (seeded). Results are written atomically as
`results.json` (lm-eval's `{task: {"<metric>,<filter>": v, "<metric>_stderr,<filter>": se}}` plus config,
model, notes, sampling parameters, sample counts and the git commit) and `samples_<task>.jsonl`, one record
per doc (doc id, prompt, choice log-likelihoods or responses, target, correct).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from lmforge.errors import BadConfigError, BadFileError
from lmforge.evaluate.benchmarks import WORLD_TEST_RECORDS, Sources, Task, data_root, get_task
from lmforge.evaluate.perplexity import summarize
from lmforge.infer.engine import Engine
from lmforge.infer.prompting import choose_exemplars, few_shot_messages, few_shot_prompt, majority_vote
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scoring import loglikelihood_rolling, loglikelihood_tokens, split_context


@dataclass(frozen=True)
class TasksConfig:
    model: str
    """Checkpoint directory: lmforge, or any local Hugging Face causal LM; or an OpenAI-compatible server as
    openai:http://HOST:PORT/v1/MODEL (`lmforge serve`, vLLM, ...), for generation tasks."""
    tasks: str
    """Comma-separated task names, e.g. gsm8k,arc_easy,hellaswag,wikitext2 (an unknown name lists them all)."""
    limit: int = 0
    """Evaluate only the first N docs of each task (0: all)."""
    num_fewshot: int = -1
    """Solved exemplars before each doc; -1: each task's default (gsm8k 5, gsm8k_cot 8, others 0)."""
    seed: int = 0
    """Seed of the few-shot draws, the sampled generations and the bootstrap."""
    out: str = ""
    """Directory for results.json and samples_<task>.jsonl; empty: print the results only."""
    data_dir: str = ""
    """Shared data folder holding eval/ and pretrain/ (default: $LMFORGE_SHARED/data, else ../shared/data)."""
    world_seed: int = 0
    """Seed of the embedded world for the world_<cluster> tasks (the run's --seed)."""
    chat: Literal["auto", "yes", "no"] = "auto"
    """Generate through the chat template; auto: when the tokenizer has one and the checkpoint is not a
    pretrained base model (multiple choice and perplexity always score plain text)."""
    num_samples: int = 1
    """Generations per doc; above 1, a majority vote over the extracted answers is reported too."""
    temperature: float = 0.0
    """0: greedy. Majority voting over several samples needs a temperature above 0."""
    max_gen_tokens: int = 0
    """Most new tokens per generation; 0: the task's default. Capped at half the model's context."""
    batch_size: int = 16
    bootstrap_iters: int = 1000
    """Resamples for the standard errors of corpus metrics (perplexities)."""
    device: str = "auto"
    api_key: str = ""
    """Bearer key for an openai: endpoint started with --api-key."""
    progress: bool = True
    """Show progress bars."""


# --- standard errors -----------------------------------------------------------------------------------


def mean_stderr(values) -> float | None:
    """Sample standard deviation / sqrt(n), lm-eval's error of a mean; None below two values."""
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def bootstrap_stderr(statistic, rows: np.ndarray, iters: int, seed: int) -> float | None:
    """Std of statistic(column sums) over `iters` resamples of the rows (documents) with replacement."""
    if len(rows) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = [statistic(rows[rng.integers(0, len(rows), len(rows))].sum(axis=0)) for _ in range(iters)]
    return float(np.std(values, ddof=1))


# --- multiple choice -------------------------------------------------------------------------------------


def choice_predictions(lls: list[float], choices: list[str]) -> tuple[int, int]:
    """(argmax of ll, argmax of ll per character of the choice): the picks of acc and acc_norm."""
    per_char = [ll / max(1, len(choice)) for ll, choice in zip(lls, choices)]
    return int(np.argmax(lls)), int(np.argmax(per_char))


def choice_requests(doc: dict, exemplars: list[dict], task: Task) -> list[tuple[str, str]]:
    """(context, continuation) per choice. Docs with `contexts` (WinoGrande) put each option in the context
    and score the same continuation after each."""
    delimiter = task.fmt.target_delimiter
    if "contexts" in doc:
        return [(few_shot_prompt({**doc, "context": c}, exemplars, task.fmt), delimiter + doc["continuation"])
                for c in doc["contexts"]]
    prompt = few_shot_prompt(doc, exemplars, task.fmt)
    return [(prompt, delimiter + choice) for choice in doc["choices"]]


@torch.no_grad()
def windowed_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(ll, is_greedy) of a continuation longer than the model's context L, which one forward pass cannot
    score (lm-eval refuses such requests): L/2 tokens at a time, each span after up to L tokens of context.
    Worked example, L = 4, context c0 c1, continuation t0..t4: spans t0 t1 (input c0 c1 t0), t2 t3 (input
    c1 t0 t1 t2), t4 (input t0 t1 t2 t3)."""
    max_len, device = model.cfg.max_seq_len, next(model.parameters()).device
    sequence, start = context + continuation, len(context)
    total, greedy = 0.0, True
    while start < len(sequence):
        end = min(len(sequence), start + max(1, max_len // 2))
        inputs = sequence[max(0, end - 1 - max_len):end - 1]
        logp = torch.log_softmax(model(torch.tensor([inputs], device=device)).float()[0, -(end - start):], -1)
        targets = torch.tensor(sequence[start:end], device=device)
        total += logp.gather(-1, targets[:, None]).double().sum().item()
        greedy = greedy and bool((logp.argmax(-1) == targets).all())
        start = end
    return total, greedy


def score_requests(model, tokenizer, requests: list[tuple[str, str]], batch_size: int = 16) -> list[tuple[float, bool]]:
    """lm-eval's `loglikelihood` (scoring.py) in batches, with the rare continuation that does not fit the
    model's context (a long PIQA solution on a 64-token model) scored by `windowed_loglikelihood`."""
    pairs = [split_context(tokenizer, ctx, cont) for ctx, cont in requests]
    if any(not cont for _, cont in pairs):
        raise BadConfigError("a choice is empty after tokenization")
    fits = [i for i, (_, cont) in enumerate(pairs) if len(cont) <= model.cfg.max_seq_len]
    scored = dict(zip(fits, loglikelihood_tokens(model, [pairs[i] for i in fits], tokenizer.pad_id, batch_size)))
    return [scored[i] if i in scored else windowed_loglikelihood(model, *pairs[i]) for i in range(len(pairs))]


def evaluate_multiple_choice(model, tokenizer, task: Task, docs: list[dict], exemplars: list[list[dict]],
                             batch_size: int = 16, progress: bool = False) -> tuple[dict, list[dict]]:
    requests = [choice_requests(doc, ex, task) for doc, ex in zip(docs, exemplars)]
    flat = [r for rs in requests for r in rs]
    scored = []
    chunk = batch_size * 4
    for start in tqdm(range(0, len(flat), chunk), desc=task.name, disable=not progress):
        scored += score_requests(model, tokenizer, flat[start:start + chunk], batch_size)
    records, at = [], 0
    for i, (doc, rs) in enumerate(zip(docs, requests)):
        lls, greedy = zip(*scored[at:at + len(rs)])
        at += len(rs)
        pred, pred_norm = choice_predictions(list(lls), doc["choices"])
        contexts = list(dict.fromkeys(ctx for ctx, _ in rs))  # one shared prompt, or one per choice
        records.append({"doc_id": i, "prompt": contexts[0] if len(contexts) == 1 else contexts,
                        "choices": doc["choices"], "loglikelihoods": list(lls), "is_greedy": list(greedy),
                        "target": doc["target"], "gold": doc["gold"], "pred": pred, "pred_norm": pred_norm,
                        "correct": pred == doc["gold"], "acc": float(pred == doc["gold"]),
                        "acc_norm": float(pred_norm == doc["gold"])})
    metrics = {}
    for name in task.metrics:
        values = [r[name] for r in records]
        metrics[f"{name},none"] = float(np.mean(values))
        metrics[f"{name}_stderr,none"] = mean_stderr(values)
    return metrics, records


# --- generation ------------------------------------------------------------------------------------------


def render_prompt(tokenizer, doc: dict, exemplars: list[dict], task: Task, chat: bool) -> list[int]:
    if chat:
        return tokenizer.render_prompt(few_shot_messages(doc, exemplars, task.chat_fmt or task.fmt))
    return tokenizer.encode(few_shot_prompt(doc, exemplars, task.fmt), add_bos=True)


def evaluate_generation(model, tokenizer, task: Task, docs: list[dict], exemplars: list[list[dict]],
                        params: SamplingParams, chat: bool = False, batch_size: int = 16,
                        progress: bool = False) -> tuple[dict, list[dict]]:
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    keep = engine.max_len - params.max_new_tokens  # long prompts lose their oldest tokens, as in lm-eval
    prompts = [render_prompt(tokenizer, doc, ex, task, chat)[-keep:] for doc, ex in zip(docs, exemplars)]
    outputs = []
    chunk = batch_size * 4
    for start in tqdm(range(0, len(prompts), chunk), desc=task.name, disable=not progress):
        outputs += engine.generate(prompts[start:start + chunk], params)
    n = params.n
    responses = [[o.text for o in outputs[i * n:(i + 1) * n]] for i in range(len(docs))]
    return score_generations(task, docs, [tokenizer.decode(p, skip_special=False) for p in prompts], responses)


def evaluate_generation_endpoint(endpoint, task: Task, docs: list[dict], exemplars: list[list[dict]],
                                 params: SamplingParams, chat: bool) -> tuple[dict, list[dict]]:
    """The same requests sent as text to an OpenAI-compatible server (`EndpointModel`), which applies its own
    chat template: chat messages through /chat/completions, or the few-shot prompt through /completions."""
    n = params.n
    if chat:
        conversations = [few_shot_messages(doc, ex, task.chat_fmt or task.fmt) for doc, ex in zip(docs, exemplars)]
        texts = endpoint.chat(conversations, params)
        shown = [json.dumps(c, ensure_ascii=False) for c in conversations]
    else:
        shown = [few_shot_prompt(doc, ex, task.fmt) for doc, ex in zip(docs, exemplars)]
        texts = endpoint.complete(shown, params)
    return score_generations(task, docs, shown, [texts[i * n:(i + 1) * n] for i in range(len(docs))])


def score_generations(task: Task, docs: list[dict], prompts: list[str],
                      responses: list[list[str]]) -> tuple[dict, list[dict]]:
    """Extract and judge each doc's responses (n per doc; above 1, a majority vote too)."""
    records, scores = [], {}
    for i, doc in enumerate(docs):
        n = len(responses[i])
        record = {"doc_id": i, "prompt": prompts[i],
                  "responses": responses[i], "target": doc["target"], "filtered": {}, "metrics": {}}
        for name, extract in task.filters.items():
            answers = [extract(r) for r in responses[i]]
            record["filtered"][name] = [a if a is not None else "[invalid]" for a in answers]
            record["metrics"][f"{task.metric},{name}"] = float(task.judge(doc, answers[0]))
            if n > 1:  # self-consistency: the most common answer among the samples
                voted = majority_vote(answers)
                record["metrics"][f"{task.metric},{name}-maj@{n}"] = float(voted is not None and task.judge(doc, voted))
        record["correct"] = bool(next(iter(record["metrics"].values())))
        records.append(record)
        for key, value in record["metrics"].items():
            scores.setdefault(key, []).append(value)
    metrics = {}
    for key, values in scores.items():
        metric, name = key.split(",", 1)
        metrics[key] = float(np.mean(values))
        metrics[f"{metric}_stderr,{name}"] = mean_stderr(values)
    return metrics, records


# --- rolling log-likelihood --------------------------------------------------------------------------------


def evaluate_rolling(model, tokenizer, task: Task, docs: list[dict], bootstrap_iters: int = 1000, seed: int = 0,
                     progress: bool = False) -> tuple[dict, list[dict]]:
    """Docs carry `text` (what is scored) and `page` (the original, where words and bytes are counted)."""
    records, rows = [], []
    for i, doc in enumerate(tqdm(docs, desc=task.name, disable=not progress)):
        ids = tokenizer.encode(doc["text"])
        ll, n_tokens = loglikelihood_rolling(model, ids, model.cfg.max_seq_len, tokenizer.bos_id)
        page = doc.get("page", doc["text"])
        n_words, n_bytes = len(re.split(r"\s+", page)), len(page.encode("utf-8"))
        rows.append((ll, n_tokens, n_bytes, n_words))
        records.append({"doc_id": i, "prompt": "", "target": doc["target"], "loglikelihood": ll,
                        "tokens": n_tokens, "words": n_words, "bytes": n_bytes, "correct": None})
    rows = np.array(rows, dtype=float)  # (docs, 4): ll, tokens, bytes, words
    totals = summarize(*rows.sum(axis=0))
    metrics = {}
    for name in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        metrics[f"{name},none"] = totals[name]
        metrics[f"{name}_stderr,none"] = bootstrap_stderr(lambda sums: summarize(*sums)[name], rows,
                                                          bootstrap_iters, seed)
    return metrics, records


# --- the command -------------------------------------------------------------------------------------------


def use_chat(mode: str, model_path: str, tokenizer) -> bool:
    if mode != "auto":
        return mode == "yes"
    if not getattr(tokenizer, "has_chat_template", False):
        return False
    record = Path(model_path) / "lmforge.json"
    if record.is_file():  # lmforge base checkpoints carry the template too, but never saw its role tokens
        return json.loads(record.read_text(encoding="utf-8")).get("lineage", {}).get("stage") not in (None, "pretrain")
    return True


def draw_exemplars(docs: list[dict], pool: list[dict], k: int, seed: int, exclude_self: bool) -> list[list[dict]]:
    """Each doc's own seeded draw from `pool`; when the pool is the doc's own set (exclude_self), the doc itself
    is never drawn. Doc i of seed s draws with seed s * 1_000_003 + i: with s + i, seed 1 would hand each doc
    the exemplars seed 0 gave the next one, and re-running with other seeds would measure little."""
    if k == 0:
        return [[] for _ in docs]
    return [choose_exemplars(pool, k, seed * 1_000_003 + i, exclude=doc if exclude_self else None)
            for i, doc in enumerate(docs)]


def _check(cfg: TasksConfig) -> list[Task]:
    names = [name.strip() for name in cfg.tasks.split(",") if name.strip()]
    if not names:
        raise BadConfigError("--tasks: give at least one task name")
    if cfg.limit < 0 or cfg.num_samples < 1 or cfg.temperature < 0 or cfg.bootstrap_iters < 1 or cfg.batch_size < 1:
        raise BadConfigError("--limit, --temperature must be >= 0; --num-samples, --bootstrap-iters, --batch-size >= 1")
    if cfg.num_samples > 1 and cfg.temperature == 0:
        raise BadConfigError("--num-samples above 1 needs --temperature above 0: greedy samples are all the same")
    return [get_task(name) for name in names]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run(cfg: TasksConfig) -> dict:
    from lmforge.hf import load_model
    from lmforge.train.loop import pick_device

    tasks = _check(cfg)  # an unknown name fails before the model is loaded
    endpoint = model = None
    if cfg.model.startswith("openai:"):
        from lmforge.serve.client import EndpointModel, parse_endpoint

        scored = [t.name for t in tasks if t.kind != "generate"]
        if scored:
            raise BadConfigError(f"{', '.join(scored)}: log-likelihood tasks need the model's own probabilities; "
                                 "an OpenAI-compatible endpoint runs generation tasks only")
        endpoint = EndpointModel(*parse_endpoint(cfg.model), api_key=cfg.api_key or None)
        chat = cfg.chat != "no"  # the server applies the model's chat template
    else:
        model, tokenizer = load_model(cfg.model, device=pick_device(cfg.device))
        model.eval()
        chat = use_chat(cfg.chat, cfg.model, tokenizer)
    sources = Sources(data_root(cfg.data_dir), cfg.world_seed, max(cfg.limit, WORLD_TEST_RECORDS))
    results = {"results": {}, "n-shot": {}, "n-samples": {}, "chance": {}, "sampling": {}, "notes": {},
               "seconds": {}, "model": cfg.model, "chat_template": chat, "config": asdict(cfg),
               "git_commit": _git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    samples = {}
    for task in tasks:
        t0 = time.perf_counter()
        all_docs = task.load(sources)
        docs = all_docs[:cfg.limit] if cfg.limit else all_docs
        if not docs:
            raise BadFileError(f"{task.name}: the data has no documents")
        k = task.num_fewshot if cfg.num_fewshot < 0 else cfg.num_fewshot
        if task.kind == "rolling":
            k = 0  # a document is scored alone
        pool = task.pool(sources) if task.pool is not None and k else all_docs
        exemplars = draw_exemplars(docs, pool, k, cfg.seed, exclude_self=pool is all_docs)
        with torch.no_grad():
            if task.kind == "multiple_choice":
                metrics, records = evaluate_multiple_choice(model, tokenizer, task, docs, exemplars,
                                                            cfg.batch_size, cfg.progress)
                results["chance"][task.name] = float(np.mean([1 / len(d["choices"]) for d in docs]))
            elif task.kind == "generate":
                max_new = cfg.max_gen_tokens or task.max_gen_tokens
                params = SamplingParams(
                    max_new_tokens=max_new if endpoint else min(max_new, model.cfg.max_seq_len // 2),
                    temperature=cfg.temperature, stop=() if chat else task.stop, seed=cfg.seed, n=cfg.num_samples)
                if endpoint:
                    metrics, records = evaluate_generation_endpoint(endpoint, task, docs, exemplars, params, chat)
                else:
                    metrics, records = evaluate_generation(model, tokenizer, task, docs, exemplars, params, chat,
                                                           cfg.batch_size, cfg.progress)
                results["sampling"][task.name] = asdict(params)
            else:
                metrics, records = evaluate_rolling(model, tokenizer, task, docs, cfg.bootstrap_iters, cfg.seed,
                                                    cfg.progress)
        results["results"][task.name] = {"alias": task.name, **metrics}
        results["n-shot"][task.name] = k
        results["n-samples"][task.name] = {"original": len(all_docs), "effective": len(docs)}
        results["notes"][task.name] = task.notes
        results["seconds"][task.name] = round(time.perf_counter() - t0, 2)
        samples[task.name] = records

    if cfg.out:  # per-example records first, results.json last: its presence means the run finished
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, records in samples.items():
            _write_atomic(out / f"samples_{name}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        _write_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(format_table(results))
    return results


def _number(value: float, width: int) -> str:
    return f"{value:{width}.4f}" if abs(value) < 1e5 else f"{value:{width}.3e}"


def format_table(results: dict) -> str:
    """One line per task and metric: value ± standard error, the shots, the docs and chance where known."""
    lines = [f"{'task':22s} {'metric':34s} {'value':>10s} {'stderr':>9s} {'shots':>5s} {'docs':>6s} {'chance':>7s}"]
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if key == "alias" or "_stderr," in key:
                continue
            metric, name = key.split(",", 1)
            se = metrics.get(f"{metric}_stderr,{name}")
            chance = results["chance"].get(task)
            lines.append(f"{task:22s} {key:34s} {_number(value, 10)} {'' if se is None else _number(se, 9):>9s} "
                         f"{results['n-shot'][task]:5d} {results['n-samples'][task]['effective']:6d} "
                         f"{'' if chance is None else f'{chance:7.3f}':>7s}")
    return "\n".join(lines)
