"""RAG in the world: does retrieval stop a model inventing facts it never saw?

    lmforge experiment rag --run runs/world

- **Corpus** (`world_passages`): one biography per person (`world.describe_person`), held-out people included:
  pretraining never saw their facts, so retrieval is the only way to know them; one description per town,
  without its vault code; and distractors from fresh pretraining-style documents (stories, reviews and chats
  that name the same people and towns). The corpus's question-answer dialogues are left out: they repeat the
  questions' own wording, so BM25 would retrieve them for the wording, whoever they are about.
- **Questions** (`world_questions`): closed-book QA about a person's birth town, job, food, pet, age, hobby
  and friend, in the corpus's question wordings, for every held-out person and for the validation and test
  people of pretraining (facts seen as prose in pretraining, never as question-answer pairs in SFT).
- **Retrieval**: BM25, dense (mean-pooled final hidden states of the run's `--encoder` model) and hybrid
  (reciprocal-rank fusion), each with recall@1, @2, @5 and MRR of the question's biography. The method that
  answers (`--method auto`) is the one with the best recall@`passages_in_prompt` on the *training* people's
  questions, never chosen on the evaluation questions.
- **Models**: the run's SFT model and its aligned model (`--aligned`, DPO by default) as they are, and a
  reader: the SFT model fine-tuned on an instruction-tuning mix of reading examples (the question, a retrieved
  passage, the answer "value [1]") and, for `--task-share` of the mix, the run's own SFT tasks. Reading
  examples are about the *train-split* people of the world and about invented people (`invented_people`: the
  people of other seeded worlds, with this world's towns as birth towns, any whose first name this world
  uses left out), so no evaluation person, fact or question is trained on. `--abstain-share` of them show a
  passage about someone else and answer "The passages do not say." Each model answers every question
  closed-book (the SFT task wording, "Answer in a few words.") and with RAG (`apps.rag.RAG_TEMPLATE`, the top
  `passages_in_prompt` passages), greedily.
- **Sizing, measured** in development runs on the default run's 0.9M-parameter SFT model (held-out questions,
  the person's passage in the prompt): reading examples about the 64 train-split people alone did not teach
  reading (5-10% correct after 150-400 steps; asked to answer with the biography's sentence rather than the
  bare value, the reader wrote train people's names). Adding invented people did: 83% after 600 steps of
  reading examples alone at lr 1e-3 (lr 3e-3: 14% after 300), friends' names aside (0%: a name the model has
  never seen must be spelled out from the passage). With two passages in the prompt the reader could not tell
  which one is about the asked person (9% correct, 28% misread after 500 steps), so one passage is the default.
- **Outcomes** (`apps.rag.judge_answer`, a lexical judge, no model): the claims of an answer are the values of
  the asked relation it names (any town for a birth town, any job for a job, ...), or its whole text if it
  names none. *Correct*: its claims are exactly the true value. *Hallucinated*: it claims a value that is
  neither true of the person nor written in the question or the passages in the prompt (closed-book: the
  question alone). *Misread*: wrong, but only with values the passages state (e.g. the other passage's
  person's job). *Abstained*: no claim. The four outcomes partition the answers. Rates have Wilson 95%
  intervals; the change in hallucination from closed-book to RAG is paired over the same questions, with a
  bootstrap 95% interval. Citations: the share of RAG answers citing (or, unmarked, containing) the gold
  biography.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from lmforge.errors import BadConfigError

PERSON_RELATIONS = ("town", "profession", "food", "pet", "age", "hobby", "friend")
CLOSED_BOOK_INSTRUCTION = "Answer in a few words."  # the first (seen) closed-book QA wording of the SFT tasks
ABSTAIN_ANSWER = "The passages do not say."


@dataclass(frozen=True)
class Config:
    run: str = "runs/world"
    """Run directory (`lmforge run`): its SFT, aligned and encoder models and its world are reused."""
    quick: bool = False
    """A few questions and reader steps: checks the machinery, no finding promised."""
    aligned: str = "dpo"
    """The aligned stage of the run to compare (dpo, ppo or rejection)."""
    encoder: str = "pretrain"
    """The stage whose model embeds passages and questions for dense retrieval (mean-pooled hidden states)."""
    method: str = "auto"
    """Retrieval that answers: bm25, dense, hybrid, or auto (best recall on the training people's questions)."""
    passages_in_prompt: int = 1
    """Top passages put in the prompt (see "Sizing" in the module docstring for why one)."""
    n_distractors: int = 150
    """Stories, reviews and chats added to the corpus besides biographies and towns."""
    questions_per_set: int = 0
    """Questions per set (held-out, pretraining); 0: every fact of every person of the set."""
    training_questions: int = 0
    """Questions about train-split people (reading examples, and the choice of --method auto); 0: all."""
    invented_worlds: int = 3
    """Other seeded worlds whose people become invented people for reading examples (~95 people each)."""
    task_share: float = 0.25
    """Share of the reader's mix taken from the run's SFT tasks, so the other skills stay."""
    abstain_share: float = 0.1
    """Share of reading examples showing someone else's passage, answered "The passages do not say."."""
    reader_steps: int = 600
    """Fine-tuning steps of the reader (the SFT model on the reading mix)."""
    reader_batch_size: int = 16
    reader_lr: float = 1e-3
    max_new_tokens: int = 16
    """Longest answer in tokens (a quarter of the context at most)."""
    seed: int = 0
    """Seeds the distractors, the questions' wordings, the reading mix and the reader's training."""
    progress: bool = True


QUICK = dict(n_distractors=20, questions_per_set=8, training_questions=16, invented_worlds=1, reader_steps=3,
             reader_batch_size=4)


# ---------------------------------------------------------------------------------------------------------
# The corpus and the questions


def town_passage(town) -> str:
    return (f"{town.name} is a town in {town.region}. The pride of {town.name} is its {town.landmark}. "
            f"{town.name} is known for its {town.trade} and was founded in {town.founded}.")


def world_passages(world, n_distractors: int, seed: int) -> list:
    """Biographies of every person ("bio:<person id>"), towns ("town:<name>"), then the distractors."""
    from lmforge.apps.rag import Passage
    from lmforge.data.world import describe_person, pretraining_documents

    passages = [Passage(f"bio:{p.id}", describe_person(p), {"person": p.id, "fact_set": p.fact_set})
                for p in world.people]
    passages += [Passage(t.id, town_passage(t), {"town": t.id}) for t in world.towns]
    # A stream of its own (seed 1000 + seed), so the distractors are not the pretraining text itself.
    documents = pretraining_documents(world, 8 * n_distractors + 40, 1000 + seed)
    kept = [d for d in documents if d.kind in ("story", "review")
            or (d.kind == "dialogue" and d.extra.get("style") == "chat")][:n_distractors]
    passages += [Passage(f"doc:{i}", " ".join(d.text.split()), {"kind": d.kind}) for i, d in enumerate(kept)]
    return passages


def world_questions(world, people, n: int, seed: int) -> list[dict]:
    """{question, person, name, relation, truth, gold, fact_set} for every relation of every person (or n of
    them), in the order people and relations come."""
    from lmforge.data.world_tasks import PERSON_QUESTIONS

    rng = random.Random(f"rag-questions/{world.seed}/{seed}")
    questions = []
    for p in people:
        for relation in PERSON_RELATIONS:
            if getattr(p, relation) == "":
                continue
            wording = rng.choice(PERSON_QUESTIONS[relation])
            questions.append({"question": wording.format(full=p.name), "person": p.id, "name": p.name,
                              "relation": relation, "truth": str(getattr(p, relation)), "gold": f"bio:{p.id}",
                              "fact_set": p.fact_set})
    if 0 < n < len(questions):
        keep = set(rng.sample(range(len(questions)), n))
        questions = [q for i, q in enumerate(questions) if i in keep]
    return questions


def invented_people(world, n_worlds: int, seed: int) -> list:
    """People of `n_worlds` other seeded worlds, born in this world's towns, without friends (a friend's name
    from another world is one the reader could only spell, never read as known tokens) and without anyone
    whose first name this world uses. Reading about them teaches reading: their facts are true nowhere here."""
    from dataclasses import replace as replace_field

    from lmforge.data.world import build_world

    taken = {p.first for p in world.people}
    rng = random.Random(f"invented/{world.seed}/{seed}")
    people = []
    for i in range(1, n_worlds + 1):
        other = build_world(world.seed + 7919 * i + seed)
        for p in other.people:
            if p.first not in taken:
                taken.add(p.first)
                people.append(replace_field(p, town=rng.choice(world.towns).name, friend=""))
    return people


def relation_vocabulary(world) -> dict[str, list[str]]:
    """Every value each person relation can take: what an answer's claims are looked for among."""
    from lmforge.data.world import FOODS, HOBBIES, PETS, PROFESSIONS

    return {"town": [t.name for t in world.towns], "profession": list(PROFESSIONS), "food": list(FOODS),
            "pet": list(PETS), "age": [str(a) for a in range(100)], "hobby": list(HOBBIES),
            "friend": [p.name for p in world.people]}


# ---------------------------------------------------------------------------------------------------------
# Retrieval quality


def retrieval_recall(retriever, questions: list[dict], methods=("bm25", "dense", "hybrid")) -> tuple[dict, dict]:
    """({method: {recall@1, recall@2, recall@5, mrr}}, {method: hits per question (top 5)})."""
    from lmforge.apps.rag import mean_reciprocal_rank, recall_at_k

    table, hits = {}, {}
    gold = [q["gold"] for q in questions]
    for method in methods:
        hits[method] = [retriever.search(q["question"], 5, method) for q in questions]
        ids = [[h.passage.id for h in found] for found in hits[method]]
        table[method] = {**{f"recall@{k}": recall_at_k(ids, gold, k) for k in (1, 2, 5)},
                         "mrr": mean_reciprocal_rank(ids, gold)}
    return table, hits


# ---------------------------------------------------------------------------------------------------------
# The reader: an instruction-tuning mix that includes reading passages


def reading_examples(questions: list[dict], hits: list[list], passages_by_id: dict, passages_in_prompt: int,
                     abstain_share: float, seed: int) -> list[dict]:
    """Chat examples: the RAG prompt with `passages_in_prompt` passages, answered "value [n]".

    The gold biography (`passages_by_id[question["gold"]]`) is put in if retrieval missed it, at a random
    place, so the answer is found by the person's name, not by position; `abstain_share` of the examples have
    only other retrieved passages and the answer ABSTAIN_ANSWER."""
    from lmforge.apps.rag import RAG_TEMPLATE, passage_block

    rng = random.Random(f"reading/{seed}")
    examples = []
    for q, found in zip(questions, hits):
        others = [h.passage for h in found if h.passage.id != q["gold"]][:passages_in_prompt]
        if rng.random() < abstain_share:
            chosen, answer = others, ABSTAIN_ANSWER
        else:
            gold = passages_by_id[q["gold"]]
            chosen = others[:passages_in_prompt - 1]
            place = rng.randint(0, len(chosen))
            chosen.insert(place, gold)
            answer = f"{q['truth']} [{place + 1}]"
        content = RAG_TEMPLATE.format(question=q["question"], passages=passage_block(chosen))
        examples.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]})
    return examples


