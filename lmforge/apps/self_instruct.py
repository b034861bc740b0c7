"""Self-Instruct: a model writes new instructions from a few seed tasks, labels them classification or not,
writes input/output instances for them, and filters every step (Wang et al. 2022, `yizhongw/self-instruct`).

    lmforge data self-instruct --model CKPT --seeds seed_tasks.jsonl --n 100 --out self_instruct.jsonl

One round (the reference notes, applications.md §1):
1. **Instructions.** Each request shows `n_context` numbered instructions (6 human seeds + 2 from the machine
   pool once it has any, shuffled) and ends with the next number, so the model continues the list. Decoding
   as in the paper: T = 0.7, top-p 0.5, presence penalty 2. A response cut off by the length limit is dropped
   whole. Each candidate then passes the post-filters (`filter_instruction`: length, blacklist, "Write a
   program", bad first character) and the novelty filter: rejected when its ROUGE-L F-measure with any seed
   or kept instruction is > 0.7 (strictly).
2. **Classification or not.** A few-shot Yes/No prompt, greedy.
3. **Instances.** Output-first for classification (the class label, then an input for it: asking for inputs
   first lets the model favour one label), input-first otherwise; greedy with presence penalty 1.5.
4. **Instance filters.** Drop an instance whose output is empty, equals its input, or whose input or output
   ends with ":" (an unfinished generation), and the last one of a response cut off by the length limit;
   drop the whole task when one input gets different outputs; remove duplicates; keep at most 5 per task.

Every candidate gets a recorded fate, and the funnel counts them: instructions (`generated` = the sum of the
instruction fates), tasks (`kept_instructions` = the task fates) and instances (`instances_generated` = the
instance fates). Records are Alpaca `{instruction, input, output}` plus `meta` (is_classification, the most
similar seed or earlier instruction and its ROUGE-L), which `lmforge.data.instructions` reads as Alpaca.

The generator is any `CompleteFn` (prompts, params) -> [(text, finish_reason)]: an lmforge checkpoint or a
local Hugging Face causal LM through `model_complete_fn`, or a function with canned text in tests. Prompt
sizes are configurable (`n_context`, `n_shots`, the token budgets) so a 256-token model can run the loop;
a prompt longer than the context keeps its end, which holds the task being asked about.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from lmforge.errors import BadConfigError, BadFileError
from lmforge.infer.sampling import SamplingParams

CompleteFn = Callable[[list[str], SamplingParams], list[tuple[str, str]]]


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[tuple[str, str], ...]  # (input, output) pairs; input is "" when the task needs none
    is_classification: bool = False


# ---------------------------------------------------------------------------------------------------------
# Seed tasks


def read_seed_tasks(path: str) -> list[SeedTask]:
    """Seed tasks in the Self-Instruct format ({instruction, instances: [{input, output}], is_classification})
    or as Alpaca records ({instruction, input?, output}, taken as non-classification), each checked with the
    file and line named."""
    from lmforge.data.instructions import read_records

    seeds = []
    for where, record in read_records(path):
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadFileError(f"{where}: needs a non-empty 'instruction' string (fields: {sorted(record)})")
        if "instances" in record:
            instances = record["instances"]
            if not isinstance(instances, list) or not instances or not all(
                    isinstance(i, dict) and isinstance(i.get("input", ""), str) and isinstance(i.get("output"), str)
                    for i in instances):
                raise BadFileError(f"{where}: field 'instances' must be a non-empty list of "
                                   "{input, output} objects with string values")
            is_classification = record.get("is_classification", False)
            if not isinstance(is_classification, bool):
                raise BadFileError(f"{where}: field 'is_classification' must be true or false, "
                                   f"got {is_classification!r}")
            pairs = tuple((i.get("input", ""), i["output"]) for i in instances)
        elif "output" in record:
            if not isinstance(record["output"], str) or not isinstance(record.get("input", ""), str):
                raise BadFileError(f"{where}: fields 'input' and 'output' must be strings")
            pairs, is_classification = ((record.get("input", ""), record["output"]),), False
        else:
            raise BadFileError(f"{where}: a seed task needs 'instances' (Self-Instruct) or 'output' (Alpaca); "
                               f"fields: {sorted(record)}")
        seeds.append(SeedTask(instruction.strip(), pairs, is_classification))
    if not seeds:
        raise BadFileError(f"{path}: no seed tasks (the file is empty)")
    return seeds


# ---------------------------------------------------------------------------------------------------------
# Step 1: instructions, their filters and ROUGE-L novelty

INSTRUCTION_HEADER = "Come up with a series of tasks:"


def instruction_prompt(seed_instructions: Sequence[str], machine_instructions: Sequence[str], rng: random.Random,
                       n_context: int = 8, n_machine: int = 2) -> str:
    """`n_context` numbered instructions, up to `n_machine` of them from the machine pool and the rest human
    seeds, shuffled; the prompt ends with the next number for the model to continue. E.g. with 3:

        Come up with a series of tasks:
        1. Sort the list.
        2. Name a fruit that is yellow.
        3. Is the review positive or negative?
        4."""
    chosen = rng.sample(list(machine_instructions), min(n_machine, len(machine_instructions)))
    chosen += rng.sample(list(seed_instructions), min(n_context - len(chosen), len(seed_instructions)))
    rng.shuffle(chosen)
    lines = [INSTRUCTION_HEADER]
    for i, instruction in enumerate(chosen, 1):
        instruction = re.sub(r"\s+", " ", instruction).strip().rstrip(":")
        lines.append(f"{i}. {instruction}")
    return "\n".join(lines) + f"\n{len(chosen) + 1}."


def parse_instructions(text: str) -> list[str]:
    """The instructions in a continuation of the numbered list: the text up to the first "\\nN. " is the one
    the prompt asked for, then one per number. Whitespace is collapsed and the first letter capitalised
    (only the first: `str.capitalize` would lower-case names and acronyms in the rest)."""
    instructions = []
    for piece in re.split(r"\n\d+\s?\. ", text):
        piece = re.sub(r"\s+", " ", piece).strip()
        if piece:
            instructions.append(piece[0].upper() + piece[1:])
    return instructions


# Tasks a text-only model cannot do (Self-Instruct's list, plus Alpaca's additions from video on).
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
_BLACKLIST_RE = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in BLACKLIST) + r")\b", re.IGNORECASE)


def filter_instruction(instruction: str) -> str | None:
    """Why a candidate instruction is dropped before the novelty check, or None to keep it:
    too_short (<= 3 words), too_long (> 150), blacklist (a keyword as a whole word: "a map" is caught,
    "mapping" is not), write_a_program (the model tacked it onto many tasks, leaving unclear whether to write
    the program or the answer), bad_start (punctuation or a non-ASCII first character)."""
    words = len(instruction.split())
    if words <= 3:
        return "too_short"
    if words > 150:
        return "too_long"
    if _BLACKLIST_RE.search(instruction):
        return "blacklist"
    if instruction.lower().startswith("write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation or not instruction[0].isascii():
        return "bad_start"
    return None


def rouge_tokens(text: str) -> list[str]:
    """`rouge_score`'s default tokenizer without stemming: lower-case, runs of anything but [a-z0-9] split."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence by the textbook dynamic programme, one row at a time."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_tokens(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F-measure: LCS over tokens, F = 2PR / (P + R) with P = LCS/|a|, R = LCS/|b|; 0 when either side
    is empty. Computed in the order `rouge_score` uses, so the two agree to the last bit."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(a: str, b: str) -> float:
    return rouge_l_tokens(rouge_tokens(a), rouge_tokens(b))


