"""Instruction data in every common format -> one normalised form: a conversation that ends with the assistant.

Formats (`read_examples(path, format="auto")` picks one from the keys of the first record):

    alpaca             {"instruction", "input"?, "output", "system"?}      JSON list or JSON lines
    chat               {"messages": [{"role", "content"}, ...]}           JSON lines (system first, optional)
    prompt_completion  {"prompt", "completion"}                            strings, or message lists (TRL)
    sharegpt           {"conversations": [{"from", "value"}, ...]}         from: system/human/gpt
    columns            any JSONL/CSV, `columns={"instruction": "Q", "output": "A"}` names the fields
                       (keys: instruction, input, output, system; or messages for a chat field)

Files: .json (a list, one object, or JSON lines under a .json name), .jsonl, .csv, extension-less JSON lines, a
local Hugging Face `datasets` directory, or a Hub name `owner/name` (both need `pip install datasets`).

The normalised form is `Example(messages, meta)`: roles system/user/assistant, system only first, the last turn the
assistant's; Alpaca becomes user = instruction (+ "\\n\\n" + input when there is one), assistant = output. Keys a
format does not use land in `meta` (a `"meta"` object's own keys are lifted into it). Errors are `BadFileError`s
naming `file:line` (`file: record i` in a JSON list, `name: row i` in a dataset) and the field or role at fault.

Only assistant tokens are trained (`Tokenizer.render` gives loss_mask 1 on assistant content and the EOS closing
each assistant turn): the model should learn to answer and to stop, not to write the user's questions, and
completion-only loss measurably helps (alignment.md §1: nanochat PR #582). Examples longer than the context are
dropped, never truncated: a truncated answer would teach the model to stop mid-sentence, or lose its EOS.
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from lmforge.data.corpus import HF_DATASET_MARKERS, _looks_like_hub_name, hf_train_split
from lmforge.errors import BadConfigError, BadFileError
from lmforge.tokenizer import ROLES, Tokenizer

FORMATS = ("auto", "alpaca", "chat", "prompt_completion", "sharegpt", "columns")
ALPACA_COLUMNS = {"instruction": "instruction", "input": "input", "output": "output", "system": "system"}
COLUMN_KEYS = ("instruction", "input", "output", "system", "messages")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Example:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...], the last from the assistant
    meta: dict = field(default_factory=dict)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Stanford Alpaca prompt (tatsu-lab/stanford_alpaca `train.py`), for base models without a chat template;
    the target that follows it is the output and EOS. Like alpaca-lora we end with "### Response:\n", so the answer
    starts on its own line (Stanford's `train.py` stops at "### Response:")."""
    if input:
        return ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Response:\n")


# --- reading records ---------------------------------------------------------------------------------------

