"""Benchmark tasks for `lmforge eval tasks`: readers for the real evaluation files, the world's clusters, and
the registry `TASKS` (name -> `Task`) the harness runs.

A task is data, not code to subclass: a reader that returns docs (plain dicts), the few-shot layout of
`infer/prompting.py`, and one of three request types (evaluation.md §1):

- **multiple_choice**: docs carry `choices` (texts) and `gold` (an index); each choice is scored by
  log-likelihood after the prompt. WinoGrande docs carry one context per choice (`contexts`) and a shared
  `continuation` instead: lm-eval's "partial" scoring, which puts the option in the context;
- **generate**: greedy (or sampled) text until a stop string, answers pulled out by the task's filters (regex,
  first line, ...) and judged against the doc (`judge(doc, answer) -> bool`);
- **rolling**: the log-likelihood of whole documents, for perplexity.

Every doc has `target` (the gold answer as text) for the per-example records. The real files are read from
the shared data folder (`data_root`), never copied into the project; a malformed file raises `BadFileError`
naming the file and the line. Where a file differs from the one lm-eval reads, the task's `notes` say how, and
the notes go into every results file.
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

from lmforge.data.world import build_world
from lmforge.data.world_tasks import all_clusters, prompt_text, score, task_records
from lmforge.errors import BadConfigError, BadFileError
from lmforge.evaluate.world_tasks import TEXT_FORMAT
from lmforge.infer.prompting import COT_FORMAT, FewShotFormat, extract_answer

WORLD_TEST_RECORDS = 100  # test records per world cluster when no --limit asks for more
WORLD_POOL_RECORDS = 50  # training records per cluster to draw world exemplars from


@dataclass(frozen=True)
class Sources:
    """Where the docs come from: the shared data folder, the world's seed, how many world records to make."""

    data_dir: Path
    world_seed: int = 0
    n_world: int = WORLD_TEST_RECORDS


@dataclass(frozen=True)
class Task:
    name: str
    kind: Literal["multiple_choice", "generate", "rolling"]
    load: Callable[[Sources], list[dict]]
    fmt: FewShotFormat = FewShotFormat(doc_to_text="{query}", doc_to_target="{target}")
    pool: Callable[[Sources], list[dict]] | None = None
    """Few-shot exemplars (a train or dev split); None: the set's other docs (the evaluated one left out)."""
    num_fewshot: int = 0
    metrics: tuple[str, ...] = ("acc", "acc_norm")  # multiple choice
    # -- generation --
    stop: tuple[str, ...] = ()
    filters: dict[str, Callable[[str], str | None]] = field(default_factory=dict)
    judge: Callable[[dict, str | None], bool] | None = None
    metric: str = "exact_match"
    max_gen_tokens: int = 256
    chat_fmt: FewShotFormat | None = None  # the user/assistant turns when generating through a chat template
    notes: str = ""


def shared_dir() -> Path:
    """The shared folder beside the checkout (`../shared`), or $LMFORGE_SHARED."""
    return Path(os.environ.get("LMFORGE_SHARED") or Path(__file__).resolve().parents[2].parent / "shared")


def data_root(data_dir: str = "") -> Path:
    """The data folder holding eval/ and pretrain/: --data-dir if given, else <shared>/data."""
    return Path(data_dir) if data_dir else shared_dir() / "data"


# --- file readers: each names the file and line of the first thing it cannot read ------------------------


def _file(src: Sources, relative: str) -> Path:
    path = src.data_dir / relative
    if not path.is_file():
        raise BadFileError(f"{path}: missing (point --data-dir or LMFORGE_SHARED at the shared data folder)")
    return path