class InstructionPool:
    """The instructions a candidate must differ from (seeds, then every kept one), tokenized once."""

    def __init__(self, instructions: Sequence[str] = ()):
        self.texts: list[str] = []
        self.tokens: list[list[str]] = []
        for text in instructions:
            self.add(text)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.tokens.append(rouge_tokens(text))

    def most_similar(self, text: str) -> tuple[str, float]:
        """The pool's instruction with the highest ROUGE-L against `text`, and that score ("", 0.0 when empty)."""
        tokens = rouge_tokens(text)
        best, best_score = "", 0.0
        for other, other_tokens in zip(self.texts, self.tokens):
            score = rouge_l_tokens(tokens, other_tokens)
            if score > best_score:
                best, best_score = other, score
        return best, best_score


# ---------------------------------------------------------------------------------------------------------
# Step 2: classification or not

CLASSIFICATION_HEADER = "Can the task be regarded as classification, with a finite set of output labels?"
CLASSIFICATION_EXEMPLARS = (  # (task, is it classification?), alternating so any prefix holds both answers
    ("Decide whether the review below is positive or negative.", True),
    ("Write a short poem about the sea.", False),
    ("Is the following statement true or false?", True),
    ("Summarise the paragraph in one sentence.", False),
    ("Label the email as spam or not spam.", True),
    ("Translate the sentence into Korean.", False),
    ("Does the answer match the question? Answer yes or no.", True),
    ("Suggest three names for a new bakery.", False),
    ("Which season does the given month belong to?", True),
    ("Explain why bread rises in the oven.", False),
)


