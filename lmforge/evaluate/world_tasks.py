"""Accuracy per task cluster of the embedded world: what instruction tuning changes, measured.

Three ways to ask, on the same test records:

- **base, zero-shot**: the base model continues `"User: {request}\\nAssistant:"`, the dialogue layout of its
  corpus (it never saw the chat template's special tokens);
- **base, few-shot**: the same after k solved examples of the same cluster from the training split
  (lm-eval's layout, exemplars chosen with a seed);
- **chat, zero-shot**: an instruction-tuned model answers the request rendered with its chat template.

Every response is judged by the world's scorer (`world_tasks.score`): normalised match, refusal, leaks.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Callable

from lmforge.data.world_tasks import prompt_text
from lmforge.infer.engine import Engine
from lmforge.infer.prompting import FewShotFormat, choose_exemplars, few_shot_prompt
from lmforge.infer.sampling import SamplingParams

# The base model is asked in the one question-answer layout its corpus has: its dialogues
# ("User: ...\nAssistant: ..."), with solved examples as earlier turns of the same dialogue.
TEXT_FORMAT = FewShotFormat(doc_to_text="User: {request}\nAssistant:", doc_to_target="{output}",
                            fewshot_delimiter="\n")


def _doc(record: dict) -> dict:
    return {"request": prompt_text(record), "output": record["output"]}


def prompts_for(records: list[dict], tokenizer, mode: str, train_records: list[dict] | None = None,
                k: int = 3, seed: int = 0) -> list[list[int]]:
    if mode == "chat":
        return [tokenizer.render_prompt([{"role": "user", "content": prompt_text(r)}]) for r in records]
    by_cluster = defaultdict(list)
    for r in train_records or []:
        by_cluster[r["meta"]["cluster"]].append(_doc(r))
    prompts = []
    for i, r in enumerate(records):
        shots = []
        if mode == "few_shot":
            pool = by_cluster[r["meta"]["cluster"]]
            shots = choose_exemplars(pool, min(k, len(pool)), seed=seed + i)
        prompts.append(tokenizer.encode(few_shot_prompt(_doc(r), shots, TEXT_FORMAT), add_bos=True))
    return prompts


def cluster_accuracy(model, tokenizer, records: list[dict], score: Callable[[dict, str], dict], mode: str,
                     train_records: list[dict] | None = None, max_new_tokens: int = 72, k: int = 3,
                     seed: int = 0, batch_size: int = 16) -> dict:
    """{cluster: {"accuracy", "stderr", "lenient_accuracy", "n", "leaks"}} plus "_all" and "_samples" (every
    prompt, answer and verdict); greedy decoding. Text modes stop at the end of the line,
    the end of one answer in the few-shot layout."""
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    prompts = prompts_for(records, tokenizer, mode, train_records, k, seed)
    keep = engine.max_len - max_new_tokens
    prompts = [p[-keep:] for p in prompts]  # long few-shot prompts lose their oldest exemplars' start
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens,
                            stop=() if mode == "chat" else ("\n",))
    outputs = engine.generate(prompts, params)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # correct, n, leaks, lenient
    examples, samples = {}, []
    for record, out in zip(records, outputs):
        verdict = score(record, out.text.strip())
        correct = bool(verdict.get("correct"))
        # Lenient: the expected answer appears in the response as a whole word (a base model that answers
        # "Mina was born in Velmora." knows the fact but fails the strict match).
        lenient = correct or (bool(verdict.get("contains")) and not verdict.get("leaked"))
        t = tally[record["meta"]["cluster"]]
        t[0] += correct; t[1] += 1; t[2] += int(bool(verdict.get("leaked"))); t[3] += lenient
        examples.setdefault(record["meta"]["cluster"], (prompt_text(record), out.text.strip(), record["output"]))
        samples.append({"cluster": record["meta"]["cluster"], "prompt": prompt_text(record),
                        "response": out.text.strip(), "expected": record["output"], "correct": correct,
                        "lenient": lenient, "leaked": bool(verdict.get("leaked"))})
    result = {c: {"accuracy": a / n, "stderr": math.sqrt(a / n * (1 - a / n) / n), "n": n, "leaks": leaks,
                  "lenient_accuracy": le / n}
              for c, (a, n, leaks, le) in sorted(tally.items())}
    total = sum(t[1] for t in tally.values())
    result["_all"] = {"accuracy": sum(t[0] for t in tally.values()) / max(total, 1), "n": total,
                      "leaks": sum(t[2] for t in tally.values()),
                      "lenient_accuracy": sum(t[3] for t in tally.values()) / max(total, 1)}
    result["_all"]["stderr"] = math.sqrt(result["_all"]["accuracy"] * (1 - result["_all"]["accuracy"]) / max(total, 1))
    result["_examples"] = examples
    result["_samples"] = samples  # every prompt and answer, for the per-example file
    return result


def sample_per_cluster(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """At most n records of each cluster, chosen with a seed, in a stable order."""
    by_cluster = defaultdict(list)
    for r in records:
        by_cluster[r["meta"]["cluster"]].append(r)
    rng = random.Random(seed)
    chosen = []
    for cluster in sorted(by_cluster):
        pool = by_cluster[cluster]
        chosen += pool if len(pool) <= n else rng.sample(pool, n)
    return chosen