def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of a file (JSON lines, a JSON list, CSV; gzip-compressed too, e.g.
    `.jsonl.gz`) or a `datasets` dataset; `where` ("file:line") is what an error message names."""
    p = Path(path)
    if p.is_dir() and any((p / marker).is_file() for marker in HF_DATASET_MARKERS):
        yield from _hf_records(str(path), local=True)
    elif p.is_file():
        try:
            yield from _file_records(p)
        except UnicodeDecodeError as e:
            raise BadFileError(f"{path}: not UTF-8 text ({e.reason})") from None
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut-off download ends in EOFError
            raise BadFileError(f"{path}: unreadable ({e})") from None
    elif _looks_like_hub_name(str(path)):
        yield from _hf_records(str(path), local=False)
    else:
        raise BadFileError(f"{path}: no such file")


def _file_records(path: Path) -> Iterator[tuple[str, dict]]:
    gzipped = path.suffix.lower() == ".gz"
    kind = Path(path.stem).suffix.lower() if gzipped else path.suffix.lower()
    # utf-8-sig drops a byte-order mark (Excel's CSVs have one); newline="" keeps "\r\n" inside CSV cells.
    opener = gzip.open if gzipped else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        if kind == ".csv":
            reader = csv.DictReader(f)
            reader.fieldnames  # reads the header, so the first record starts on the next line
            start = reader.line_num + 1
            for record in reader:
                yield f"{path}:{start}", {k: v for k, v in record.items() if k is not None}
                start = reader.line_num + 1
            return
        text = f.read()
    if kind == ".json" and text.strip():
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first object: JSON lines under a .json name
                raise BadFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        else:
            for i, record in enumerate(data if isinstance(data, list) else [data]):
                yield _object(record, f"{path}: record {i}")
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadFileError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            yield _object(record, f"{path}:{lineno}")


def _object(record, where: str) -> tuple[str, dict]:
    if not isinstance(record, dict):
        raise BadFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return where, record


def _hf_records(name: str, local: bool) -> Iterator[tuple[str, dict]]:
    for i, record in enumerate(hf_train_split(name, local)):
        yield f"{name}: row {i}", dict(record)


# --- records -> examples -----------------------------------------------------------------------------------

def _detect(record: dict, where: str) -> str:
    keys = set(record)
    for fmt, needed in (("chat", {"messages"}), ("sharegpt", {"conversations"}),
                        ("alpaca", {"instruction", "output"}), ("prompt_completion", {"prompt", "completion"})):
        if needed <= keys:
            return fmt
    raise BadFileError(f"{where}: cannot tell the format from the fields {sorted(keys)}; expected messages, "
                       "instruction+output or prompt+completion, or name the fields with a column mapping "
                       "(columns={'instruction': ..., 'output': ...})")


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise BadFileError(f"{where}: no field {key!r} (fields: {sorted(record)})")
    if not isinstance(value, str):
        raise BadFileError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise BadFileError(f"{where}: field {key!r} is empty")
    return value


def parse_message(m, where: str, label: str) -> dict:
    """One {role, content} message of a record, checked: a known role and string content."""
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise BadFileError(f"{where}: {label} needs 'role' and 'content', got {m!r:.80}")
    if m["role"] not in ROLES:
        raise BadFileError(f"{where}: {label} has unknown role {m['role']!r} (expected one of {ROLES})")
    if not isinstance(m["content"], str):
        raise BadFileError(f"{where}: {label} ({m['role']}) has non-string content")
    return {"role": m["role"], "content": m["content"]}


def _check_messages(messages, where: str, field_name: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise BadFileError(f"{where}: field {field_name!r} must be a non-empty list of messages")
    out = [parse_message(m, where, f"{field_name}[{i}]") for i, m in enumerate(messages)]
    for i, m in enumerate(out):
        if m["role"] == "system" and i != 0:
            raise BadFileError(f"{where}: {field_name}[{i}] is a system message; only the first may be")
        if not m["content"].strip():
            raise BadFileError(f"{where}: {field_name}[{i}] ({m['role']}) has empty content")
    if out[-1]["role"] != "assistant":
        raise BadFileError(f"{where}: the last message of {field_name!r} is from the {out[-1]['role']}, "
                           "not the assistant (there is nothing to train on)")
    return out


def _from_columns(record: dict, columns: dict, where: str) -> list[dict]:
    system = _text(record, columns["system"], where, required=False) if "system" in columns else ""
    user = _text(record, columns["instruction"], where)
    extra = _text(record, columns["input"], where, required=False) if "input" in columns else ""
    if extra.strip():
        user = f"{user}\n\n{extra}"
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [{"role": "user", "content": user},
                       {"role": "assistant", "content": _text(record, columns["output"], where)}]


def _to_example(record: dict, fmt: str, columns: dict, where: str) -> Example:
    if fmt == "chat" or (fmt == "columns" and "messages" in columns):
        key = columns.get("messages", "messages")
        if key not in record:
            raise BadFileError(f"{where}: no field {key!r}")
        messages, used = _check_messages(record[key], where, key), {key}
    elif fmt == "sharegpt":
        turns = record.get("conversations")
        if not isinstance(turns, list):
            raise BadFileError(f"{where}: no list field 'conversations'")
        messages = [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                    if isinstance(t, dict) else t for t in turns]
        messages, used = _check_messages(messages, where, "conversations"), {"conversations"}
    elif fmt == "prompt_completion":
        turns = []  # strings, or TRL's conversational form where either side is a list of messages
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            value = record.get(key)
            turns += list(value) if isinstance(value, list) else [{"role": role, "content": _text(record, key, where)}]
        messages, used = _check_messages(turns, where, "prompt+completion"), {"prompt", "completion"}
    else:  # alpaca, or a column mapping onto alpaca's fields
        messages, used = _from_columns(record, columns, where), set(columns.values())
    meta = {k: v for k, v in record.items() if k not in used}
    if isinstance(meta.get("meta"), dict):
        meta.update(meta.pop("meta"))
    return Example(messages=messages, meta=meta)


def read_examples(path: str | Path, format: str = "auto", columns: dict | None = None) -> list[Example]:
    """Read every example of `path` (see the module docstring for formats). `columns` maps our field names
    (instruction, input, output, system; or messages) to the file's, e.g. {"instruction": "Q", "output": "A"}."""
    if format not in FORMATS:
        raise BadConfigError(f"format must be one of {FORMATS}, got {format!r}")
    if columns:
        unknown = sorted(set(columns) - set(COLUMN_KEYS))
        if unknown or not ("messages" in columns or {"instruction", "output"} <= set(columns)):
            raise BadConfigError(f"columns {columns}: keys must be among {COLUMN_KEYS} (unknown: {unknown}) "
                                 "and include instruction and output, or messages")
        if format not in ("auto", "columns"):
            raise BadConfigError(f"a column mapping applies to format 'columns' (or 'auto'), not {format!r}")
        fmt = "columns"
    elif format == "columns":
        raise BadConfigError("format 'columns' needs a column mapping, "
                             "e.g. columns={'instruction': 'Q', 'output': 'A'}")
    else:
        fmt = format
    columns = dict(columns or ALPACA_COLUMNS)
    examples = []
    for where, record in read_records(path):
        if fmt == "auto":
            fmt = _detect(record, where)
        examples.append(_to_example(record, fmt, columns, where))
    if not examples:
        raise BadFileError(f"{path}: no examples (the file is empty)")
    return examples