def classification_prompt(instruction: str, n_shots: int = len(CLASSIFICATION_EXEMPLARS)) -> str:
    blocks = [CLASSIFICATION_HEADER]
    for task, is_classification in CLASSIFICATION_EXEMPLARS[:n_shots]:
        blocks.append(f"Task: {task}\nIs it classification? {'Yes' if is_classification else 'No'}")
    blocks.append(f"Task: {instruction}\nIs it classification?")
    return "\n\n".join(blocks)


def parse_is_classification(text: str) -> bool:
    """Yes (any case) as the first word; anything else counts as No, as in the reference pipeline."""
    return text.strip().lower().startswith("yes")


# ---------------------------------------------------------------------------------------------------------
# Step 3: instances, output-first or input-first

CLASSIFICATION_INSTANCE_HEADER = ("Given a classification task, write its class labels, each followed by an "
                                  "input of that class. If the task needs no input, only write the labels.")
GENERATION_INSTANCE_HEADER = ("Come up with examples for the following tasks. Give several when you can. If the "
                              "task needs no input, write the output directly.")
# Exemplars when the seeds hold no task of the kind asked for (Alpaca seeds have no classification tasks).
BUILTIN_CLASSIFICATION_TASKS = (
    SeedTask("Classify the sentiment of the review as positive or negative.",
             (("The soup was warm and the staff were kind.", "Positive"),
              ("We waited an hour and the bread was stale.", "Negative")), True),
    SeedTask("Is the number even or odd?", (("14", "Even"), ("7", "Odd")), True),
)
BUILTIN_GENERATION_TASKS = (
    SeedTask("Sort the numbers from smallest to largest.", (("5, 2, 9", "2, 5, 9"), ("10, 3", "3, 10"))),
    SeedTask("Name three fruits that are yellow.", (("", "Banana, lemon, pineapple."),)),
)


def _exemplar(task: SeedTask, is_classification: bool) -> str:
    lines = [f"Task: {task.instruction}"]
    if is_classification:
        for input, output in task.instances:
            lines.append(f"Class label: {output}")
            if input:
                lines.append(f"Input: {input}")
    elif len(task.instances) == 1 and not task.instances[0][0]:
        lines.append(f"Output: {task.instances[0][1]}")
    else:
        for k, (input, output) in enumerate(task.instances, 1):
            lines.append(f"Example {k}")
            if input:
                lines.append(f"Input: {input}")
            lines.append(f"Output: {output}")
    return "\n".join(lines)


