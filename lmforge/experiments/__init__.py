"""`lmforge experiment NAME`: measured studies of the lecture's claims, each a section of a run's report.

An experiment module has a frozen `Config` dataclass (with at least `run`, the run directory whose stages it
reuses, and `quick`), a function `run(cfg) -> dict` that ends by calling `save_results`, and
`section(results: dict, run_dir: Path) -> list[str]`, the Markdown lines of its report section. Results land in
RUN/experiments/NAME.json (pictures beside it); the run's report.md and report.html are then rendered again
with every experiment section whose JSON is present, so `lmforge run` and the experiments can come in any
order. This file stays free of heavy imports: the command table reads it on every `lmforge` call.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# name -> (module, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "flan-heldout": ("lmforge.experiments.flan", "FLAN: zero-shot accuracy on a task cluster held out of SFT"),
    "flan-clusters": ("lmforge.experiments.flan", "FLAN: held-out accuracy as the number of training clusters grows"),
    "flan-form": ("lmforge.experiments.flan", "FLAN: instructions vs dataset names vs no instruction"),
    "flan-scale": ("lmforge.experiments.flan", "FLAN: the held-out effect across model sizes"),
    "lima": ("lmforge.experiments.lima", "LIMA: SFT data size and curated vs random data"),
    "reward-hacking": ("lmforge.experiments.reward_hacking",
                       "PPO against a weak reward model with and without the KL penalty: proxy up, gold down?"),
    "judge-bias": ("lmforge.experiments.judge_bias",
                   "LLM-as-judge: a trained judge's position, length and self-preference biases, and arena ratings"),
    "synthetic-data": ("lmforge.experiments.synthetic_data",
                       "Self-Instruct with the SFT model, AlpaGasus curation: seeds vs all vs curated vs random data"),
    "rag": ("lmforge.experiments.rag",
            "RAG: accuracy and hallucination with and without retrieval, on held-out and on seen facts"),
    "jailbreak": ("lmforge.experiments.jailbreak",
                  "jailbreak attacks on the vault codes: success rate per attack family and per checkpoint"),
    "detect": ("lmforge.experiments.detect",
               "AI-text detection: world text vs model samples, and human text vs model samples"),
    "scaling": ("lmforge.experiments.scaling", "scaling laws: L(N), L(D), L(N, D) fits and a held-out prediction"),
    "emergence": ("lmforge.experiments.emergence", "in-context learning and chain-of-thought against model size"),
}


def config_ref(name: str) -> str:
    """The `module:Class` of an experiment's config: `Config`, or `<Name>Config` where one module holds several
    experiments (flan-heldout -> FlanHeldoutConfig)."""
    module = EXPERIMENTS[name][0]
    if sum(m == module for m, _ in EXPERIMENTS.values()) == 1:
        return f"{module}:Config"
    return f"{module}:{''.join(part.title() for part in name.split('-'))}Config"


def function_ref(name: str) -> str:
    """`run`, or `run_<name>` where one module holds several experiments."""
    module = EXPERIMENTS[name][0]
    if sum(m == module for m, _ in EXPERIMENTS.values()) == 1:
        return f"{module}:run"
    return f"{module}:run_{name.replace('-', '_')}"


def results_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "experiments" / f"{name}.json"


def save_results(run_dir: str | Path, name: str, results: dict) -> Path:
    """Write RUN/experiments/NAME.json atomically, then render the run's report again if the run has one."""
    path = results_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    from lmforge.evaluate.report import refresh_report

    refresh_report(Path(run_dir))
    return path


def report_sections(run_dir: Path) -> list[str]:
    """The sections of every experiment whose results are saved under `run_dir`, in the table's order."""
    lines: list[str] = []
    for name, (module, _) in EXPERIMENTS.items():
        path = results_path(run_dir, name)
        if path.is_file():
            section_fn = getattr(importlib.import_module(module), "section" if config_ref(name).endswith(":Config")
                                 else f"section_{name.replace('-', '_')}")
            lines += [""] + section_fn(json.loads(path.read_text(encoding="utf-8")), Path(run_dir))
    return lines
