"""Preference data in every common format -> pairs (prompt, chosen, rejected) or rankings (prompt, responses best first).

Formats (`read_pairs(path, format="auto")` and `read_ranked` pick one from the keys of the first record):

    pairs     {"prompt", "chosen", "rejected"}   strings, or message lists (TRL's conversational form: prompt
              messages, then chosen/rejected lists ending with the assistant's answer); without "prompt" the two
              lists are whole conversations and the prompt is their longest shared prefix (TRL's implicit prompt)
    ranked    {"prompt", "responses": [best, ..., worst]}            prompt a string or a message list
    hh_rlhf   {"chosen", "rejected"} as Anthropic HH-RLHF transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."
    sharegpt  {"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": {...}}
              (LLaMA-Factory's ranking data, e.g. its dpo_en_demo.json; from: system/human/gpt)

Files: whatever `instructions.read_records` reads: JSON lines (also gzip-compressed, as HH-RLHF ships its
.jsonl.gz), a .json list, a local `datasets` directory, a Hub name. Both readers take every format: a pair is a
ranking of two, and a ranking of K gives its C(K,2) pairs. A reward model should train on the rankings themselves
(read_ranked): InstructGPT found that shuffling a prompt's C(K,2) pairs into one dataset overfits within an epoch,
and scores all of them as one batch element instead (alignment.md §2).

Records that cannot teach anything are skipped, never fatal, and counted per reason with the first place each
occurred: identical chosen and rejected (the DPO margin is then 0 whatever the weights, so the pair only dilutes
the batch; HH-RLHF's test splits hold 36), an empty response, a ranking of one response. `drop_too_long` adds pairs
longer than the context: dropped, not truncated, as TRL does, since a cut response loses its EOS and two responses
cut at different places compare fragments. It is an error only when nothing usable remains. Malformed records
(bad JSON, a missing field, a wrong type, an unknown role) are `BadFileError`s naming `file:line`
(`file: record i` in a JSON list), as in instructions.py.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Callable

from lmforge.data.instructions import SHAREGPT_ROLES, parse_message, read_records
from lmforge.errors import BadConfigError, BadFileError

FORMATS = ("auto", "pairs", "ranked", "hh_rlhf", "sharegpt")
HH_ASSISTANT = "\n\nAssistant:"
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # some copies strip the transcript's leading "\n\n"
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class Pair:
    prompt: list[dict]  # [{"role", "content"}, ...], system only first, the last the user's
    chosen: str  # the preferred assistant response
    rejected: str
    source: str  # "file:line" of the record, for messages


@dataclass(frozen=True)
class Ranked:
    prompt: list[dict]
    responses: list[str]  # best first
    source: str


# --- reading records ---------------------------------------------------------------------------------------

def _detect(record: dict, where: str) -> str:
    keys = set(record)
    if {"conversations", "chosen", "rejected"} <= keys:
        return "sharegpt"
    if {"prompt", "responses"} <= keys:
        return "ranked"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "pairs"
    if {"chosen", "rejected"} <= keys:  # strings: HH-RLHF transcripts; message lists: TRL's implicit prompt
        return "hh_rlhf" if isinstance(record["chosen"], str) else "pairs"
    raise BadFileError(f"{where}: cannot tell the preference format from the fields {sorted(keys)}; expected "
                       "prompt+chosen+rejected, prompt+responses, chosen+rejected or conversations+chosen+rejected")


def _field(record: dict, key: str, where: str):
    if record.get(key) is None:
        raise BadFileError(f"{where}: no field {key!r} (fields: {sorted(record)})")
    return record[key]


def _messages(value, where: str, name: str, role: str) -> list[dict]:
    """A string (one message from `role`) or a list of {role, content} messages, checked."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise BadFileError(f"{where}: field {name!r} must be a string or a non-empty list of messages")
    return [parse_message(m, where, f"{name}[{i}]") for i, m in enumerate(value)]


# --- records -> (prompt, responses best first) -------------------------------------------------------------