def instance_prompt(instruction: str, is_classification: bool, exemplars: Sequence[SeedTask] | None = None) -> str:
    """Output-first for a classification task (each class label, then an input for it), input-first otherwise;
    the exemplars are tasks of the same kind (None: the built-in ones). Ends with the task, so the model writes
    its instances next."""
    if exemplars is None:
        exemplars = BUILTIN_CLASSIFICATION_TASKS if is_classification else BUILTIN_GENERATION_TASKS
    header = CLASSIFICATION_INSTANCE_HEADER if is_classification else GENERATION_INSTANCE_HEADER
    blocks = [header, *(_exemplar(task, is_classification) for task in exemplars)]
    return "\n\n".join(blocks) + f"\n\nTask: {instruction.strip()}\n"


_OUTPUT_RE = re.compile(r"Output\s*\d*\s*:")
_INPUT_RE = re.compile(r"Input\s*\d*\s*:")


def _input_output(text: str) -> tuple[str, str]:
    """"Input: x\\nOutput: y" -> (x, y); no "Output:" means the whole text is the output of a no-input task."""
    input, output = _OUTPUT_RE.split(text, maxsplit=1) if _OUTPUT_RE.search(text) else ("", text)
    output = _INPUT_RE.split(output, maxsplit=1)[0]  # a second pair run on without "Example k"
    return _strip_input_label(input), output.strip()


def _strip_input_label(text: str) -> str:
    text = text.strip()
    return _INPUT_RE.sub("", text, count=1).strip() if _INPUT_RE.match(text) else text


def parse_instances(text: str, is_classification: bool) -> list[tuple[str, str]]:
    """(input, output) pairs from an instance response, in the order written.

    Classification (output-first): "Class label: L\\nInput: x" blocks; the first line is the label (the
    output), the rest the input. Otherwise "Example k" blocks of "Input: x\\nOutput: y", or a single
    "Output: y" for a task without input. Text in neither shape yields no pairs."""
    if is_classification:
        if "Class label:" not in text:
            return []
        pairs = []
        for block in text.split("Class label:")[1:]:
            label, _, input = block.strip().partition("\n")
            pairs.append((_strip_input_label(input), label.strip()))
        return pairs
    example_re = re.compile(r"(?m)^\s*Example\s*\d*\s*[.:]?")
    if example_re.search(text):
        return [_input_output(block) for block in example_re.split(text) if block.strip()]
    if _OUTPUT_RE.search(text):
        return [_input_output(text)]
    return []


def clean_instances(pairs: list[tuple[str, str]], was_truncated: bool) -> tuple[list[tuple[str, str]], Counter]:
    """The instances that survive the filters, and the fate of each one that did not.

    The last instance of a truncated response is unfinished; an empty output, an output equal to its input,
    or a field ending in ":" (the model stopped before writing it) is no instance. When one non-empty input
    gets different outputs the task is ambiguous and dropped whole (`conflicting_task`); exact repeats go."""
    fates: Counter = Counter()
    if was_truncated and pairs:
        pairs, fates["instance_truncated"] = pairs[:-1], 1
    valid = []
    for input, output in pairs:
        if not output:
            fates["empty_output"] += 1
        elif input == output:
            fates["input_is_output"] += 1
        elif input.endswith(":") or output.endswith(":"):
            fates["ends_with_colon"] += 1
        else:
            valid.append((input, output))
    outputs_of: dict[str, set[str]] = {}
    for input, output in valid:
        if input:
            outputs_of.setdefault(input, set()).add(output)
    if any(len(outputs) > 1 for outputs in outputs_of.values()):
        fates["conflicting_task"] += len(valid)
        return [], fates
    unique = list(dict.fromkeys(valid))
    fates["duplicate_instance"] += len(valid) - len(unique)
    return unique, fates


# ---------------------------------------------------------------------------------------------------------
# The loop

INSTRUCTION_FATES = ("truncated", "too_short", "too_long", "blacklist", "write_a_program", "bad_start", "similar",
                     "surplus", "kept_instructions")
TASK_FATES = ("no_instances", "conflicting_outputs", "kept_tasks")
INSTANCE_FATES = ("instance_truncated", "empty_output", "input_is_output", "ends_with_colon", "conflicting_task",
                  "duplicate_instance", "over_limit", "records")


