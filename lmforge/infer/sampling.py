"""Sampling: the request's knobs, the logits processors, and the draw of the next token.

`SamplingParams` is the one object that carries a request's decoding settings through the engine, the CLI
(tyro builds flags from its fields) and the server. The processors are small pure functions on one row of
logits `(V,)`; `process_batch` loops them over rows so every row may have its own params.

Order (Hugging Face `generate()`, identical in 4.57 and 5.x; `tests/test_sampling.py` checks it against the
`transformers` processors chained in that order):

    repetition penalty -> frequency/presence penalties ->  [only when sampling]  temperature -> top-k -> top-p -> min-p

- **repetition_penalty** θ (the CTRL paper): for each *distinct* id in prompt + generated, z > 0 -> z/θ,
  z < 0 -> z·θ. θ > 1 discourages repeats. HF's `RepetitionPenaltyLogitsProcessor`.
- **frequency_penalty** α_f / **presence_penalty** α_p (OpenAI): z_i -= α_f·count_i + α_p·[count_i > 0], counted
  over *generated* ids only. HF has no equivalent; like vLLM they come right after the repetition penalty.
- **temperature** T: z <- z/T. T = 0 means greedy (argmax), which skips every warper below, as HF's
  `do_sample=False` does, so top-k/top-p/min-p have no effect there.
- **top_k**: keep the k largest scores; ties at the k-th value survive. 0 is off.
- **top_p** (nucleus): keep the smallest set of most likely tokens whose mass reaches p, including the token that
  crosses p; the top token is always kept. 1 is off.
- **min_p**: drop tokens with p_i < min_p · max_j p_j. 0 is off.

Top-p and min-p see the *tempered* distribution (HF and vLLM; llama.cpp differs, see the decoding reference §1).

The draw is the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. is an exact draw from p. It needs
no `multinomial` (which breaks CUDA graphs) and takes an explicit generator. Each request gets its own
`torch.Generator` seeded from its `seed` (`make_generator`), so a seeded request reproduces the same tokens
whatever else shares the batch: a global RNG would hand each request a different slice of the stream depending
on its neighbours (vLLM does the same).

The log-probabilities the engine reports, and PPO later scores, are `token_logprobs`: log_softmax(raw / T) of
the *raw* model logits, before any penalty or truncation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.errors import BadConfigError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    """Most tokens to generate (stop tokens and stop strings may end earlier)."""
    temperature: float = 1.0
    """Divide the logits by this before sampling; 0 means greedy (argmax), which ignores top-k/top-p/min-p."""
    top_k: int = 0
    """Keep only the k most likely tokens (ties at the k-th survive); 0 is off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches top_p; 1 is off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 is off."""
    repetition_penalty: float = 1.0
    """CTRL penalty on every distinct id in prompt + output: positive logits divided, negative multiplied; 1 is off."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty in [-2, 2]: subtracted once from each token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty in [-2, 2]: subtracted once per earlier occurrence in the generated tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one (it is left out of the output)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation, besides the tokenizer's end-of-sequence ids."""
    ignore_eos: bool = False
    """Keep generating past end-of-sequence tokens (for benchmarks)."""
    seed: int | None = None
    """Seed of this request's own random generator; None draws a fresh one."""
    n: int = 1
    """How many completions to return for the prompt."""
    logprobs: bool = False
    """Report the log-probability of each generated token."""
    top_logprobs: int = 0
    """Also report this many most likely alternatives at each step (0 to 20)."""
    num_beams: int = 1
    """Beam search with this many beams; 1 is off."""
    length_penalty: float = 1.0
    """Beam search: finished scores are sum log p / length**length_penalty; > 0 favours longer outputs."""
    early_stopping: bool = False
    """Beam search: stop as soon as num_beams hypotheses have finished."""

    def __post_init__(self):
        def bad(name: str, rule: str):
            raise BadConfigError(f"sampling: {name} must be {rule}, got {getattr(self, name)!r}")

        # Written as `not (ok)` so NaN, which fails every comparison, is rejected too.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", "finite and >= 0")
        if not (0 < self.top_p <= 1):
            bad("top_p", "in (0, 1]")
        if not (0 <= self.min_p <= 1):
            bad("min_p", "in [0, 1]")
        if self.top_k < 0:
            bad("top_k", ">= 0 (0 is off)")
        if self.max_new_tokens < 0:
            bad("max_new_tokens", ">= 0")
        if not (0 < self.repetition_penalty < math.inf):
            bad("repetition_penalty", "positive and finite")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2 <= getattr(self, name) <= 2):
                bad(name, "in [-2, 2]")
        if self.n < 1:
            bad("n", ">= 1")
        if self.num_beams < 1:
            bad("num_beams", ">= 1")
        if not (0 <= self.top_logprobs <= 20):
            bad("top_logprobs", "in [0, 20]")
        if self.num_beams > 1 and self.n > self.num_beams:
            bad("n", f"<= num_beams ({self.num_beams}) in beam search")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether the repetition, frequency or presence penalty changes the logits (greedy rows included)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0


# --------------------------------------------------------------------------- processors, in the order applied


