"""Prompting measured: the world's arithmetic word problems (1-3 steps) asked five ways.

- **zero-shot**: "Q: {problem}⏎A: The answer (arabic numerals) is" — no reasoning, no examples;
- **few-shot**: k solved problems whose answers are bare ("The answer is 11.");
- **few-shot CoT**: the same problems with their worked steps ("4 + 7 = 11. The answer is 11.");
- **zero-shot CoT**: "Let's think step by step." then, in a second generation, "Therefore, the answer ... is";
- **self-consistency**: n few-shot-CoT paths sampled at a temperature, answers extracted, majority vote.

A base model reads plain text (layouts of `infer/prompting.py`); a chat model gets the question as its user
turn, exemplars as earlier turns, and the triggers as the start of its own turn (a prefill). Accuracy is
reported overall and by number of steps, since reasoning should matter more as problems get longer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

from lmforge.infer.engine import Engine
from lmforge.infer.prompting import (ANSWER_TRIGGER, COT_FORMAT, COT_TRIGGER, DIRECT_FORMAT, DIRECT_TRIGGER,
                                     choose_exemplars, extract_answer, few_shot_messages, few_shot_prompt,
                                     majority_vote, zero_shot_cot)
from lmforge.infer.sampling import SamplingParams

METHODS = ("zero_shot", "few_shot", "few_shot_cot", "zero_shot_cot", "self_consistency")
TEXT_STOPS = ("\n\n", "\nQ:")  # the next exemplar would begin here


@dataclass(frozen=True)
class PromptingConfig:
    k: int = 2
    """Solved exemplars in few-shot prompts (fewer when they do not fit the context)."""
    n_paths: int = 5
    """Sampled reasoning paths per problem for self-consistency."""
    temperature: float = 0.7
    max_new_tokens: int = 64
    answer_tokens: int = 12
    """Tokens for the second stage of zero-shot CoT (the answer after the trigger)."""
    seed: int = 0


def arithmetic_doc(record: dict) -> dict:
    """A world arithmetic record as a prompting doc: question, worked reasoning, answer, steps."""
    answer = str(record["meta"]["answer"])
    reasoning = record["output"].removesuffix(f"The answer is {answer}.").strip()
    return {"question": record["input"], "reasoning": reasoning, "answer": answer, "steps": record["meta"]["steps"]}


class _Asker:
    """Builds token prompts for one model in its layout (plain text or chat) and runs them through the engine."""

    def __init__(self, model, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.engine = Engine(model, tokenizer, max_batch_size=32)

    def prompt(self, doc: dict, exemplars=(), fmt=DIRECT_FORMAT, prefill: str = "", budget: int = 0) -> list[int]:
        """Exemplars are dropped from the front until the prompt leaves `budget` tokens for the answer."""
        exemplars = list(exemplars)
        while True:
            ids = self._render(doc, exemplars, fmt, prefill)
            if len(ids) + budget <= self.engine.max_len or not exemplars:
                return ids[-(self.engine.max_len - budget):]
            exemplars.pop(0)

    def _render(self, doc, exemplars, fmt, prefill) -> list[int]:
        if self.chat:
            messages = few_shot_messages(doc, exemplars, replace(fmt, doc_to_text="{question}"))
            # the prefill starts the assistant's content, which follows the role token with no space
            return self.tokenizer.render_prompt(messages) + (self.tokenizer.encode(prefill) if prefill else [])
        text = few_shot_prompt(doc, exemplars, fmt) + (" " + prefill if prefill else "")
        return self.tokenizer.encode(text, add_bos=True)

    def generate(self, prompts, max_new_tokens: int, **sampling) -> list[list[str]]:
        params = SamplingParams(max_new_tokens=max_new_tokens, stop=() if self.chat else TEXT_STOPS,
                                **{"temperature": 0.0, **sampling})
        by_prompt = defaultdict(list)
        for out in self.engine.generate(prompts, params):
            by_prompt[out.prompt_index].append(out.text)
        return [by_prompt[i] for i in range(len(prompts))]


def second_stage_prompt(tokenizer, stage1_ids: list[int], reasoning: str) -> list[int]:
    return stage1_ids + tokenizer.encode(" " + reasoning.strip() + "\n" + ANSWER_TRIGGER)


def arithmetic_prompting(model, tokenizer, records: list[dict], train_records: list[dict], chat: bool,
                         cfg: PromptingConfig = PromptingConfig()) -> dict:
    """{method: {"accuracy", "n", "by_steps": {steps: accuracy}, "example": (prompt, response)}}."""
    docs = [arithmetic_doc(r) for r in records]
    pool = [arithmetic_doc(r) for r in train_records]
    shots = [choose_exemplars(pool, min(cfg.k, len(pool)), seed=cfg.seed + i) for i in range(len(docs))]
    ask = _Asker(model, tokenizer, chat)
    n_new, n_answer = cfg.max_new_tokens, cfg.answer_tokens
    answers: dict[str, list[str | None]] = {}
    shown: dict[str, tuple[str, str]] = {}

    def run(method, prompts, n_tokens, extract, **sampling):
        outs = ask.generate(prompts, n_tokens, **sampling)
        answers[method] = [extract(o) for o in outs]
        shown[method] = (tokenizer.decode(prompts[0], skip_special=False), " | ".join(outs[0]))

    def first(method):
        return lambda outs: extract_answer(outs[0], method)

    # The zero-shot prompt ends inside the answer sentence, so its first number is the answer.
    zero = [ask.prompt(d, prefill=DIRECT_TRIGGER, budget=n_answer) for d in docs]
    run("zero_shot", zero, n_answer, first("first_number"))
    # Few-shot gets the reasoning budget too: a model that works the problem out despite bare-answer exemplars
    # must not be cut off before its answer.
    run("few_shot", [ask.prompt(d, s, DIRECT_FORMAT, budget=n_new) for d, s in zip(docs, shots)], n_new,
        first("after_phrase"))
    cot = [ask.prompt(d, s, COT_FORMAT, budget=n_new) for d, s in zip(docs, shots)]
    run("few_shot_cot", cot, n_new, first("after_phrase"))

    # Zero-shot CoT: stage 1 writes the reasoning, stage 2 reads the answer after the answer trigger. Appending
    # the reasoning's tokens to the stage-1 ids gives, for a base model, the ids of the text layout
    # `zero_shot_cot_answer_prompt` (a test checks it); for a chat model it continues the assistant's turn.
    stage1 = [ask.prompt(d, prefill=COT_TRIGGER, budget=n_new) for d in docs]
    room = ask.engine.max_len - n_answer
    seen = []

    def generate(prompts: list[list[int]]) -> list[str]:
        seen.append(prompts[0])
        return [outs[0] for outs in ask.generate(prompts, n_new if len(seen) == 1 else n_answer)]

    two_stage = zero_shot_cot(stage1, generate, lambda ids, reasoning: second_stage_prompt(tokenizer, ids, reasoning)[-room:])
    answers["zero_shot_cot"] = [answer for _, answer in two_stage]
    shown["zero_shot_cot"] = (tokenizer.decode(seen[-1], skip_special=False), two_stage[0][0])

    run("self_consistency", cot, n_new, lambda outs: majority_vote([extract_answer(o) for o in outs]),
        temperature=cfg.temperature, n=cfg.n_paths, seed=cfg.seed)

    result = {}
    for method in METHODS:
        right = [a == d["answer"] for a, d in zip(answers[method], docs)]
        by_steps = defaultdict(list)
        for ok, d in zip(right, docs):
            by_steps[d["steps"]].append(ok)
        result[method] = {"accuracy": sum(right) / max(len(right), 1), "n": len(right),
                          "by_steps": {s: sum(v) / len(v) for s, v in sorted(by_steps.items())},
                          "example": shown[method]}
    return result

