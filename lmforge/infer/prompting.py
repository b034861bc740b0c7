"""Few-shot prompts, laid out exactly as lm-evaluation-harness lays them out (evaluation.md §4).

A prompt is an optional instruction, k solved exemplars and the unsolved query:

    [description + fewshot_delimiter]
    + k × (doc_to_text(ex) + target_delimiter + doc_to_target(ex) + fewshot_delimiter)
    + doc_to_text(doc)

Worked example, doc_to_text = "Question: {question}\\nAnswer:", doc_to_target = "{answer}", the default
delimiters (" " and "\\n\\n"), description "Answer the questions." and two exemplars (⏎ is a newline):

    Answer the questions.⏎
    ⏎
    Question: Where does Mina live?⏎
    Answer: Velmora⏎
    ⏎
    Question: What is Mina's job?⏎
    Answer: baker⏎
    ⏎
    Question: What is Mina's favourite food?⏎
    Answer:                                       <- the model continues from here, " soup"

The target delimiter sits between the prompt and the answer, so a scored continuation starts with it (" soup"),
and generation stops at the few-shot delimiter (the model's next "\\n\\n" would open a new question).

Chat models get the same exemplars as a conversation ("few-shot as multi-turn"): each exemplar is a user turn
(doc_to_text) answered by an assistant turn (doc_to_target), the query is the last user turn, and
`Tokenizer.render_prompt` appends the assistant role token the model continues from. As in lm-eval, the system
turn is the system instruction and the description joined by the few-shot delimiter.

Exemplars are chosen by `choose_exemplars`, with lm-eval's samplers: a seeded random draw or the first k.
Chain-of-thought needs no new layout: its exemplars are ordinary ones whose target holds the reasoning, e.g.
doc_to_target = "{reasoning} The answer is {answer}."
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

from lmforge.errors import BadConfigError


@dataclass(frozen=True, kw_only=True)
class FewShotFormat:
    """How a task's examples become text. The templates are `str.format` strings over an example's keys."""

    doc_to_text: str  # e.g. "Question: {question}\nAnswer:"
    doc_to_target: str  # e.g. "{answer}"
    description: str = ""  # an instruction put before the exemplars
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"

    def text(self, doc: dict) -> str:
        return _fill(self.doc_to_text, doc, "doc_to_text")

    def target(self, doc: dict) -> str:
        return _fill(self.doc_to_target, doc, "doc_to_target")


def _fill(template: str, doc: dict, field: str) -> str:
    try:
        return template.format_map(doc)
    except KeyError as e:
        raise BadConfigError(
            f"{field} {template!r} needs key {e.args[0]!r}, but the example has only {sorted(doc)}"
        ) from None
    except (IndexError, ValueError) as e:  # "{}" or "{0}" fields, unbalanced braces
        raise BadConfigError(f"{field} {template!r}: not a template over named keys ({e})") from None


# -- exemplars ----------------------------------------------------------------------------------------------


def choose_exemplars(
    pool: Sequence[dict],
    k: int,
    seed: int,
    exclude: dict | None = None,
    method: Literal["random", "first"] = "random",
) -> list[dict]:
    """k exemplars from `pool`, never `exclude` (the evaluated doc, when the pool is its own split).

    lm-eval draws one extra exemplar when the doc may be in the pool and drops the doc afterwards, so that the
    other k are the same whether or not the doc was drawn. We draw one extra per copy of the doc in the pool
    (lm-eval draws exactly one, and returns k - 1 when the doc is there twice); with one copy the draws agree.
    "random" uses its own `random.Random(seed)`, never the global RNG, so a seed names one set of exemplars
    and re-running with other seeds measures the sensitivity to their choice and order.
    """
    if method not in ("random", "first"):
        raise BadConfigError(f"few-shot method must be 'random' or 'first', got {method!r}")
    if k < 0:
        raise BadConfigError(f"number of few-shot exemplars must be >= 0, got {k}")
    if k == 0:
        return []
    n_copies = 0 if exclude is None else sum(ex == exclude for ex in pool)
    if k > len(pool) - n_copies:
        raise BadConfigError(
            f"asked for {k} few-shot exemplars but the pool has only {len(pool) - n_copies}"
            + (f" (of {len(pool)}, without the evaluated doc)" if n_copies else "")
        )
    n_draw = k + n_copies
    drawn = random.Random(seed).sample(list(pool), n_draw) if method == "random" else list(pool[:n_draw])
    return [ex for ex in drawn if exclude is None or ex != exclude][:k]


# -- prompts ------------------------------------------------------------------------------------------------


def few_shot_prompt(doc: dict, exemplars: Sequence[dict], fmt: FewShotFormat) -> str:
    """The plain-text prompt for a base model; see the module docstring for the layout."""
    prompt = fmt.description + fmt.fewshot_delimiter if fmt.description else ""
    for ex in exemplars:
        prompt += fmt.text(ex) + fmt.target_delimiter + fmt.target(ex) + fmt.fewshot_delimiter
    return prompt + fmt.text(doc)


def few_shot_messages(
    doc: dict, exemplars: Sequence[dict], fmt: FewShotFormat, system: str | None = None
) -> list[dict]:
    """The same prompt as a chat: [system], then (user, assistant) per exemplar, then the query as a user turn.

    The delimiters are not needed here: the turn boundaries of the chat layout separate the pieces. Render with
    `Tokenizer.render_prompt`, which ends with the assistant role token.
    """
    system_prompt = fmt.fewshot_delimiter.join(part for part in (system, fmt.description) if part)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for ex in exemplars:
        messages.append({"role": "user", "content": fmt.text(ex)})
        messages.append({"role": "assistant", "content": fmt.target(ex)})
    messages.append({"role": "user", "content": fmt.text(doc)})
    return messages