def apply_repetition_penalty(logits: torch.Tensor, context_ids: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL penalty on each distinct id of `context_ids` (prompt + generated): z > 0 -> z/θ, z < 0 -> z·θ."""
    if penalty == 1.0 or len(context_ids) == 0:
        return logits
    # Each distinct id once: a token seen five times is penalised like one seen once (HF, vLLM).
    ids = torch.unique(torch.as_tensor(list(context_ids), dtype=torch.long, device=logits.device))
    z = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(z < 0, z * penalty, z / penalty)
    return out


def apply_frequency_presence(
    logits: torch.Tensor, generated_ids: Sequence[int], frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI penalties over generated ids only: z_i -= frequency·count_i + presence·[count_i > 0]."""
    if (frequency == 0 and presence == 0) or len(generated_ids) == 0:
        return logits
    ids = torch.as_tensor(list(generated_ids), dtype=torch.long, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.shape[-1]).to(logits.dtype)  # (V,)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mask scores below the k-th largest; ties with it survive. k > V keeps everything."""
    k = min(max(k, 1), logits.shape[-1])
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest most-likely set whose mass reaches p, including the token that crosses p.

    Worked example: probs (0.5, 0.3, 0.15, 0.05) with p = 0.7. Sorted ascending the cumulative mass is
    0.05, 0.20, 0.50, 1.0; drop positions with cumsum <= 1 - p = 0.3, i.e. 0.05 and 0.15, which keeps
    {0.5, 0.3} (mass 0.8 >= 0.7). Working from the bottom means the crossing token (0.3) is kept without
    a shift of the mask, and the top token always has cumsum 1 > 1 - p, so it always survives.
    """
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[-1] = False  # float rounding can leave cumsum[-1] a hair under 1; the top token stays regardless
    drop = torch.zeros_like(drop_sorted).scatter(0, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens with p_i < min_p · max p, on the distribution as it stands (tempered, truncated).

    Worked example: probs (0.5, 0.3, 0.15, 0.05) with min_p = 0.2 give threshold 0.2 · 0.5 = 0.1, which drops
    only 0.05. The top token always survives since max p >= min_p · max p.
    """
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p * probs.max(), -math.inf)


def process_logits(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: Sequence[int], generated_ids: Sequence[int]
) -> torch.Tensor:
    """All processors on one row `(V,)`, in the HF order; greedy applies the penalties only. Returns float32."""
    z = logits.float()
    z = apply_repetition_penalty(z, [*prompt_ids, *generated_ids], params.repetition_penalty)
    z = apply_frequency_presence(z, generated_ids, params.frequency_penalty, params.presence_penalty)
    if params.is_greedy:
        return z
    # Each warper is skipped at its off value, as HF does; that keeps e.g. top_p = 1 from masking a finite
    # logit whose probability underflowed to 0.
    if params.temperature != 1.0:
        z = apply_temperature(z, params.temperature)
    if params.top_k > 0:
        z = apply_top_k(z, params.top_k)
    if params.top_p < 1.0:
        z = apply_top_p(z, params.top_p)
    if params.min_p > 0.0:
        z = apply_min_p(z, params.min_p)
    return z


def process_batch(
    logits: torch.Tensor,
    params_list: Sequence[SamplingParams],
    prompt_ids_list: Sequence[Sequence[int]],
    generated_ids_list: Sequence[Sequence[int]],
) -> torch.Tensor:
    """`process_logits` on each row of `logits` (B, V) with that row's params and ids; returns (B, V) float32."""
    if not (len(logits) == len(params_list) == len(prompt_ids_list) == len(generated_ids_list)):
        raise ValueError(
            f"process_batch: {len(logits)} rows but {len(params_list)} params, "
            f"{len(prompt_ids_list)} prompts, {len(generated_ids_list)} outputs"
        )
    rows = [
        process_logits(row, params, prompt, generated)
        for row, params, prompt, generated in zip(logits, params_list, prompt_ids_list, generated_ids_list)
    ]
    return torch.stack(rows)  # (B, V)


# --------------------------------------------------------------------------- log-probabilities and the draw


def token_logprobs(raw_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(raw / T) over the last dim of `(V,)` or `(B, V)` raw model logits, with T = 1 for greedy.

    This is what the engine reports as a token's logprob and what PPO later scores: the model's own tempered
    distribution, before any penalty or truncation. Truncated tokens keep finite logprobs here, so the number
    does not depend on top-k/top-p/min-p settings (a sampled token's logprob is never -inf).
    """
    t = 1.0 if temperature == 0 else temperature
    return F.log_softmax(raw_logits.float() / t, dim=-1)


def sample_next(processed: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from processed logits `(V,)`: argmax when greedy, else an exact draw from their softmax."""
    if params.is_greedy:
        return int(processed.argmax())
    probs = processed.float().softmax(-1)  # masked tokens get exactly 0
    exp = torch.empty(probs.shape, device=probs.device).exponential_(generator=generator)
    # exponential_ can return exactly 0; 0/0 would be NaN, which argmax picks. Clamping keeps a masked token's
    # ratio at 0 while the top token's stays > 0, so -inf tokens are never drawn.
    exp.clamp_(min=torch.finfo(exp.dtype).tiny)
    return int((probs / exp).argmax())


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A request's own generator on `device`: seeded from `seed`, or from fresh OS entropy when None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # non-deterministic seed for this generator only; the global RNG is untouched
    else:
        generator.manual_seed(seed)
    return generator