def train_reader(start: Path, examples: list[dict], out: Path, cfg: Config) -> Path:
    from lmforge.train.loop import TrainConfig
    from lmforge.train.sft import SFTConfig, sft

    out.mkdir(parents=True, exist_ok=True)
    data = out / "mix.jsonl"
    data.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples), encoding="utf-8")
    return sft(SFTConfig(model=str(start), data=str(data), out=str(out), train=TrainConfig(
        steps=cfg.reader_steps, batch_size=cfg.reader_batch_size, lr=cfg.reader_lr,
        warmup_steps=max(1, cfg.reader_steps // 20), eval_every=10**9, seed=cfg.seed, progress=cfg.progress)))


# ---------------------------------------------------------------------------------------------------------
# Answers and their outcomes


def closed_book_answers(model, tokenizer, questions: list[dict], max_new_tokens: int) -> list[str]:
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    prompts = [tokenizer.render_prompt([{"role": "user", "content": f"{CLOSED_BOOK_INSTRUCTION}\n\n{q['question']}"}])
               for q in questions]
    outputs = Engine(model, tokenizer, max_batch_size=32).generate(
        prompts, SamplingParams(temperature=0, max_new_tokens=max_new_tokens))
    return [o.text.strip() for o in outputs]


def rate(flags: list[bool]) -> dict:
    from lmforge.experiments.flan import wilson_interval

    k, n = sum(flags), len(flags)
    low, high = wilson_interval(k, n)
    return {"rate": k / n if n else 0.0, "interval": [low, high], "k": k, "n": n}


def condition_summary(outcomes: list[str]) -> dict:
    from lmforge.apps.rag import OUTCOMES

    return {outcome: rate([o == outcome for o in outcomes]) for outcome in OUTCOMES}


def paired_change(before: list[bool], after: list[bool], seed: int) -> dict:
    """Mean of after - before over the same questions, with a bootstrap 95% interval."""
    from lmforge.evaluate.judge import bootstrap_interval

    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    low, high = bootstrap_interval(diffs, seed=seed)
    return {"change": sum(diffs) / max(len(diffs), 1), "interval": [low, high], "n": len(diffs)}


def evaluate_model(model, tokenizer, questions: list[dict], hits: list[list], passages_by_id: dict,
                   vocabulary: dict, cfg: Config, max_new_tokens: int) -> tuple[dict, list[dict]]:
    """One model on one question set, closed-book and with RAG: (summary, the first three answers)."""
    from lmforge.apps.rag import answer_questions, judge_answer, mentions, normalize

    closed = closed_book_answers(model, tokenizer, questions, max_new_tokens)
    rag_rows = answer_questions(model, tokenizer, [q["question"] for q in questions], hits, cfg.passages_in_prompt,
                                max_new_tokens)
    # the asked person's own name is no claim about their friend
    claimable = [[v for v in vocabulary[q["relation"]] if v != q["name"]] for q in questions]
    closed_outcomes = [judge_answer(a, q["truth"], q["question"], values)
                       for q, a, values in zip(questions, closed, claimable)]
    rag_outcomes = [judge_answer(row["answer"], q["truth"],
                                 " ".join([q["question"]] + [passages_by_id[i].text for i in row["in_prompt"]]),
                                 values) for q, row, values in zip(questions, rag_rows, claimable)]
    summary = {
        "closed_book": condition_summary(closed_outcomes), "rag": condition_summary(rag_outcomes),
        "hallucination_change": paired_change([o == "hallucinated" for o in closed_outcomes],
                                              [o == "hallucinated" for o in rag_outcomes], cfg.seed),
        "accuracy_change": paired_change([o == "correct" for o in closed_outcomes],
                                         [o == "correct" for o in rag_outcomes], cfg.seed),
        "cites_gold": rate([any(c["id"] == q["gold"] for c in row["citations"])
                            for q, row in zip(questions, rag_rows)]),
        "cited_by_model": rate([row["cited_by"] == "model" for row in rag_rows]),
        # the same words with and without the passage: the answer came from the weights, not the prompt
        "rag_equals_closed_book": rate([normalize(row["answer"]) == normalize(a) for row, a in zip(rag_rows, closed)]),
        # answers that name no value of the asked kind at all ("Greno" for a pet), abstentions aside
        "rag_wrong_kind": rate([o != "abstained" and not any(mentions(row["answer"], v) for v in values)
                                for row, o, values in zip(rag_rows, rag_outcomes, claimable)]),
        "rag_correct_by_relation": {
            relation: rate([o == "correct" for q, o in zip(questions, rag_outcomes) if q["relation"] == relation])
            for relation in PERSON_RELATIONS if any(q["relation"] == relation for q in questions)},
    }
    examples = [{"question": q["question"], "truth": q["truth"], "closed_book": a, "closed_book_outcome": co,
                 "rag": row["answer"], "rag_outcome": ro, "citations": [c["id"] for c in row["citations"]],
                 "in_prompt": row["in_prompt"]}
                for q, a, co, row, ro in list(zip(questions, closed, closed_outcomes, rag_rows, rag_outcomes))[:3]]
    return summary, examples


def run(cfg: Config) -> dict:
    import torch

    from lmforge.apps.rag import METHODS, Passage, Retriever
    from lmforge.checkpoint import load_checkpoint
    from lmforge.data.world import build_world, describe_person
    from lmforge.evaluate.metrics import embed_texts
    from lmforge.experiments import save_results

    cfg = replace(cfg, **QUICK) if cfg.quick else cfg
    run_dir = Path(cfg.run)
    stages = {"sft": run_dir / "sft" / "final", "aligned": run_dir / cfg.aligned / "final",
              "encoder": run_dir / cfg.encoder / "final"}
    facts_path = run_dir / "world" / "facts.json"
    for path in (*stages.values(), facts_path):
        if not path.exists():
            raise BadConfigError(f"{path}: missing; run `lmforge run --out {run_dir}` first")
    if cfg.method not in (*METHODS, "auto"):
        raise BadConfigError(f"--method must be auto or one of {METHODS}, got {cfg.method!r}")
    if cfg.passages_in_prompt < 1 or not 0 <= cfg.abstain_share < 1 or not 0 <= cfg.task_share < 1:
        raise BadConfigError("--passages-in-prompt must be at least 1, --abstain-share and --task-share in [0, 1)")
    work = run_dir / "experiments" / "rag"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    # --- corpus, questions, retrieval ------------------------------------------------------------------
    world = build_world(json.loads(facts_path.read_text(encoding="utf-8"))["seed"])
    passages = world_passages(world, cfg.n_distractors, cfg.seed)
    evaluation = {"heldout": world_questions(world, world.heldout_people, cfg.questions_per_set, cfg.seed),
                  "pretrain": world_questions(world, world.people_in_split("validation")
                                              + world.people_in_split("test"), cfg.questions_per_set, cfg.seed)}
    training = world_questions(world, world.people_in_split("train"), cfg.training_questions, cfg.seed + 1)
    encoder, encoder_tokenizer, _ = load_checkpoint(stages["encoder"])
    with torch.no_grad():
        retriever = Retriever(passages, lambda texts: embed_texts(encoder, encoder_tokenizer, texts))
    train_recall, train_hits = retrieval_recall(retriever, training)
    method = cfg.method if cfg.method != "auto" else max(
        METHODS, key=lambda m: (train_recall[m][f"recall@{min(cfg.passages_in_prompt, 5)}"], -METHODS.index(m)))
    recall, hits = {}, {}
    for name, questions in evaluation.items():
        recall[name], found = retrieval_recall(retriever, questions)
        hits[name] = found[method]
    lap("retrieval")

    # --- the reader's mix: reading about train-split and invented people, and the run's SFT tasks -------
    invented = invented_people(world, cfg.invented_worlds, cfg.seed)
    invented_questions = world_questions(world, invented, cfg.training_questions, cfg.seed + 2)
    invented_retriever = Retriever([Passage(f"bio:{p.id}", describe_person(p)) for p in invented])
    invented_hits = [invented_retriever.search(q["question"], 5, "bm25") for q in invented_questions]
    passages_by_id = {p.id: p for p in passages + invented_retriever.passages}
    reading = reading_examples(training + invented_questions, train_hits[method] + invented_hits, passages_by_id,
                               cfg.passages_in_prompt, cfg.abstain_share, cfg.seed)
    tasks_path = run_dir / "world" / "tasks" / "train.chat.jsonl"
    tasks = [json.loads(line) for line in tasks_path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if tasks_path.is_file() else []
    rng = random.Random(f"mix/{cfg.seed}")
    n_tasks = min(len(tasks), round(len(reading) * cfg.task_share / (1 - cfg.task_share)))
    mix = reading + [{"messages": t["messages"]} for t in rng.sample(tasks, n_tasks)]
    rng.shuffle(mix)
    stages["reader"] = train_reader(stages["sft"], mix, work / "reader", cfg)
    lap("reader_training")

    # --- every model, closed-book and with RAG ---------------------------------------------------------
    vocabulary = relation_vocabulary(world)
    models, examples = {}, {}
    for name in ("sft", "aligned", "reader"):
        model, tokenizer, _ = load_checkpoint(stages[name])
        max_new_tokens = min(cfg.max_new_tokens, model.cfg.max_seq_len // 4)
        models[name] = {}
        for set_name, questions in evaluation.items():
            models[name][set_name], examples.setdefault(name, {})[set_name] = evaluate_model(
                model, tokenizer, questions, hits[set_name], passages_by_id, vocabulary, cfg, max_new_tokens)
        lap(f"answers_{name}")

    findings = {name: {"heldout_hallucination_lowered": m["heldout"]["hallucination_change"]["interval"][1] < 0,
                       "heldout_accuracy_raised": m["heldout"]["accuracy_change"]["interval"][0] > 0}
                for name, m in models.items()}
    results = {"config": asdict(cfg), "method": method, "corpus": {"passages": len(passages),
               "biographies": len(world.people), "towns": len(world.towns), "distractors": len(passages)
               - len(world.people) - len(world.towns)},
               "questions": {name: len(q) for name, q in evaluation.items()} | {"reader_training": len(training)},
               "reader_mix": {"reading": len(reading), "tasks": len(mix) - len(reading),
                              "train_people": len(world.people_in_split("train")), "invented_people": len(invented),
                              "invented_questions": len(invented_questions),
                              "abstain": sum(e["messages"][1]["content"] == ABSTAIN_ANSWER for e in reading)},
               "recall": {"training": train_recall, **recall}, "models": models,
               "stages": {name: str(path) for name, path in stages.items()}, "findings": findings,
               "examples": examples, "reader_parameters": sum(p.numel() for p in model.parameters()),
               "timings": timings}
    save_results(run_dir, "rag", results)
    return results


# ---------------------------------------------------------------------------------------------------------
# The report section


def _cell(r: dict) -> str:
    low, high = r["interval"]
    return f"{r['rate']:.0%} [{low:.0%}, {high:.0%}]"


def _change(r: dict) -> str:
    low, high = r["interval"]
    return f"{r['change']:+.0%} [{low:+.0%}, {high:+.0%}]"


MODEL_NAMES = {"sft": "SFT", "aligned": "aligned", "reader": "SFT + reading mix"}


def section(results: dict, run_dir: Path) -> list[str]:
    cfg, recall = results["config"], results["recall"]
    aligned = f"aligned ({cfg['aligned']})"
    lines = [
        "## Experiment: RAG (accuracy and hallucination with and without retrieval)",
        "",
        *(["*Quick form (`--quick`): a few questions and reader steps, to check the machinery; no finding.*", ""]
          if cfg["quick"] else []),
        f"Corpus: {results['corpus']['passages']} passages ({results['corpus']['biographies']} biographies, held-out "
        f"people's included, {results['corpus']['towns']} towns, {results['corpus']['distractors']} distractors). "
        f"Questions: {results['questions']['heldout']} about held-out people (facts never in pretraining, only in "
        f"the corpus) and {results['questions']['pretrain']} about pretraining people of the validation and test "
        "splits. Dense retrieval embeds with the mean-pooled final hidden states of the run's "
        f"{cfg['encoder']} model; hybrid is reciprocal-rank fusion, Σ 1/(60 + rank).",
        "",
        "| retrieval | questions | recall@1 | recall@2 | recall@5 | MRR |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for set_name in ("heldout", "pretrain", "training"):
        for method, r in recall[set_name].items():
            lines.append(f"| {method} | {set_name} | {r['recall@1']:.2f} | {r['recall@2']:.2f} | {r['recall@5']:.2f} "
                         f"| {r['mrr']:.2f} |")
    lines += [
        "",
        f"Answers use **{results['method']}** retrieval (best recall@{cfg['passages_in_prompt']} on the training "
        f"people's questions) with the top {cfg['passages_in_prompt']} passage(s) in the prompt. The reader is the "
        f"SFT model after {cfg['reader_steps']} steps on a mix of {results['reader_mix']['reading']} reading "
        f"examples ({results['reader_mix']['abstain']} without the person's passage, answered \"{ABSTAIN_ANSWER}\") "
        f"and {results['reader_mix']['tasks']} of the run's SFT tasks; the reading examples are about the "
        f"{results['reader_mix']['train_people']} train-split people and "
        f"{results['reader_mix']['invented_people']} invented people (other worlds' people), never about an "
        "evaluation person.",
        "",
        "Outcomes by a lexical judge: *hallucinated* = the answer names a value of the asked relation that is "
        "neither the true one nor written in the question or the passages in the prompt; *misread* = wrong, but "
        "with a value from the passages; *abstained* = no claim. Cells: rate [Wilson 95% interval]; changes: "
        "RAG minus closed-book over the same questions [bootstrap 95% interval].",
        "",
        "| model | questions | accuracy closed-book | accuracy RAG | hallucination closed-book | hallucination RAG "
        "| Δ hallucination | misread RAG | abstained RAG | cites gold |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, by_set in results["models"].items():
        label = aligned if name == "aligned" else MODEL_NAMES[name]
        for set_name, m in by_set.items():
            closed, rag = m["closed_book"], m["rag"]
            lines.append(f"| {label} | {set_name} | {_cell(closed['correct'])} | {_cell(rag['correct'])} | "
                         f"{_cell(closed['hallucinated'])} | {_cell(rag['hallucinated'])} | "
                         f"{_change(m['hallucination_change'])} | {_cell(rag['misread'])} | "
                         f"{_cell(rag['abstained'])} | {_cell(m['cites_gold'])} |")
    lines += [""]
    for name, found in results["findings"].items():
        label = aligned if name == "aligned" else MODEL_NAMES[name]
        held = results["models"][name]["heldout"]
        change = held["hallucination_change"]
        if found["heldout_hallucination_lowered"]:
            lines.append(f"- **{label}**: RAG lowered hallucination on held-out facts from "
                         f"{held['closed_book']['hallucinated']['rate']:.0%} to "
                         f"{held['rag']['hallucinated']['rate']:.0%} "
                         f"({_change(change)}); accuracy {held['closed_book']['correct']['rate']:.0%} → "
                         f"{held['rag']['correct']['rate']:.0%}.")
        else:
            rag = held["rag"]
            lines.append(f"- **{label}**: RAG did **not** measurably lower hallucination on held-out facts "
                         f"({held['closed_book']['hallucinated']['rate']:.0%} → {rag['hallucinated']['rate']:.0%}, "
                         f"{_change(change)}). With retrieved passages in the prompt it answered correctly "
                         f"{rag['correct']['rate']:.0%} of the time, misread {rag['misread']['rate']:.0%} and "
                         f"abstained {rag['abstained']['rate']:.0%}; {held['rag_equals_closed_book']['rate']:.0%} of "
                         "its answers were word for word its closed-book answers and "
                         f"{held['rag_wrong_kind']['rate']:.0%} named no value of the asked kind at all (a town "
                         "for a pet, say). "
                         + (f"Why: {cfg['reader_steps']} steps of the reading mix did not teach it to read the "
                            "passage at this budget." if name == "reader" else
                            "Why: it was never tuned to read a passage in this form (its one reading task, "
                            "extraction, is worded differently): the passage changes what it says, but it does "
                            "not look up the answer there."))
    by_relation = results["models"]["reader"]["heldout"]["rag_correct_by_relation"]
    worst = min(by_relation, key=lambda relation: by_relation[relation]["rate"])
    lines.append("- Reader with RAG, held-out accuracy by relation: "
                 + ", ".join(f"{relation} {r['rate']:.0%} (n {r['n']})" for relation, r in by_relation.items())
                 + (f". A held-out friend's name is one the {results['reader_parameters'] / 1e6:.1f}M-parameter "
                    "reader has never seen, so it must spell it out from the passage, which it rarely manages."
                    if worst == "friend" else "."))
    best, hybrid = max(recall["heldout"].values(), key=lambda r: r["recall@5"]), recall["heldout"].get("hybrid")
    if hybrid and hybrid["recall@5"] < best["recall@5"]:
        lines.append(f"- Hybrid retrieval (recall@5 {hybrid['recall@5']:.2f} on held-out questions) is below the "
                     f"best single retriever ({best['recall@5']:.2f}): fusion adds the weak LM encoder's ranking "
                     "(a causal LM's mean-pooled states are not trained to match a question to a passage), and "
                     "reciprocal-rank fusion weighs both lists alike.")
    example = next(iter(results["examples"].get("reader", {}).get("heldout", [])), None)
    if example:
        lines += ["", f"Example (reader, held-out): *{example['question']}* closed-book: \"{example['closed_book']}\" "
                      f"({example['closed_book_outcome']}); with RAG: \"{example['rag']}\" ({example['rag_outcome']}, "
                      f"citing {', '.join(example['citations']) or 'nothing'}); true: {example['truth']}."]
    lines += ["", f"Timings (s): {', '.join(f'{k} {v:g}' for k, v in results['timings'].items())}.", ""]
    return lines