def self_instruct(complete_fn: CompleteFn, seeds: Sequence[SeedTask], n: int, seed: int = 0, *,
                  n_context: int = 8, n_machine: int = 2, requests_per_round: int = 8, max_rounds: int = 0,
                  instruction_params: SamplingParams | None = None, instance_max_new_tokens: int = 128,
                  n_shots: int = 4, max_instances: int = 5, threshold: float = 0.7,
                  progress: bool = False) -> tuple[list[dict], dict]:
    """Generate up to `n` new instructions from `seeds` and instances for them: (records, funnel).

    Rounds of `requests_per_round` instruction requests run until `n` instructions are kept or `max_rounds`
    (0: ten times the rounds `n` would need if each request gave one) have run; each round's new instructions
    are classified and given instances before the next. `instruction_params` defaults to the paper's decoding
    (T 0.7, top-p 0.5, presence penalty 2) with 128 new tokens (the paper: 1024; instances 300-350), which
    leaves a 256-token model room for its prompt. All randomness flows from `seed`."""
    if n < 1 or n_context < 1 or requests_per_round < 1 or max_instances < 1 or n_shots < 0:
        raise BadConfigError("self-instruct: n, n_context, requests_per_round and max_instances must be >= 1, "
                             "n_shots >= 0")
    if not 0 <= n_machine <= n_context:
        raise BadConfigError(f"self-instruct: n_machine must be in [0, n_context={n_context}], got {n_machine}")
    rng = random.Random(seed)
    max_rounds = max_rounds or 10 * math.ceil(n / requests_per_round)
    base = instruction_params or SamplingParams(max_new_tokens=128, temperature=0.7, top_p=0.5,
                                                presence_penalty=2.0)
    # The model may add as many instructions as it was shown, less one (8 shown: stop at "16."). Only the
    # line-start forms of that number stop it: a bare "8." ends many ordinary sentences.
    stop_number = 2 * n_context
    instruction_params = replace(base, stop=("\n\n", f"\n{stop_number}.", f"\n{stop_number} ."))
    classify_params = SamplingParams(max_new_tokens=3, temperature=0, stop=("\n", "Task"))
    instance_params = SamplingParams(max_new_tokens=instance_max_new_tokens, temperature=0, presence_penalty=1.5,
                                     stop=(f"Example {max_instances + 1}", "Task:"))
    seed_instructions = [s.instruction for s in seeds]
    # Instance exemplars are seed tasks of the kind asked for, or the built-in ones when the seeds have none.
    exemplar_pools = {True: [s for s in seeds if s.is_classification] or list(BUILTIN_CLASSIFICATION_TASKS),
                      False: [s for s in seeds if not s.is_classification] or list(BUILTIN_GENERATION_TASKS)}
    pool = InstructionPool(seed_instructions)
    machine: list[str] = []
    funnel = Counter({key: 0 for key in ("responses", "generated", *INSTRUCTION_FATES, "classification",
                                         *TASK_FATES, "instances_generated", *INSTANCE_FATES)})
    records: list[dict] = []
    bar = tqdm(total=n, desc="self-instruct", unit="instruction", disable=not progress)
    rounds = 0
    while len(machine) < n and rounds < max_rounds:
        rounds += 1
        # --- 1. instructions
        prompts = [instruction_prompt(seed_instructions, machine, rng, n_context, n_machine)
                   for _ in range(requests_per_round)]
        responses = complete_fn(prompts, replace(instruction_params, seed=rng.randrange(2 ** 31)))
        funnel["responses"] += len(responses)
        new: list[tuple[str, str, float]] = []  # (instruction, most similar, its ROUGE-L)
        for text, finish_reason in responses:
            candidates = parse_instructions(text)
            funnel["generated"] += len(candidates)
            if finish_reason == "length":  # the list was cut off: the reference drops the whole response
                funnel["truncated"] += len(candidates)
                continue
            for candidate in candidates:
                if len(machine) >= n:
                    funnel["surplus"] += 1
                    continue
                reason = filter_instruction(candidate)
                if reason:
                    funnel[reason] += 1
                    continue
                nearest, similarity = pool.most_similar(candidate)
                if similarity > threshold:
                    funnel["similar"] += 1
                    continue
                funnel["kept_instructions"] += 1
                machine.append(candidate)
                pool.add(candidate)
                new.append((candidate, nearest, similarity))
        if not new:
            bar.set_postfix(round=rounds)
            continue
        # --- 2. classification or not
        replies = complete_fn([classification_prompt(instr, n_shots) for instr, _, _ in new], classify_params)
        kinds = [parse_is_classification(text) for text, _ in replies]
        funnel["classification"] += sum(kinds)
        # --- 3. instances
        prompts = []
        for (instr, _, _), is_classification in zip(new, kinds):
            candidates = exemplar_pools[is_classification]
            prompts.append(instance_prompt(instr, is_classification,
                                           rng.sample(candidates, min(n_shots, len(candidates)))))
        outputs = complete_fn(prompts, instance_params)
        # --- 4. instance filters
        for (instr, nearest, similarity), is_classification, (text, finish_reason) in zip(new, kinds, outputs):
            pairs = parse_instances(text, is_classification)
            funnel["instances_generated"] += len(pairs)
            kept, fates = clean_instances(pairs, finish_reason == "length")
            funnel.update(fates)
            if fates["conflicting_task"]:
                funnel["conflicting_outputs"] += 1
                continue
            if not kept:
                funnel["no_instances"] += 1
                continue
            if len(kept) > max_instances:
                funnel["over_limit"] += len(kept) - max_instances
                kept = rng.sample(kept, max_instances)
            funnel["kept_tasks"] += 1
            funnel["records"] += len(kept)
            records += [{"instruction": instr, "input": input, "output": output,
                         "meta": {"is_classification": is_classification, "most_similar": nearest,
                                  "rouge_l": similarity}} for input, output in kept]
        bar.update(len(new))
        bar.set_postfix(round=rounds)
    bar.close()
    return records, {**funnel, "rounds": rounds}


