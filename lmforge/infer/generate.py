"""`lmforge generate` and `lmforge chat`: the engine from the terminal.

    lmforge generate --model runs/world/pretrain/final --prompt "The town of" --temperature 0
    lmforge generate --model DIR --prompts prompts.jsonl --out outputs.jsonl --logprobs --n 4 --seed 1
    lmforge chat --model runs/world/sft/final           # /reset, /params, /quit

Both work on an lmforge checkpoint or any local Hugging Face causal LM directory (`hf.load_model`). Every
`SamplingParams` field is a flag (`--temperature`, `--top-p`, `--stop`, `--num-beams`, ...).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated

import tyro

from lmforge.data.instructions import read_records
from lmforge.errors import BadConfigError, BadFileError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams


@dataclass(frozen=True)
class GenerateConfig:
    model: str
    """Checkpoint directory (lmforge or Hugging Face)."""
    prompt: str = ""
    """One prompt (text)."""
    prompts: str = ""
    """A JSONL file of prompts: {"prompt": text} or {"messages": [...]} per line."""
    out: str = ""
    """Write JSONL results here (default: standard output)."""
    chat: bool = False
    """Wrap a text prompt as a user message in the model's chat template."""
    batch_size: int = 16
    device: str = "auto"
    best_of: int = 0
    """Best-of-N: sample N responses per prompt and keep the one --reward-model scores highest (0: off)."""
    reward_model: str = ""
    """A reward model checkpoint (`lmforge reward train`) with this model's tokenizer, for --best-of."""
    sampling: Annotated[SamplingParams, tyro.conf.OmitArgPrefixes] = field(default_factory=SamplingParams)


def _load(model_path: str, device: str):
    from lmforge.hf import load_model
    from lmforge.train.loop import pick_device

    if not Path(model_path).exists():
        raise BadFileError(f"{model_path}: no such checkpoint directory")
    return load_model(model_path, device=pick_device(device))


def read_prompts(path: str) -> list[dict]:
    records = []
    for where, record in read_records(path):
        if not ({"prompt", "messages"} & record.keys()):
            raise BadFileError(f"{where}: needs a 'prompt' or 'messages' field")
        records.append(record)
    if not records:
        raise BadFileError(f"{path}: no prompts")
    return records


def prompt_ids(tokenizer, record: dict, chat: bool) -> list[int]:
    if "messages" in record:
        return tokenizer.render_prompt(record["messages"])
    if chat:
        return tokenizer.render_prompt([{"role": "user", "content": record["prompt"]}])
    return tokenizer.encode(record["prompt"], add_bos=True)


