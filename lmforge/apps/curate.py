"""AlpaGasus curation: a judge rates every instruction example for accuracy on 0-5, and only the examples at
or above a threshold are kept (Chen et al. 2023: 52K Alpaca examples -> ~9K at 4.5, and the model tuned on
the smaller set was better).

    lmforge data curate --model JUDGE --data alpaca.json --threshold 4.5 --out curated.jsonl

- **Prompt** (`rating_prompt`): a system line asking for feedback on an assistant's response, the
  (instruction, input, response) triplet in headed sections, then a request for a 0-5 accuracy score alone on
  the first line and an explanation after it. `compact_rating_prompt` says the same in a few tokens, for
  judges whose context holds little more than the example (the embedded world's 256-token models).
- **Parse** (`parse_score`): the first number on the first line, falling back to the number after "score:";
  a score outside 0-5 is no score. An unparseable reply is counted and reported, and its example is never
  kept: it is not silently a 0, which would bias the histogram and the mean.
- **Keep** score >= threshold (4.5 in the paper). The summary counts kept, dropped (rated below the
  threshold) and unparseable examples, which add up to the total, with a histogram in half-point bins and
  the mean of the parsed scores.

Data: Alpaca records {instruction, input?, output} (JSON list or JSON lines) or chat records
{messages} with one user and one assistant turn (a system message first is allowed and not shown to the
judge). Kept records are written unchanged, so the output trains exactly like the input. Judging is greedy;
the judge is any `ReplyFn` (`lmforge.evaluate.judge`): a chat checkpoint or a function in tests.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from lmforge.errors import BadConfigError, BadFileError
from lmforge.evaluate.judge import ReplyFn

RATING_SYSTEM = "You are a careful reviewer. Give feedback on the AI assistant's response to the instruction."
RATING_REQUEST = ("Rate the accuracy of the response from 0 to 5; a higher score means a more accurate response. "
                  "Write only the score on the first line. On the next line, explain the score, judging the "
                  "content alone and avoiding any bias.")


def rating_prompt(instruction: str, input: str, output: str) -> str:
    input_section = f"### Input:\n{input}\n\n" if input else ""
    return (f"{RATING_SYSTEM}\n\n### Instruction:\n{instruction}\n\n{input_section}"
            f"### Response:\n{output}\n\n{RATING_REQUEST}")


def compact_rating_prompt(instruction: str, input: str, output: str) -> str:
    """The same request in a few tokens, for judges with a short context."""
    task = f"{instruction}\n{input}" if input else instruction
    return f"{task}\n\nResponse: {output}\n\nAccuracy from 0 to 5:"


_NUMBER = r"-?\d+(?:\.\d+)?"


def parse_score(reply: str) -> float | None:
    """The score in a judge's reply, or None.

    The first number on the first line ("4.5", "Score: 4", "4/5" -> 4); when the first line has none, the
    number after "score:" anywhere. A score outside 0-5 (e.g. "-1", "7") is None, not clipped."""
    first_line = reply.strip().split("\n", 1)[0]
    match = re.search(rf"({_NUMBER})", first_line) or re.search(rf"score\s*:\s*({_NUMBER})", reply, re.IGNORECASE)
    if match is None:
        return None
    score = float(match.group(1))
    return score if 0 <= score <= 5 else None


# ---------------------------------------------------------------------------------------------------------
# Records: Alpaca or one-turn chat


def triplet(record: dict) -> tuple[str, str, str]:
    """(instruction, input, output) of an Alpaca record or a one-turn chat record (see `read_data`)."""
    if "messages" in record:
        turns = {m["role"]: m["content"] for m in record["messages"] if m["role"] != "system"}
        return turns["user"], "", turns["assistant"]
    return record["instruction"], record.get("input") or "", record["output"]


def _check(record: dict, where: str) -> None:
    from lmforge.data.instructions import parse_message

    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise BadFileError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
        roles = [parse_message(m, where, f"message {i}")["role"] for i, m in enumerate(messages)]
        if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
            raise BadFileError(f"{where}: field 'messages' must hold one user turn then one assistant turn "
                               f"(a system message first is allowed), got roles {roles}")
        return
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = record.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, str):
            raise BadFileError(f"{where}: field {key!r} must be a string (an Alpaca record needs instruction and "
                               f"output, or a chat record needs messages); fields: {sorted(record)}")
    if not record["instruction"].strip():
        raise BadFileError(f"{where}: field 'instruction' is empty")


def read_data(path: str) -> list[dict]:
    """Every record of an Alpaca or one-turn chat file, checked with the file and line named."""
    from lmforge.data.instructions import read_records

    records = []
    for where, record in read_records(path):
        _check(record, where)
        records.append(record)
    if not records:
        raise BadFileError(f"{path}: no records (the file is empty)")
    return records


# ---------------------------------------------------------------------------------------------------------
# Rating and keeping


def rate_records(reply_fn: ReplyFn, records: Sequence[dict],
                 prompt_fn: Callable[[str, str, str], str] = rating_prompt) -> list[dict]:
    """One {score, reply} per record (score None when the reply names none)."""
    replies = reply_fn([prompt_fn(*triplet(r)) for r in records])
    return [{"score": parse_score(reply), "reply": reply} for reply in replies]


def is_kept(score: float | None, threshold: float) -> bool:
    return score is not None and score >= threshold


def score_summary(scores: Sequence[float | None], threshold: float) -> dict:
    """Counts (kept + dropped + unparseable = records), the mean of the parsed scores, and a histogram of them
    in half-point bins: a score s falls in the bin floor(2s) / 2, so 4.7 counts under 4.5."""
    parsed = [s for s in scores if s is not None]
    kept = sum(is_kept(s, threshold) for s in parsed)
    histogram = {f"{b / 2:.1f}": 0 for b in range(11)}
    for s in parsed:
        histogram[f"{math.floor(2 * s) / 2:.1f}"] += 1
    return {"records": len(scores), "rated": len(parsed), "unparseable": len(scores) - len(parsed),
            "kept": kept, "dropped": len(parsed) - kept, "threshold": threshold,
            "mean": sum(parsed) / len(parsed) if parsed else None, "histogram": histogram}


def curate(reply_fn: ReplyFn, records: Sequence[dict], threshold: float = 4.5,
           prompt_fn: Callable[[str, str, str], str] = rating_prompt) -> tuple[list[dict], dict]:
    """(the records whose score is >= threshold, in their order; the summary of `score_summary`)."""
    ratings = rate_records(reply_fn, records, prompt_fn)
    kept = [record for record, rating in zip(records, ratings) if is_kept(rating["score"], threshold)]
    return kept, score_summary([rating["score"] for rating in ratings], threshold)


def format_histogram(summary: dict, width: int = 40) -> str:
    most = max(summary["histogram"].values()) or 1
    mean = "n/a" if summary["mean"] is None else f"{summary['mean']:.2f}"
    lines = [f"{summary['records']} records: {summary['kept']} kept (score >= {summary['threshold']}), "
             f"{summary['dropped']} dropped, {summary['unparseable']} unparseable; mean score {mean}"]
    for bin_start, count in summary["histogram"].items():
        lines.append(f"  {bin_start:>4s} {'#' * round(width * count / most):{width}s} {count}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class CurateConfig:
    model: str = ""
    """The judge: an lmforge chat checkpoint or a local Hugging Face model directory with a chat template."""
    data: str = ""
    """Alpaca JSON/JSONL ({instruction, input, output}) or chat JSONL ({messages}: one user, one assistant turn)."""
    threshold: float = 4.5
    """Keep the examples scored at or above this (0-5)."""
    out: str = "curated.jsonl"
    """The kept records, unchanged (a JSON list when OUT ends in .json, else JSON lines); every record's score
    and reply go beside it (curated.scores.jsonl)."""
    compact: bool = False
    """Use the few-token rating prompt (for judges with a short context, like the embedded world's models)."""
    max_new_tokens: int = 64
    """Longest judge reply (the paper: 256); the score is read from its first line."""
    device: str = "auto"


def scores_path(out: str) -> Path:
    return Path(out).with_suffix(".scores.jsonl")


def _write_text(path: Path, text: str) -> None:
    # Written whole to a temporary file, then renamed: a stopped job never leaves half a file behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def run_curate(cfg: CurateConfig) -> dict:
    from lmforge.evaluate.judge import load_judge

    if not cfg.model or not cfg.data:
        raise BadConfigError("give --model JUDGE and --data EXAMPLES (Alpaca or chat)")
    if not 0 <= cfg.threshold <= 5:
        raise BadConfigError(f"--threshold must be in [0, 5], got {cfg.threshold}")
    records = read_data(cfg.data)
    reply_fn = load_judge(cfg.model, cfg.max_new_tokens, cfg.device)
    ratings = rate_records(reply_fn, records, compact_rating_prompt if cfg.compact else rating_prompt)
    summary = score_summary([r["score"] for r in ratings], cfg.threshold)
    summary["truncated_prompts"] = getattr(reply_fn, "truncated", 0)
    kept = [record for record, rating in zip(records, ratings) if is_kept(rating["score"], cfg.threshold)]
    out = Path(cfg.out)
    rows = [{"index": i, "score": rating["score"], "kept": is_kept(rating["score"], cfg.threshold),
             "reply": rating["reply"], "record": record} for i, (record, rating) in enumerate(zip(records, ratings))]
    _write_text(scores_path(cfg.out), _jsonl(rows))
    _write_text(out, json.dumps(kept, indent=2, ensure_ascii=False) if out.suffix == ".json" else _jsonl(kept))
    print(format_histogram(summary))
    if summary["truncated_prompts"]:
        print(f"{summary['truncated_prompts']} prompts were longer than the judge's context and lost their beginning")
    print(f"-> {out} (scores: {scores_path(cfg.out)})")
    return summary