def format_funnel(funnel: dict) -> str:
    """The funnel as three blocks: instructions, tasks, instances, each starting from its total."""
    def block(title: str, total_key: str, keys: Sequence[str]) -> list[str]:
        return [f"{title}: {funnel[total_key]}"] + [f"  {key:20s} {funnel[key]:6d}" for key in keys]

    return "\n".join([f"{funnel['rounds']} rounds, {funnel['responses']} instruction responses"]
                     + block("instructions generated", "generated", INSTRUCTION_FATES)
                     + block("tasks (kept instructions)", "kept_instructions", TASK_FATES)
                     + [f"  classification       {funnel['classification']:6d}"]
                     + block("instances generated", "instances_generated", INSTANCE_FATES))


# ---------------------------------------------------------------------------------------------------------
# A generator backed by a model


def model_complete_fn(model, tokenizer, batch_size: int = 32) -> CompleteFn:
    """Raw-text completion with the engine (no chat template: the prompts are lists to continue). A prompt
    too long for the context keeps its last tokens; how many were cut is kept in `complete.truncated`. A
    seeded params gives prompt i the seed + i, so the requests of one call draw independently."""
    from lmforge.infer.engine import Engine

    def complete(prompts: list[str], params: SamplingParams) -> list[tuple[str, str]]:
        engine = Engine(model, tokenizer, max_batch_size=batch_size)
        room = engine.max_len - params.max_new_tokens
        if room < 1:
            raise BadConfigError(f"max_new_tokens {params.max_new_tokens} leaves no room for a prompt in the "
                                 f"model's context of {engine.max_len} tokens")
        ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
        complete.truncated += sum(len(x) > room for x in ids)
        per_prompt = [params if params.seed is None else replace(params, seed=params.seed + i)
                      for i in range(len(prompts))]
        outputs = engine.generate([x[-room:] for x in ids], per_prompt)
        return [(o.text, o.finish_reason) for o in outputs]

    complete.truncated = 0
    return complete