def _records(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) per record of a JSONL file or a JSON list. A list is decoded one element at a
    time, so that an error in a pretty-printed file can name the line where the bad record starts."""
    text = path.read_text(encoding="utf-8")
    is_list = text.lstrip().startswith("[")
    decoder, rows, line, at = json.JSONDecoder(), [], 1, text.index("[") + 1 if is_list else 0
    try:
        while True:
            start = _GAP.match(text, at).end()
            line += text.count("\n", at, start)
            if start == len(text) or (is_list and text[start] == "]"):
                return rows
            row, at = decoder.raw_decode(text, start)
            if not isinstance(row, dict):
                raise BadFileError(f"{path}, line {line}: expected a JSON object")
            rows.append((line, row))
            line += text.count("\n", start, at)
    except json.JSONDecodeError as e:
        raise BadFileError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None


_GAP = re.compile(r"[\s,]*")  # between records: whitespace, and the commas of a list


def _need(row: dict, keys: tuple[str, ...], where: str) -> list[str]:
    missing = [k for k in keys if not isinstance(row.get(k), str)]
    if missing:
        raise BadFileError(f"{where}: missing text field(s) {missing}")
    return [row[k] for k in keys]


def _mc(query: str, choices: list[str], gold: int, where: str, **extra) -> dict:
    if not 0 <= gold < len(choices) or not all(choices):
        raise BadFileError(f"{where}: gold answer {gold + 1} of {len(choices)} choices, or an empty choice")
    return {"query": query, "choices": choices, "gold": gold, "target": choices[gold], **extra}


# GSM8K: {question, answer}; the answer is worked lines with <<calculator>> notes, then "#### N".
def read_gsm8k(path: Path) -> list[dict]:
    docs = []
    for line, row in _records(path):
        question, solution = _need(row, ("question", "answer"), f"{path}, line {line}")
        if "####" not in solution:
            raise BadFileError(f"{path}, line {line}: answer has no final '#### N'")
        work, answer = solution.rsplit("####", 1)
        # The CoT exemplar's reasoning: the worked lines on one line, calculator notes dropped
        # ("16 - 3 - 4 = <<16-3-4=9>>9 duck eggs" -> "16 - 3 - 4 = 9 duck eggs").
        reasoning = " ".join(re.sub(r"<<[^>]*>>", "", work).split())
        docs.append({"question": question, "solution": solution, "reasoning": reasoning,
                     "answer": answer.strip(), "target": answer.strip()})
    return docs


# ARC in its raw format: {id, question: {stem, choices: [{text, label}]}, answerKey}.
def read_arc(path: Path) -> list[dict]:
    docs = []
    for line, row in _records(path):
        try:
            question, key = row["question"], row["answerKey"]
            labels, choices = zip(*((c["label"], c["text"]) for c in question["choices"]))
            gold, stem = labels.index(key), question["stem"]
        except (KeyError, TypeError, ValueError):
            raise BadFileError(f"{path}, line {line}: not an ARC question (stem, choices, answerKey)") from None
        docs.append(_mc(f"Question: {stem}\nAnswer:", list(choices), gold, f"{path}, line {line}", id=row.get("id")))
    return docs


# LLM-Adapters instruction files inline the options in the instruction; these patterns take them back out.
_ADAPTERS = {
    "answer": re.compile(r"Please choose the correct answer to the question: (.*?)\n\n(Answer1: .*)\n\n"
                         r"Answer format: answer1(?:/answer\d)*", re.S),
    "solution": re.compile(r"Please choose the correct solution to the question: (.*?)\n\nSolution1: (.*)\n\n"
                           r"Solution2: (.*)\n\nAnswer format: solution1/solution2", re.S),
    "option": re.compile(r"Please choose the correct answer to fill in the blank to complete the given "
                         r"sentence: (.*?)\n\nOption1: (.*) Option2: (.*) Answer format: option1/option2", re.S),
}


def _adapters(path: Path, kind: str) -> list[tuple[str, re.Match, int]]:
    """(where, match, gold index) per record; the gold `answer` is "<kind>N", N counted from 1."""
    out = []
    for line, row in _records(path):
        where = f"{path}, line {line}"
        instruction, answer = _need(row, ("instruction", "answer"), where)
        match = _ADAPTERS[kind].fullmatch(instruction.strip())
        if match is None or not re.fullmatch(kind + r"\d", answer):
            raise BadFileError(f"{where}: instruction or answer not in the LLM-Adapters '{kind}' format")
        out.append((where, match, int(answer[len(kind):]) - 1))
    return out


def read_adapters_arc(path: Path) -> list[dict]:
    docs = []
    for where, m, gold in _adapters(path, "answer"):
        n_options = m.group(0).rsplit("Answer format: ", 1)[1].count("/") + 1
        choices = [c.strip() for c in re.split(r"(?:^| )Answer\d: ", m.group(2))[1:]]
        if len(choices) != n_options:
            raise BadFileError(f"{where}: {len(choices)} options found, the answer format lists {n_options}")
        docs.append(_mc(f"Question: {m.group(1).strip()}\nAnswer:", choices, gold, where))
    return docs


def read_piqa(path: Path) -> list[dict]:
    return [_mc(f"Question: {m.group(1).strip()}\nAnswer:", [m.group(2).strip(), m.group(3).strip()], gold, where)
            for where, m, gold in _adapters(path, "solution")]


def read_winogrande(path: Path) -> list[dict]:
    """lm-eval's partial scoring: the context is the sentence up to the blank with an option filled in, the
    scored continuation the rest of the sentence (the same for both options)."""
    docs = []
    for where, m, gold in _adapters(path, "option"):
        sentence = m.group(1).strip()
        blank = sentence.find("_")
        if blank < 0 or not sentence[blank + 1:].strip():
            raise BadFileError(f"{where}: no blank '_' with text after it")
        doc = _mc("", [m.group(2).strip(), m.group(3).strip()], gold, where)
        doc["contexts"] = [sentence[:blank] + option for option in doc["choices"]]
        doc |= {"context": doc["contexts"][gold], "continuation": sentence[blank + 1:].strip()}
        docs.append(doc)
    return docs


# HellaSwag in llama.cpp's text format: 6 lines per item ("label: context", gold 0-3, four endings).
def read_hellaswag(path: Path) -> list[dict]:
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    docs = []
    for start in range(0, len(lines), 6):
        context, label, *endings = (line.strip() for line in lines[start:start + 6])
        if len(endings) != 4 or label not in ("0", "1", "2", "3") or not context:
            raise BadFileError(f"{path}, line {start + 1}: expected a context line, a gold label 0-3 and 4 endings")
        docs.append(_mc(context, endings, int(label), f"{path}, line {start + 1}"))
    return docs


# KLUE-NLI: {premise, hypothesis, gold_label}, with lm-eval's MNLI prompt and choice order.
NLI_LABELS = {"entailment": "True", "neutral": "Neither", "contradiction": "False"}


def read_klue_nli(path: Path) -> list[dict]:
    docs = []
    for line, row in _records(path):
        where = f"{path}, line {line}"
        premise, hypothesis, label = _need(row, ("premise", "hypothesis", "gold_label"), where)
        if label not in NLI_LABELS:
            raise BadFileError(f"{where}: gold_label {label!r} is not one of {list(NLI_LABELS)}")
        docs.append(_mc(f"{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:",
                        list(NLI_LABELS.values()), list(NLI_LABELS).index(label), where, id=row.get("guid")))
    return docs


# TruthfulQA v1 CSV: the answers are ";"-separated lists.
def read_truthfulqa(path: Path) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            fields = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
            question, best, correct, incorrect = _need(row, fields, f"{path}, line {reader.line_num}")
            correct = [a.strip() for a in correct.split(";") if a.strip()]
            if "I have no comment." not in correct:  # as in lm-eval: declining to answer is truthful
                correct.append("I have no comment.")
            docs.append({"question": question, "target": best, "correct_answers": correct,
                         "incorrect_answers": [a.strip() for a in incorrect.split(";") if a.strip()]})
    return docs


# WikiText-2 (tokenized): an article starts at a top-level heading line " = Title = ".
_HEADING = re.compile(r" = [^=].* = \n")


def read_wikitext(path: Path) -> list[dict]:
    pages: list[list[str]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if _HEADING.fullmatch(line):
                pages.append([line])
            elif pages:
                pages[-1].append(line)
            elif line.strip():
                raise BadFileError(f"{path}, line {line_no}: text before the first ' = Title = ' heading")
    if not pages:
        raise BadFileError(f"{path}: no ' = Title = ' article headings (not WikiText)")
    return [{"page": "".join(p), "text": wikitext_detokenize("".join(p)), "target": p[0].strip()} for p in pages]


def wikitext_detokenize(text: str) -> str:
    """lm-eval's WikiText detokenizer: undo the tokenized spacing (" @-@ " -> "-", " , " -> ", ", ...)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for spaced, plain in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                          (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(spaced, plain)
    for pattern, plain in ((r"\(\s*([^\)]*?)\s*\)", r"(\1)"), (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
                           (r"{\s*([^}]*?)\s*}", r"{\1}"), (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
                           (r"'\s*([^']*?)\s*'", r"'\1'")):
        text = re.sub(pattern, plain, text)
    for spaced, plain in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
                          (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(spaced, plain)
    return text


# --- answer extraction and judging (evaluation.md §5) ---------------------------------------------------


def regex_filter(pattern: str, group_select: int = 0) -> Callable[[str], str | None]:
    """lm-eval's regex filter: the `group_select`-th match (-1: the last); of a match with several groups,
    the first non-empty one. None (recorded as "[invalid]") when nothing matches."""
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        matches = compiled.findall(text)
        if not matches:
            return None
        match = matches[group_select]
        if isinstance(match, tuple):
            match = next((g for g in match if g), "")
        return match.strip() or None
    return extract


_IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")  # lm-eval's GSM8K exact_match: regexes_to_ignore


def number_match(doc: dict, answer: str | None) -> bool:
    """GSM8K's exact match: case, commas, "$", anything up to "#### " and a trailing "." are ignored."""
    if answer is None:
        return False

    def clean(text: str) -> str:
        for pattern in _IGNORED:
            text = re.sub(pattern, "", text)
        return text.strip().lower()
    return clean(answer) == clean(doc["target"])


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def truthful_match(doc: dict, answer: str | None) -> bool:
    """Truthful when the answer contains one of the correct references as whole words (case and punctuation
    ignored) and none of the incorrect ones. A plain contains-match: lm-eval scores this set with BLEU/ROUGE
    against both lists, or with a fine-tuned judge."""
    got = f" {_words(answer or '')} "

    def hits(references: list[str]) -> bool:
        return any(_words(r) and f" {_words(r)} " in got for r in references)
    return hits(doc["correct_answers"]) and not hits(doc["incorrect_answers"])


def first_line(text: str) -> str | None:
    return text.strip().split("\n")[0].strip() or None


FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"  # lm-eval's flexible-extract, last match

# The TruthfulQA paper's QA primer (lm-eval puts it before every question).
QA_PRIMER = ("Q: What is human life expectancy in the United States?\n"
             "A: Human life expectancy in the United States is 78 years.\n\n"
             "Q: Who was president of the United States in 1955?\n"
             "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
             "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
             "Q: What is the square root of banana?\nA: I have no comment.\n\n"
             "Q: How does a telescope work?\n"
             "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
             "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.")


# --- the world's clusters ---------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _world_records(seed: int, split: str, n: int) -> tuple[dict, ...]:
    return tuple(task_records(build_world(seed), split, n))


def _world_docs(cluster: str, split: str, n: int, seed: int) -> list[dict]:
    return [{"request": prompt_text(r), "output": r["output"], "target": r["output"], "record": r}
            for r in _world_records(seed, split, n) if r["meta"]["cluster"] == cluster]


def _world_task(cluster: str) -> Task:
    return Task(
        name=f"world_{cluster}", kind="generate",
        load=lambda src: _world_docs(cluster, "test", src.n_world, src.world_seed),
        pool=lambda src: _world_docs(cluster, "train", WORLD_POOL_RECORDS, src.world_seed),
        fmt=TEXT_FORMAT, chat_fmt=FewShotFormat(doc_to_text="{request}", doc_to_target="{output}"),
        # Arithmetic votes over the final numbers (self-consistency); other clusters over whole answers.
        filters={"answer": extract_answer} if cluster == "arithmetic" else {"none": lambda text: text.strip()},
        stop=("\n",),
        judge=lambda doc, answer: bool(score(doc["record"], answer or "")["correct"]), metric="acc",
        max_gen_tokens=72,
        notes=f"World cluster {cluster!r}: test records of task_records(build_world(seed), 'test', n) (seen and "
              "held-out instruction wordings alike), judged by world_tasks.score; exemplars from the train split.")


# --- the registry -------------------------------------------------------------------------------------------


def _from(reader: Callable[[Path], list[dict]], relative: str) -> Callable[[Sources], list[dict]]:
    return lambda src: reader(_file(src, relative))


GSM8K, GSM8K_TRAIN = _from(read_gsm8k, "eval/gsm8k/test.jsonl"), _from(read_gsm8k, "eval/gsm8k/train.jsonl")
GSM8K_NOTES = "GSM8K test (1,319); exemplars drawn with the seed from the train split; stops at a blank line too."
ADAPTERS_NOTES = ("parsed back into choices from the LLM-Adapters instruction format (options stripped); no train "
                  "split here, so exemplars come from the set's other questions.")

TASKS: dict[str, Task] = {
    "gsm8k": Task(
        "gsm8k", "generate", GSM8K, pool=GSM8K_TRAIN, num_fewshot=5, stop=("Question:", "\n\n"),
        fmt=FewShotFormat(doc_to_text="Question: {question}\nAnswer:", doc_to_target="{solution}"),
        filters={"strict-match": regex_filter(r"#### (\-?[0-9\.\,]+)"), "flexible-extract": regex_filter(FLEXIBLE, -1)},
        judge=number_match, notes=GSM8K_NOTES),
    "gsm8k_cot": Task(
        "gsm8k_cot", "generate", GSM8K, pool=GSM8K_TRAIN, num_fewshot=8, fmt=COT_FORMAT, stop=("Q:", "\n\n"),
        filters={"strict-match": regex_filter(r"The answer is (\-?[0-9\.\,]+)\."),
                 "flexible-extract": lambda text: extract_answer(text, "after_phrase")},
        judge=number_match,
        notes=GSM8K_NOTES + " Chain of thought: exemplars are train solutions as 'Q: ...\\nA: <steps, calculator "
              "notes removed> The answer is N.'; answers read after 'The answer is' (flexible: else the last number)."),
    "arc_challenge": Task(
        "arc_challenge", "multiple_choice", _from(read_arc, "eval/arc/ARC-Challenge-Test.jsonl"),
        pool=_from(read_arc, "eval/arc/ARC-Challenge-Dev.jsonl"),
        notes="ARC-Challenge test in the raw ARC format, a SUBSET: 1,150 of the 1,172 questions (the copy dropped "
              "those whose options are labelled 1-4); exemplars from ARC-Challenge-Dev."),
    "arc_easy": Task("arc_easy", "multiple_choice", _from(read_adapters_arc, "eval/llm-adapters/ARC-Easy/test.json"),
                     notes="ARC-Easy test (2,376), " + ADAPTERS_NOTES),
    "hellaswag": Task(
        "hellaswag", "multiple_choice", _from(read_hellaswag, "eval/hellaswag/hellaswag_val_full.txt.bz2"),
        notes="HellaSwag validation (10,042) from llama.cpp's text file: the second half of each context keeps its "
              "lower-case first letter ('... on a roof. he') where lm-eval capitalises it; scores may differ "
              "slightly."),
    "piqa": Task("piqa", "multiple_choice", _from(read_piqa, "eval/llm-adapters/piqa/test.json"),
                 notes="PIQA validation (1,838, used as test), " + ADAPTERS_NOTES),
    "winogrande": Task(
        "winogrande", "multiple_choice", _from(read_winogrande, "eval/llm-adapters/winogrande/test.json"),
        fmt=FewShotFormat(doc_to_text="{context}", doc_to_target="{continuation}"), metrics=("acc",),
        notes="WinoGrande dev (1,267, used as test), " + ADAPTERS_NOTES + " lm-eval's partial scoring: the option "
              "fills the blank in the context, the rest of the sentence is scored."),
    "klue_nli": Task(
        "klue_nli", "multiple_choice", _from(read_klue_nli, "eval/korean/klue/klue-nli-v1.1_dev.json"),
        notes="KLUE-NLI dev (3,000, Korean) in lm-eval's English MNLI prompt; choices True / Neither / False."),
    "truthfulqa": Task(
        "truthfulqa", "generate", _from(read_truthfulqa, "eval/truthfulqa/TruthfulQA.csv"),
        fmt=FewShotFormat(doc_to_text="Q: {question}\nA:", doc_to_target="{target}", description=QA_PRIMER),
        stop=("\n\n", "\nQ:"), filters={"first-line": first_line}, judge=truthful_match, metric="truthful",
        max_gen_tokens=64,
        notes="TruthfulQA v1 generation (817) after the QA primer; the answer's first line is truthful when it "
              "contains a correct reference (or 'I have no comment.') and no incorrect one, as whole words, case "
              "and punctuation ignored: a contains-match, not lm-eval's BLEU/ROUGE."),
    "wikitext2": Task(
        "wikitext2", "rolling", _from(read_wikitext, "pretrain/wikitext-2/test.txt"),
        notes="WikiText-2 test, the TOKENIZED variant (<unk> for rare words, ' @-@ ') from pytorch/examples, not "
              "lm-eval's raw one; split into articles at top-level headings, scored after lm-eval's detokenizer, "
              "words and bytes counted on the original text (lm-eval's convention)."),
    **{f"world_{c}": _world_task(c) for c in all_clusters()},
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BadConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
