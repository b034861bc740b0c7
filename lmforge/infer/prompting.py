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

Chain of thought (evaluation.md §5-6):

- **few-shot CoT** needs no new layout: its exemplars are ordinary ones whose target holds the reasoning
  (`COT_FORMAT`: "Q: ...⏎A: 4 + 7 = 11. The answer is 11."); the answer is read after "The answer is";
- **zero-shot CoT** is two generations: the reasoning after `"Q: {question}⏎A: Let's think step by step."`,
  then the answer after that text + the reasoning + `"⏎Therefore, the answer (arabic numerals) is"`; the answer
  is the first number of the *second* generation;
- **self-consistency** samples n reasoning paths (few-shot CoT at a temperature), extracts each answer and
  takes the majority.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

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


# -- chain of thought ---------------------------------------------------------------------------------------

COT_TRIGGER = "Let's think step by step."
ANSWER_TRIGGER = "Therefore, the answer (arabic numerals) is"
DIRECT_TRIGGER = "The answer (arabic numerals) is"  # the zero-shot baseline without reasoning
QA_TEXT = "Q: {question}\nA:"
DIRECT_FORMAT = FewShotFormat(doc_to_text=QA_TEXT, doc_to_target="The answer is {answer}.")
COT_FORMAT = FewShotFormat(doc_to_text=QA_TEXT, doc_to_target="{reasoning} The answer is {answer}.")


def zero_shot_prompt(question: str) -> str:
    return f"{QA_TEXT.format(question=question)} {DIRECT_TRIGGER}"


def zero_shot_cot_prompt(question: str, trigger: str = COT_TRIGGER) -> str:
    """Stage 1 of zero-shot CoT: the model continues with its reasoning."""
    return f"{QA_TEXT.format(question=question)} {trigger}"


def zero_shot_cot_answer_prompt(question: str, reasoning: str, trigger: str = COT_TRIGGER,
                                answer_trigger: str = ANSWER_TRIGGER) -> str:
    """Stage 2: the stage-1 prompt, the reasoning it produced, and the answer trigger the model completes."""
    return f"{zero_shot_cot_prompt(question, trigger)} {reasoning.strip()}\n{answer_trigger}"


def zero_shot_cot(stage1_prompts: Sequence, generate: Callable[[list], list[str]],
                  second_prompt: Callable[[object, str], object]) -> list[tuple[str, str | None]]:
    """Run zero-shot CoT's two generations: `generate(prompts) -> texts` writes the reasoning after each stage-1
    prompt, then the answer after `second_prompt(stage1_prompt, reasoning)` (which appends the reasoning and
    the answer trigger). Returns (reasoning, answer) per prompt; the answer is the first number of the second
    generation, never a number from the reasoning. Prompts may be text or token ids: only the callables see them."""
    reasonings = generate(list(stage1_prompts))
    answers = generate([second_prompt(p, r) for p, r in zip(stage1_prompts, reasonings)])
    return [(r, extract_answer(a, "first_number")) for r, a in zip(reasonings, answers)]


_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def _clean_number(text: str) -> str:
    number = text.rstrip(".")
    return number[:-2] if number.endswith(".0") else number


def extract_answer(text: str, method: Literal["after_phrase", "first_number"] = "after_phrase") -> str | None:
    """The numeric answer in a generation, or None.

    "after_phrase" (few-shot and CoT outputs): the first number after the first "The answer is", else the last
    number in the text. "first_number" (the second stage of zero-shot CoT, whose generation starts where the
    answer trigger ends): the first number. Commas are dropped first ("1,200" is 1200), a trailing "." too.
    """
    text = text.replace(",", "")
    if method == "first_number":
        found = _NUMBER.search(text)
        return _clean_number(found.group()) if found else None
    if method != "after_phrase":
        raise BadConfigError(f"answer extraction must be 'after_phrase' or 'first_number', got {method!r}")
    phrase = _ANSWER_IS.search(text)
    if phrase:
        found = _NUMBER.search(text, phrase.end())
        if found:
            return _clean_number(found.group())
    numbers = _NUMBER.findall(text)
    return _clean_number(numbers[-1]) if numbers else None


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most common extracted answer (None, a path with no answer, never wins); a tie goes to the answer
    reached first, so the vote is deterministic."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)