# ---------------------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class SelfInstructConfig:
    model: str = ""
    """The generator: an lmforge checkpoint or a local Hugging Face causal LM directory (a base model is fine:
    the prompts are plain text to continue)."""
    seeds: str = ""
    """Seed tasks: Self-Instruct JSONL ({instruction, instances: [{input, output}], is_classification}) or
    Alpaca records ({instruction, input, output})."""
    n: int = 100
    """How many new instructions to keep (each gets up to --max-instances instances)."""
    out: str = "self_instruct.jsonl"
    """Alpaca JSONL records with `meta`; the funnel and the config go beside it (self_instruct.funnel.json)."""
    seed: int = 0
    """Seeds every choice: in-context examples, sampling, instance subsets."""
    n_context: int = 8
    """Instructions shown per request (the paper: 8); use fewer (e.g. 4) for a short-context model."""
    n_machine: int = 2
    """How many of them come from the kept machine instructions once there are any (the paper: 2)."""
    requests_per_round: int = 8
    """Instruction requests per round; each round's new instructions get their instances before the next."""
    max_rounds: int = 0
    """Give up after this many rounds (a model whose every candidate is filtered would loop forever);
    0: ten times the rounds --n needs if each request kept one instruction."""
    temperature: float = 0.7
    """Instruction sampling temperature (the paper's; classification and instances are greedy)."""
    top_p: float = 0.5
    """Instruction nucleus sampling (the paper's)."""
    presence_penalty: float = 2.0
    """The paper's value; lmforge accepts -2..2, like the API the paper used."""
    frequency_penalty: float = 0.0
    """Instruction frequency penalty (the paper: 0)."""
    max_new_tokens: int = 128
    """Longest instruction-list continuation (the paper: 1024; a 256-token model needs room for the prompt)."""
    instance_max_new_tokens: int = 128
    """Longest instance response (the paper: 300-350)."""
    n_shots: int = 4
    """Exemplars in the classification and instance prompts (instance exemplars are seed tasks of the kind
    asked for, built-in ones when the seeds have none)."""
    max_instances: int = 5
    """Most instances kept per task (sampled with --seed when there are more)."""
    threshold: float = 0.7
    """Reject an instruction whose ROUGE-L with any seed or kept instruction is above this."""
    device: str = "auto"
    progress: bool = True


def funnel_path(out: str) -> Path:
    return Path(out).with_suffix(".funnel.json")


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def run_self_instruct(cfg: SelfInstructConfig) -> dict:
    from lmforge.data.preferences import write_jsonl
    from lmforge.hf import load_model
    from lmforge.train.loop import pick_device

    if not cfg.model or not cfg.seeds:
        raise BadConfigError("give --model GENERATOR and --seeds SEED_TASKS.jsonl")
    if not Path(cfg.model).exists():
        raise BadFileError(f"{cfg.model}: no such model directory")
    seeds = read_seed_tasks(cfg.seeds)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            presence_penalty=cfg.presence_penalty, frequency_penalty=cfg.frequency_penalty)
    model, tokenizer = load_model(cfg.model, device=pick_device(cfg.device))
    complete_fn = model_complete_fn(model, tokenizer)
    records, funnel = self_instruct(
        complete_fn, seeds, cfg.n, cfg.seed, n_context=cfg.n_context, n_machine=cfg.n_machine,
        requests_per_round=cfg.requests_per_round, max_rounds=cfg.max_rounds, instruction_params=params,
        instance_max_new_tokens=cfg.instance_max_new_tokens, n_shots=cfg.n_shots,
        max_instances=cfg.max_instances, threshold=cfg.threshold, progress=cfg.progress)
    funnel["truncated_prompts"] = complete_fn.truncated
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, records)
    _write_json(funnel_path(cfg.out), {"funnel": funnel, "config": asdict(cfg)})
    print(format_funnel(funnel))
    if complete_fn.truncated:
        print(f"{complete_fn.truncated} prompts were longer than the context and lost their beginning")
    print(f"{len(records)} records -> {out} (funnel: {funnel_path(cfg.out)})")
    return funnel