def _split_shared(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list[dict], list[str]]:
    """Split two conversations at their longest shared message prefix; each must then have one assistant
    message left. [u, a1, u2, a2] vs [u, a1, u2, a2'] -> prompt [u, a1, u2], responses [a2, a2']."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if chosen == rejected:  # skipped later as identical; the prompt is all but the answer
        n = len(chosen) - 1
    tails = chosen[n:], rejected[n:]
    if any(len(tail) != 1 or tail[0]["role"] != "assistant" for tail in tails):
        raise BadFileError(f"{where}: chosen and rejected must differ only in their last message, the assistant's "
                           f"(they differ from message {n} on: {len(tails[0])} vs {len(tails[1])} messages left)")
    return chosen[:n], [tails[0][0]["content"], tails[1][0]["content"]]


def _from_pairs(record: dict, where: str) -> tuple[list[dict], list[str]]:
    chosen, rejected = (_messages(_field(record, key, where), where, key, "assistant") for key in ("chosen", "rejected"))
    if record.get("prompt") is not None:
        prompt = _messages(record["prompt"], where, "prompt", "user")
    elif isinstance(record["chosen"], str):
        raise BadFileError(f"{where}: no field 'prompt' (chosen and rejected are strings, so they cannot carry the "
                           "conversation; for HH-RLHF transcripts use format='hh_rlhf')")
    else:
        prompt = []  # implicit prompt: the shared prefix of the two conversations
    return _split_shared(prompt + chosen, prompt + rejected, where)


def _from_ranked(record: dict, where: str) -> tuple[list[dict], list[str]]:
    responses = _field(record, "responses", where)
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise BadFileError(f"{where}: field 'responses' must be a non-empty list of strings, best first")
    return _messages(_field(record, "prompt", where), where, "prompt", "user"), list(responses)


def _from_hh_rlhf(record: dict, where: str) -> tuple[list[dict], list[str]]:
    chosen, rejected = (_field(record, key, where) for key in ("chosen", "rejected"))
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise BadFileError(f"{where}: HH-RLHF chosen and rejected must be transcript strings")
    # The two transcripts repeat the conversation and differ in the last assistant turn. Split at the last
    # "\n\nAssistant:" that both contain in full; the responses are what follows it:
    #   "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A colour?\n\nAssistant: Red."   (and "... Assistant: No.")
    #   -> prompt [user "Hi", assistant "Hello!", user "A colour?"], responses ["Red.", "No."]
    # A shared start of the answers ("There are many...") stays in both responses. A response that goes on to
    # write further turns itself (a few in the real files) keeps them as text: that is what was rated.
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        raise BadFileError(f"{where}: chosen and rejected share no '\\n\\nAssistant:' turn; expected HH-RLHF "
                           "transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...' that differ in the last answer")
    parts = HH_TURN.split(chosen[:cut])  # ["", "Human", " Hi", "Assistant", " Hello!", ...]
    if parts[0].strip():
        raise BadFileError(f"{where}: the transcript must start with '\\n\\nHuman:', got {parts[0]!r:.60}")
    prompt = [{"role": HH_ROLES[role], "content": text.strip()} for role, text in zip(parts[1::2], parts[2::2])]
    start = cut + len(HH_ASSISTANT)
    return prompt, [chosen[start:].strip(), rejected[start:].strip()]


def _from_sharegpt(record: dict, where: str) -> tuple[list[dict], list[str]]:
    turns = _field(record, "conversations", where)
    if not isinstance(turns, list):
        raise BadFileError(f"{where}: field 'conversations' must be a list of {{from, value}} turns")
    messages = [{"role": SHAREGPT_ROLES.get(t.get("from"), t.get("from")), "content": t.get("value")}
                if isinstance(t, dict) else t for t in turns]
    system = record.get("system")  # LLaMA-Factory may name the system prompt in its own column
    prompt = _messages(([{"role": "system", "content": system}] if system else []) + messages,
                       where, "conversations", "user")
    responses = []
    for key in ("chosen", "rejected"):
        value = _field(record, key, where)
        if isinstance(value, dict) and SHAREGPT_ROLES.get(value.get("from")) == "assistant":
            value = value.get("value")
        if not isinstance(value, str):
            raise BadFileError(f"{where}: field {key!r} must be a {{'from': 'gpt', 'value': str}} turn or a string")
        responses.append(value)
    return prompt, responses


PARSERS = {"pairs": _from_pairs, "ranked": _from_ranked, "hh_rlhf": _from_hh_rlhf, "sharegpt": _from_sharegpt}


def _check_prompt(prompt: list[dict], where: str) -> None:
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        raise BadFileError(f"{where}: the prompt must end with a non-empty user message, got {prompt[-1:]!r:.80}")
    if any(m["role"] == "system" for m in prompt[1:]):
        raise BadFileError(f"{where}: only the first prompt message may be a system message")


def _skip_reason(responses: list[str]) -> str | None:
    if len(responses) < 2:
        return "ranked list of one"  # nothing to compare it with
    if any(not r.strip() for r in responses):
        return "empty response"
    if len({r.strip() for r in responses}) < len(responses):
        return "identical chosen/rejected" if len(responses) == 2 else "identical responses"
    return None


def _count(skipped: dict, reason: str, where: str) -> None:
    skipped.setdefault(reason, {"count": 0, "first": where})["count"] += 1


def read_ranked(path: str | Path, format: str = "auto") -> tuple[list[Ranked], dict]:
    """Every usable record of `path` as a ranking (a pair is a ranking of two), and the skipped records as
    {reason: {"count", "first"}} with `first` the file:line of the first. Raises BadFileError when none is usable."""
    if format not in FORMATS:
        raise BadConfigError(f"format must be one of {FORMATS}, got {format!r}")
    fmt, ranked, skipped = format, [], {}
    for where, record in read_records(path):
        if fmt == "auto":
            fmt = _detect(record, where)
        prompt, responses = PARSERS[fmt](record, where)
        _check_prompt(prompt, where)
        reason = _skip_reason(responses)
        if reason:
            _count(skipped, reason, where)
        else:
            ranked.append(Ranked(prompt=prompt, responses=responses, source=where))
    if not ranked:
        why = format_skips(skipped, "records") if skipped else "the file is empty"
        raise BadFileError(f"{path}: no usable preference records ({why})")
    return ranked, skipped


def read_pairs(path: str | Path, format: str = "auto") -> tuple[list[Pair], dict]:
    """Every usable (prompt, chosen, rejected) pair of `path` (a ranking gives all its pairs), and the skipped
    records as in `read_ranked`."""
    ranked, skipped = read_ranked(path, format)
    return ranked_to_pairs(ranked), skipped


def ranked_to_pairs(ranked: list[Ranked]) -> list[Pair]:
    """All C(K,2) pairs of each ranking, the earlier (better) response chosen: [a, b, c] -> a>b, a>c, b>c."""
    return [Pair(prompt=r.prompt, chosen=r.responses[i], rejected=r.responses[j], source=r.source)
            for r in ranked for i, j in combinations(range(len(r.responses)), 2)]


def drop_too_long(pairs: list, length_fn: Callable[[list[dict], str], int], max_len: int) -> tuple[list, dict]:
    """Drop the pairs (or rankings) where prompt + any response is longer than max_len tokens, as measured by
    `length_fn(prompt, response)`, e.g. on the chat rendering that training uses:
        lambda prompt, response: len(tokenizer.render(prompt + [{"role": "assistant", "content": response}])[0])
    Returns (kept, {"longer than context": {"count", "first"}}); raises BadFileError when every one is too long."""
    kept, skipped, longest = [], {}, 0
    for item in pairs:
        responses = item.responses if isinstance(item, Ranked) else (item.chosen, item.rejected)
        length = max(length_fn(item.prompt, response) for response in responses)
        longest = max(longest, length)
        if length > max_len:
            _count(skipped, "longer than context", item.source)
        else:
            kept.append(item)
    if pairs and not kept:
        raise BadFileError(f"all {len(pairs)} pairs are longer than the context of {max_len} tokens (first "
                           f"{pairs[0].source}, the longest has {longest}); use a longer context or shorter data")
    return kept, skipped


def format_skips(skipped: dict, what: str = "pairs") -> str:
    """One log line: "skipped 3 pairs: 2 identical chosen/rejected (first data.jsonl:4), 1 empty response
    (first data.jsonl:9)"; "" when nothing was skipped."""
    reasons = ", ".join(f"{s['count']} {reason} (first {s['first']})" for reason, s in skipped.items())
    return f"skipped {sum(s['count'] for s in skipped.values())} {what}: {reasons}" if skipped else ""


# --- writing -----------------------------------------------------------------------------------------------

def write_jsonl(path: str | Path, records) -> None:
    # Written whole to a temporary file, then renamed: a stopped job never leaves half a file behind.
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_pairs(path: str | Path, pairs: list[Pair]) -> None:
    """Pairs as JSON lines in TRL's conversational form: prompt messages, chosen/rejected one-message lists."""
    write_jsonl(path, ({"prompt": p.prompt, "chosen": [{"role": "assistant", "content": p.chosen}],
                         "rejected": [{"role": "assistant", "content": p.rejected}]} for p in pairs))


def write_ranked(path: str | Path, ranked: list[Ranked]) -> None:
    """Rankings as JSON lines {prompt: messages, responses: [best, ..., worst]}."""
    write_jsonl(path, ({"prompt": r.prompt, "responses": list(r.responses)} for r in ranked))
