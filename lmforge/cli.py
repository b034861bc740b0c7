"""The `lmforge` command: a table of commands, each a config dataclass and the function that runs it.

Flags are generated from the dataclass fields by `tyro` (`lmforge pretrain --help` lists them with their
docstrings). Commands are nouns then verbs where a noun has several (`lmforge eval perplexity`). Errors the
user can cause print one line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

# command words -> ("module:ConfigClass", "module:function", one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("run",): ("lmforge.pipeline:RunConfig", "lmforge.pipeline:run",
               "the whole recipe on the embedded world (or --quick), ending in a report"),
    ("world", "export"): ("lmforge.data.world:ExportConfig", "lmforge.data.world:run_export",
                          "write the embedded world's corpus and facts as files"),
    ("pretrain",): ("lmforge.train.pretrain:PretrainConfig", "lmforge.train.pretrain:pretrain",
                    "tokenizer + corpus + preset -> checkpoint, by next-token prediction"),
    ("sft",): ("lmforge.train.sft:SFTConfig", "lmforge.train.sft:sft",
               "instruction tuning: train on assistant turns only (full, LoRA, packing)"),
    ("preferences", "sample"): ("lmforge.train.sample_preferences:SampleConfig",
                                "lmforge.train.sample_preferences:sample_preferences",
                                "K sampled responses per prompt, ranked by the world's oracle or a reward model"),
    ("reward", "train"): ("lmforge.train.reward:RewardConfig", "lmforge.train.reward:train_reward",
                          "reward model from comparisons (pairs or ranked lists; all C(K,2) pairs per prompt)"),
    ("reward", "score"): ("lmforge.train.reward:ScoreConfig", "lmforge.train.reward:score_file",
                          "score a JSONL file of responses with a reward model"),
    ("dpo",): ("lmforge.train.dpo:DPOConfig", "lmforge.train.dpo:dpo",
               "direct preference optimization (or IPO) on chosen/rejected pairs"),
    ("ppo",): ("lmforge.train.ppo:PPOConfig", "lmforge.train.ppo:ppo",
               "PPO against a reward model with a KL leash to the SFT model (InstructGPT step 3)"),
    ("rejection-sampling",): ("lmforge.train.rejection:RejectionConfig", "lmforge.train.rejection:rejection_sampling",
                              "best-of-n by a reward model, then SFT on the winners, for several rounds"),
    ("eval", "perplexity"): ("lmforge.evaluate.perplexity:PerplexityConfig", "lmforge.evaluate.perplexity:run",
                             "perplexity and bits per byte of a checkpoint on a text file"),
    ("eval", "tasks"): ("lmforge.evaluate.harness:TasksConfig", "lmforge.evaluate.harness:run",
                        "benchmark tasks (GSM8K, ARC, HellaSwag, WikiText-2, world clusters, ...) with stderrs"),
    ("eval", "contamination"): ("lmforge.evaluate.contamination:ContaminationConfig",
                                "lmforge.evaluate.contamination:run",
                                "13-gram overlap between benchmarks and training data, per task"),
    ("generate",): ("lmforge.infer.generate:GenerateConfig", "lmforge.infer.generate:run_generate",
                    "continue prompts with any decoding strategy (a prompt, or a JSONL file of them)"),
    ("chat",): ("lmforge.infer.generate:ChatConfig", "lmforge.infer.generate:run_chat",
                "talk to a model in the terminal, replies streamed"),
    ("judge",): ("lmforge.evaluate.judge:JudgeConfig", "lmforge.evaluate.judge:run_judge",
                 "LLM-as-judge: pairwise (both orders) or single-score, with position, length and self-preference figures"),
    ("arena", "rate"): ("lmforge.evaluate.arena:RateConfig", "lmforge.evaluate.arena:run_rate",
                        "arena battles -> online Elo and Bradley-Terry ratings with bootstrap intervals and ranks"),
    ("arena", "export"): ("lmforge.serve.store:ExportConfig", "lmforge.serve.store:run_export",
                          "the arena's decisive votes as {prompt, chosen, rejected} preference JSONL"),
    ("serve",): ("lmforge.serve.api:ServeConfig", "lmforge.serve.api:serve",
                 "OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching"),
    ("data", "self-instruct"): ("lmforge.apps.self_instruct:SelfInstructConfig",
                                "lmforge.apps.self_instruct:run_self_instruct",
                                "Self-Instruct: seed tasks -> generated instructions and instances, filtered, with a funnel"),
    ("data", "curate"): ("lmforge.apps.curate:CurateConfig", "lmforge.apps.curate:run_curate",
                         "AlpaGasus curation: a judge rates each example 0-5; keep those at or above a threshold"),
    ("rag", "index"): ("lmforge.apps.rag:IndexConfig", "lmforge.apps.rag:run_index",
                       "retrieval index of a document collection: BM25, dense (a model's mean-pooled states), hybrid"),
    ("rag", "ask"): ("lmforge.apps.rag:AskConfig", "lmforge.apps.rag:run_ask",
                     "answer questions with retrieved passages in the prompt, citing the passages used"),
    ("detect",): ("lmforge.apps.detect:DetectConfig", "lmforge.apps.detect:run_detect",
                  "AI-text detection scores (likelihood, log-rank, GLTR buckets, Binoculars) with AUROC and TPR@1%FPR"),
    ("info",): ("lmforge.cli:InfoConfig", "lmforge.cli:info",
                "parameters and FLOPs of a preset or a checkpoint"),
}


def _experiment_commands() -> None:
    from lmforge.experiments import EXPERIMENTS, config_ref, function_ref

    for name, (_, help_text) in EXPERIMENTS.items():
        COMMANDS[("experiment", name)] = (config_ref(name), function_ref(name), help_text)


_experiment_commands()


@dataclass(frozen=True)
class InfoConfig:
    preset: str = ""
    """A preset name (see the list printed without arguments)."""
    model: str = ""
    """A checkpoint directory."""
    seq_len: int = 0
    """Sequence length for the FLOPs count; 0: the context length."""


def info(cfg: InfoConfig) -> None:
    import json

    from lmforge.model import PRESETS, count_parameters, flops_per_token, get_preset

    if cfg.model:
        from lmforge.checkpoint import model_config_from_dict, read_record

        record = read_record(cfg.model)
        model_cfg = model_config_from_dict(record["configs"]["model"])
        print(json.dumps({"kind": record["kind"], "lineage": record["lineage"], "metrics": record["metrics"]}, indent=2))
    elif cfg.preset:
        model_cfg = get_preset(cfg.preset)
    else:
        for name, preset in PRESETS.items():
            n = count_parameters(preset)["total"]
            print(f"{name:12s} {n / 1e6:12.2f}M  layers={preset.n_layers:<3d} d_model={preset.d_model:<6d} "
                  f"heads={preset.n_heads}/{preset.n_kv_heads} context={preset.max_seq_len}")
        return
    counts = count_parameters(model_cfg)
    seq_len = cfg.seq_len or model_cfg.max_seq_len
    print(json.dumps({**counts, "flops_per_token": flops_per_token(model_cfg, seq_len), "seq_len": seq_len,
                      "config": model_cfg.__dict__}, indent=2))


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _usage(prefix: tuple[str, ...] = ()) -> str:
    lines = [f"usage: lmforge {' '.join(prefix) + ' ' if prefix else ''}COMMAND [--help] [FLAGS]", "", "commands:"]
    for words, (_, _, help_text) in COMMANDS.items():
        if words[:len(prefix)] == prefix:
            lines.append(f"  {' '.join(words):26s} {help_text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tyro

    from lmforge.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    match = max((words for words in COMMANDS if tuple(argv[: len(words)]) == words), key=len, default=None)
    if match is None:
        # a group word alone (`lmforge experiment`, `lmforge eval --help`) lists that group's commands
        group = (argv[0],) if argv and any(len(w) > 1 and w[0] == argv[0] for w in COMMANDS) else ()
        asked = len(argv) == len(group) or argv[len(group)] in ("-h", "--help")
        print(_usage(group), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    config_ref, function_ref, help_text = COMMANDS[match]
    prog = "lmforge " + " ".join(match)
    try:
        cfg = tyro.cli(_load(config_ref), args=argv[len(match):], prog=prog, description=help_text)
        _load(function_ref)(cfg)
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    sys.exit(main())
