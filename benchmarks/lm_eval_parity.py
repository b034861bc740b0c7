"""Parity with lm-evaluation-harness: the same checkpoint and the same documents through both harnesses.

    pip install lm-eval
    python benchmarks/lm_eval_parity.py --model runs/world/pretrain/final --limit 200

Multiple choice: ARC-Easy documents as lmforge reads them (`Question: ...\\nAnswer:` and the choices) written to
a local JSON-lines file, and an lm-eval task over that file with the same layout (`output_type:
multiple_choice`, target delimiter " "). Perplexity: the world's held-out documents as a local
`loglikelihood_rolling` task (word perplexity, byte perplexity, bits per byte; lm-eval with `add_bos_token=False`,
see below). lm-eval loads the checkpoint with
`transformers` (`--model hf`), lmforge natively; both in float32 on the CPU. Printed: each metric from both, and
the largest per-document log-likelihood difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmforge.data.corpus import read_documents
from lmforge.evaluate.benchmarks import TASKS, Sources, Task, data_root
from lmforge.evaluate.harness import evaluate_multiple_choice, evaluate_rolling
from lmforge.hf import load_model
from lmforge.infer.prompting import FewShotFormat

MC_TASK = """task: lmforge_parity_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""
PPL_TASK = """task: lmforge_parity_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/world/pretrain/final")
    p.add_argument("--limit", type=int, default=200, help="ARC-Easy documents")
    p.add_argument("--texts", default="runs/world/world/corpus/valid.jsonl", help="documents for perplexity")
    p.add_argument("--n-texts", type=int, default=100)
    args = p.parse_args()
    import lm_eval
    from lm_eval.tasks import TaskManager

    torch.set_grad_enabled(False)
    mc_docs = TASKS["arc_easy"].load(Sources(data_root()))[:args.limit]
    texts = [t for t in read_documents(args.texts)][:args.n_texts]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "mc.jsonl", "w") as f:
            for d in mc_docs:
                f.write(json.dumps({"query": d["query"], "choices": d["choices"], "gold": d["gold"]}) + "\n")
        with open(tmp / "ppl.jsonl", "w") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")
        (tmp / "mc.yaml").write_text(MC_TASK.format(path=tmp / "mc.jsonl"))
        (tmp / "ppl.yaml").write_text(PPL_TASK.format(path=tmp / "ppl.jsonl"))
        manager = TaskManager(include_path=str(tmp))
        out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={args.model},dtype=float32",
                                      tasks=["lmforge_parity_mc"], device="cpu", batch_size=8,
                                      task_manager=manager, log_samples=True)
        # Rolling: our tokenizer adds BOS to a plain encode (as Llama's does), and lm-eval both keeps that BOS
        # and prepends BOS as the prefix token, so by default it also scores "BOS after BOS". Without the
        # tokenizer's BOS it scores exactly the text after one BOS, as lmforge does.
        ppl_out = lm_eval.simple_evaluate(model="hf",
                                          model_args=f"pretrained={args.model},dtype=float32,add_bos_token=False",
                                          tasks=["lmforge_parity_ppl"], device="cpu", batch_size=8,
                                          task_manager=manager)
    theirs = {**out["results"], **ppl_out["results"]}
    their_lls = {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in out["samples"]["lmforge_parity_mc"]}

    model, tokenizer = load_model(args.model)
    model.eval()
    mc, records = evaluate_multiple_choice(model, tokenizer, TASKS["arc_easy"], mc_docs, [[] for _ in mc_docs])
    rolling = Task("parity_ppl", "rolling", lambda s: [], fmt=FewShotFormat(doc_to_text="", doc_to_target="{text}"))
    ppl, _ = evaluate_rolling(model, tokenizer, rolling, [{"text": t, "target": t} for t in texts])
    ll_diff = max(abs(a - float(b)) for r in records for a, b in zip(r["loglikelihoods"], their_lls[r["doc_id"]]))

    print(f"command: python benchmarks/lm_eval_parity.py --model {args.model} --limit {args.limit}")
    print(f"date: {datetime.date.today()}  machine: {platform.platform()}, torch {torch.__version__}, "
          f"lm-eval {lm_eval.__version__}")
    print("| metric | lmforge | lm-evaluation-harness |")
    print("|---|---:|---:|")
    for metric in ("acc", "acc_norm"):
        print(f"| ARC-Easy ({len(mc_docs)} docs) {metric} | {mc[f'{metric},none']:.4f} | "
              f"{theirs['lmforge_parity_mc'][f'{metric},none']:.4f} |")
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        print(f"| world text ({len(texts)} docs) {metric} | {ppl[f'{metric},none']:.6f} | "
              f"{theirs['lmforge_parity_ppl'][f'{metric},none']:.6f} |")
    print(f"largest per-choice log-likelihood difference: {ll_diff:.2e}")
    agree = np.mean([r["pred"] == int(np.argmax(their_lls[r["doc_id"]])) for r in records])
    print(f"documents where both pick the same choice (acc): {agree:.1%}")


if __name__ == "__main__":
    main()