# --- tokenizing --------------------------------------------------------------------------------------------

def tokenize_example(example: Example, tokenizer: Tokenizer, max_len: int) -> tuple[list[int], list[int]] | None:
    """(ids, loss_mask) of the rendered conversation (BOS included), or None when it has more than max_len ids."""
    ids, loss_mask = tokenizer.render(example.messages)
    return (ids, loss_mask) if len(ids) <= max_len else None


def load_sft_dataset(path: str | Path, tokenizer: Tokenizer, max_len: int, format: str = "auto",
                     columns: dict | None = None) -> tuple[list[tuple[list[int], list[int]]], dict]:
    """Read and tokenize `path`; drop examples longer than max_len ids. Returns the (ids, loss_mask) rows and
    stats {read, kept, dropped_too_long, longest, trained_tokens}. Raises BadFileError when every one is too long."""
    rows, longest = [], 0
    examples = read_examples(path, format, columns)
    for example in examples:
        ids, loss_mask = tokenizer.render(example.messages)
        longest = max(longest, len(ids))
        if len(ids) <= max_len:
            rows.append((ids, loss_mask))
    stats = {"read": len(examples), "kept": len(rows), "dropped_too_long": len(examples) - len(rows),
             "longest": longest, "trained_tokens": sum(sum(mask) for _, mask in rows)}
    if not rows:
        raise BadFileError(f"{path}: all {len(examples)} examples are longer than the context of {max_len} tokens "
                           f"(the longest has {longest}); use a longer context or shorter examples")
    return rows, stats