def run_generate(cfg: GenerateConfig) -> list[dict]:
    if bool(cfg.prompt) == bool(cfg.prompts):
        raise BadConfigError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    records = [{"prompt": cfg.prompt}] if cfg.prompt else read_prompts(cfg.prompts)
    model, tokenizer = _load(cfg.model, cfg.device)
    engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size)
    ids = [prompt_ids(tokenizer, r, cfg.chat) for r in records]
    for i, p in enumerate(ids):  # fail before generating anything
        if len(p) >= engine.max_len:
            raise BadConfigError(f"prompt {i + 1} has {len(p)} tokens; the model's context is {engine.max_len}")
    if cfg.best_of or cfg.reward_model:
        rows = _best_of(cfg, model, tokenizer, engine, ids)
    else:
        rows = _rows(cfg, engine, ids)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cfg.out).with_name(Path(cfg.out).name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(cfg.out)
    elif cfg.prompt and len(rows) == 1:
        print(rows[0]["text"])
    else:
        sys.stdout.write(text)
    return rows


def _rows(cfg: GenerateConfig, engine, ids) -> list[dict]:
    rows = []
    for out in engine.generate(ids, cfg.sampling):
        row = {"prompt_index": out.prompt_index, "index": out.index, "text": out.text,
               "finish_reason": out.finish_reason, "n_tokens": len(out.token_ids)}
        if cfg.sampling.logprobs:
            row.update(token_ids=out.token_ids, logprobs=out.logprobs)
            if cfg.sampling.top_logprobs:
                row["top_logprobs"] = [{str(k): v for k, v in d.items()} for d in out.top_logprobs]
        if out.score is not None:
            row["score"] = out.score
        rows.append(row)
    return rows


def _best_of(cfg: GenerateConfig, model, tokenizer, engine, ids) -> list[dict]:
    """N samples per prompt, scored by the reward model on the very tokens sampled; the best one per prompt."""
    from dataclasses import replace

    from lmforge.checkpoint import load_checkpoint
    from lmforge.train.reward import check_same_tokenizer, group_rewards

    if cfg.best_of < 2 or not cfg.reward_model:
        raise BadConfigError("best-of-N needs --best-of N (at least 2) and --reward-model CHECKPOINT")
    if cfg.sampling.temperature == 0:
        raise BadConfigError("best-of-N needs sampling (--temperature above 0): greedy gives N identical answers")
    reward_model, rm_tokenizer, _ = load_checkpoint(cfg.reward_model, device=next(model.parameters()).device,
                                                    kind="reward_model")
    check_same_tokenizer(tokenizer, rm_tokenizer, cfg.model, cfg.reward_model)
    outputs = engine.generate(ids, replace(cfg.sampling, n=cfg.best_of))
    per_prompt = [outputs[i:i + cfg.best_of] for i in range(0, len(outputs), cfg.best_of)]
    groups = [[o.prompt_ids + o.token_ids for o in group] for group in per_prompt]
    rows = []
    for group_outputs, scores in zip(per_prompt, group_rewards(reward_model, groups, tokenizer.pad_id)):
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        o = group_outputs[best]
        rows.append({"prompt_index": o.prompt_index, "index": best, "text": o.text, "finish_reason": o.finish_reason,
                     "n_tokens": len(o.token_ids), "reward": scores[best], "rewards": scores,
                     "candidates": [c.text for c in group_outputs]})
    return rows


# ---------------------------------------------------------------------------------------------------------
# chat


@dataclass(frozen=True)
class ChatConfig:
    model: str
    """Checkpoint directory with a chat template (lmforge or Hugging Face)."""
    system: str = ""
    """A system message to start every conversation with."""
    device: str = "auto"
    sampling: Annotated[SamplingParams, tyro.conf.OmitArgPrefixes] = field(
        default_factory=lambda: SamplingParams(max_new_tokens=256, temperature=0.7, top_p=0.9))


HELP = "commands: /reset (forget the conversation), /params [name=value ...] (show or change sampling), /quit"


def _set_params(params: SamplingParams, assignments: list[str]) -> SamplingParams:
    types = {f.name: f.type for f in fields(SamplingParams)}
    changes = {}
    for item in assignments:
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in types:
            raise BadConfigError(f"/params: unknown field {name!r}")
        current = getattr(params, name)
        if isinstance(current, bool):
            changes[name] = value.strip().lower() in ("1", "true", "yes")
        elif isinstance(current, int) and not isinstance(current, bool):
            changes[name] = int(value)
        elif isinstance(current, float):
            changes[name] = float(value)
        elif isinstance(current, tuple):
            changes[name] = tuple(v for v in value.split(",") if v)
        else:
            changes[name] = None if value in ("", "none", "None") else int(value)
    return replace(params, **changes)


def run_chat(cfg: ChatConfig, input_fn=input, output=sys.stdout) -> list[dict]:
    """A terminal chat: each reply streams as it is generated. Returns the last conversation."""
    model, tokenizer = _load(cfg.model, cfg.device)
    engine = Engine(model, tokenizer, max_batch_size=1)
    params = cfg.sampling
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    messages = list(start)
    output.write(HELP + "\n")
    while True:
        try:
            line = input_fn("you> ")
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            output.write("(conversation reset)\n")
            continue
        if line.strip().startswith("/params"):
            try:
                params = _set_params(params, line.split()[1:])
            except (BadConfigError, ValueError) as e:
                output.write(f"error: {e}\n")
            output.write(json.dumps(asdict(params)) + "\n")
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.render_prompt(messages)
        if len(ids) >= engine.max_len - 1:
            output.write("(the conversation no longer fits the context; /reset to start again)\n")
            messages.pop()
            continue
        output.write("model> ")
        reply = []
        for delta in engine.stream(ids, replace(params, n=1, num_beams=1)):
            output.write(delta.text)
            output.flush()
            reply.append(delta.text)
        output.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return messages
