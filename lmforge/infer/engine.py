"""The generation engine, shared by the CLI, evaluation, RL rollouts and the server (DESIGN §4b).

`Engine(model, tokenizer)` works on a live model object, so PPO can roll out the very policy it trains.
Requests join and leave a running batch:

    engine.add(prompt_ids, SamplingParams(...)) -> request_id
    engine.step() -> [Delta, ...]      one new token for every running request (text deltas, finish reasons)
    engine.abort(request_id)           frees the request's slot at once

and `generate()` / `stream()` are loops over these. How it works:

- **Slots.** The KV cache has `max_batch_size` rows ("slots", as llama.cpp calls them), each with a length of
  its own. A new request is prefilled into a free slot (its prompt at positions 0..P-1; requests admitted
  together whose prompts have one length share a forward pass); then every step decodes all running requests
  together, each at its own position, with a mask that lets a row see only its own filled positions. Rows never
  share padding, so a request's numbers do not depend on its neighbours.
- **Speed.** A tiny model's decode step is bound by per-op overhead, not arithmetic, so the common case gets a
  shorter path: when the decoding rows sit in consecutive slots at one position (batch 1, or a batch of
  equal-length prompts) the step is the model's own KV-cache path, with rotary tables sliced rather than
  gathered, no mask, and cache slices rather than gathered copies. Greedy rows share one argmax. Both
  shortcuts give the same tokens as the general path (`tests/test_engine.py`).
- **Sampling per row.** Each request has its own `SamplingParams` and its own seeded `torch.Generator`, so a
  seeded request gives the same text alone or in any batch. The processors and their order are in
  `sampling.py` (Hugging Face's order).
- **Logprobs** are log-softmax(logits / temperature) of the raw logits, before penalties and truncation: the
  quantity PPO scores.
- **Text.** The generated ids are re-decoded each step and only the new suffix is emitted, held back while it
  ends in an incomplete UTF-8 character (U+FFFD from byte-level BPE) or in what may be the start of a stop
  string, so a stop string never reaches the output, even when it spans several tokens.
- **Finish.** EOS or a stop token id ("stop"; the token is kept in `token_ids` so logprobs line up, but not
  in the text), a stop string ("stop"; cut before the match), `max_new_tokens` or a full context ("length").
- **Beam search** (`num_beams > 1`) runs on its own, one prompt at a time, with Hugging Face's semantics
  (`beam_search` below), so its results can be checked against `transformers`' `generate`.
- **Models without a slot cache** (a Hugging Face model through `hf.HFCausalLM`) are recomputed over the
  whole sequence each step: slower, same results.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import BadConfigError
from lmforge.infer.sampling import SamplingParams, make_generator, process_logits, sample_next, token_logprobs


@dataclass
class Delta:
    """What one request produced in one `step()`."""

    request_id: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"


@dataclass
class Output:
    """A finished request. `index` tells apart the n samples of one prompt."""

    prompt_index: int
    index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    score: float | None = None  # beam search: the length-penalised sum of logprobs


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    sent: str = ""  # text already emitted
    finish_reason: str | None = None


# ---------------------------------------------------------------------------------------------------------
# The slot cache and the views the model writes through


class SlotCache:
    """Per-layer keys/values of shape (slots, n_kv_heads, max_len, head_dim) and a length per slot.

    The lengths live on the host: the engine knows them without asking the device (no sync per step)."""

    def __init__(self, n_layers, n_slots, n_kv_heads, head_dim, max_len, dtype, device):
        shape = (n_slots, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * n_slots
        self.max_len = max_len


class _SameLengthView:
    """Slots first..first+B-1, all filled to the same `length` (0 for a prompt): the model's own `KVCache` path.
    Each call writes its T new positions at [length, length + T) and returns cache slices up to there; the model
    slices its rotary tables at `length` and needs no mask (causal within a prompt). Every prefill takes this
    path, and so does a decode step whose rows are consecutive and at one position (batch 1, or a batch of
    equal-length prompts): no gathered copies, no mask."""

    def __init__(self, cache: SlotCache, first: int, n_rows: int, length: int):
        self.cache, self.rows, self.length = cache, slice(first, first + n_rows), length

    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        keys, values = self.cache.keys[layer][self.rows], self.cache.values[layer][self.rows]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n):
        for slot in range(self.rows.start, self.rows.stop):
            self.cache.lengths[slot] = self.length + n  # a reused slot's old length is overwritten


class _DecodeView:
    """Writes one new position per row at that row's length; returns keys/values up to the longest row."""

    def __init__(self, cache: SlotCache, slots: list[int], device):
        self.cache, self.slots = cache, slots
        self.rows = torch.tensor(slots, device=device)
        self.positions = torch.tensor([cache.lengths[s] for s in slots], device=device)  # (B,)
        self.span = max(cache.lengths[s] for s in slots) + 1

    def update(self, layer, k, v):
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        # under autocast (a training loop's evaluation) k and v arrive in bf16; the cache keeps the weights' dtype
        keys[self.rows, :, self.positions] = k[:, :, 0].to(keys.dtype)
        values[self.rows, :, self.positions] = v[:, :, 0].to(values.dtype)
        return keys[self.rows, :, : self.span], values[self.rows, :, : self.span]

    def advance(self, n):
        for slot in self.slots:
            self.cache.lengths[slot] += n

    def mask(self) -> torch.Tensor:
        """(B, 1, 1, span): row b sees positions 0..positions[b]."""
        span = torch.arange(self.span, device=self.positions.device)
        return (span[None, :] <= self.positions[:, None])[:, None, None, :]


# ---------------------------------------------------------------------------------------------------------
# The engine


class Engine:
    def __init__(self, model, tokenizer, max_batch_size: int = 16, max_len: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.max_batch_size = max_batch_size
        p = next(model.parameters())
        self.device = p.device
        self.has_slot_cache = hasattr(model, "new_kv_cache")
        self.cache = None
        if self.has_slot_cache:
            cfg = model.cfg
            self.cache = SlotCache(cfg.n_layers, max_batch_size, cfg.n_kv_heads, cfg.resolved_head_dim,
                                   self.max_len, p.dtype, p.device)
        self.waiting: deque[_Request] = deque()
        self.running: dict[int, _Request] = {}  # slot -> request
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------------------

    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise BadConfigError("empty prompt: give at least one token (a BOS at least)")
        if len(prompt_ids) >= self.max_len:
            raise BadConfigError(f"prompt of {len(prompt_ids)} tokens leaves no room in the model's context of "
                                 f"{self.max_len} tokens")
        if params.num_beams > 1 or params.n > 1:
            raise BadConfigError("Engine.add takes one sample without beams; use generate() for n > 1 or num_beams > 1")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.add(self.tokenizer.eos_id)
        request = _Request(next(self._ids), prompt_ids, params, make_generator(params.seed, self.device),
                           frozenset(stop_ids))
        self.waiting.append(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        for r in list(self.waiting):
            if r.id == request_id:
                self.waiting.remove(r)
                r.finish_reason = "abort"
                return True
        for slot, r in list(self.running.items()):
            if r.id == request_id:
                del self.running[slot]
                r.finish_reason = "abort"
                return True
        return False

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ---------------------------------------------------------------------------------------

    # Inference mode, not just no_grad: it also skips version counters and view tracking on every op, about
    # 15% of a tiny model's decode step on CPU.
    @torch.inference_mode()
    def step(self) -> list[Delta]:
        """Admit waiting requests into free slots (prefill: their first token), then decode one token for
        every request that was already running. Returns one Delta per request that advanced."""
        deltas = []
        decoding = [self.running[s] for s in sorted(self.running)]
        free = [s for s in range(self.max_batch_size) if s not in self.running]
        admitted = []
        while self.waiting and free:
            request = self.waiting.popleft()
            request.slot = free.pop(0)
            self.running[request.slot] = request
            admitted.append(request)
        for group in _same_length_runs(admitted):
            deltas += self._advance(group, self._prefill(group))
        if decoding:
            deltas += self._advance(decoding, self._decode(decoding))
        for d in deltas:
            if d.finished:
                self.running = {s: r for s, r in self.running.items() if r.id != d.request_id}
        return deltas

    def _prefill(self, requests: list[_Request]) -> torch.Tensor:
        """Prompts of one length in consecutive slots, in one forward pass; returns their last logits (B, V)."""
        ids = torch.tensor([r.prompt_ids for r in requests], device=self.device)  # (B, T)
        if not self.has_slot_cache:
            return self.model(ids)[:, -1]
        view = _SameLengthView(self.cache, requests[0].slot, len(requests), 0)
        return self.model(ids, kv_cache=view)[:, -1]  # (B, V)

    def _decode(self, requests: list[_Request]) -> torch.Tensor:
        if not self.has_slot_cache:  # recompute each row's whole sequence
            return torch.stack([self.model(torch.tensor([r.prompt_ids + r.generated], device=self.device))[0, -1]
                                for r in requests])
        last = torch.tensor([[r.generated[-1]] for r in requests], device=self.device)  # (B, 1)
        slots = [r.slot for r in requests]
        lengths = {self.cache.lengths[s] for s in slots}
        if len(lengths) == 1 and slots == list(range(slots[0], slots[0] + len(slots))):
            view = _SameLengthView(self.cache, slots[0], len(slots), lengths.pop())
            return self.model(last, kv_cache=view)[:, -1]  # (B, V)
        view = _DecodeView(self.cache, slots, self.device)
        logits = self.model(last, position_ids=view.positions[:, None], attn_mask=view.mask(), kv_cache=view)
        return logits[:, -1]  # (B, V)

    def _advance(self, requests: list[_Request], raw_logits: torch.Tensor) -> list[Delta]:
        """Choose each request's next token from its row of `raw_logits` (B, V), record it, and work out the text
        it adds and whether the request ends."""
        raw = raw_logits.float()
        # A greedy row without penalties gets the argmax of its raw logits (what process_logits + sample_next
        # would give it); those rows share one argmax and one device sync instead of a few ops each.
        plain = [r.params.is_greedy and not r.params.has_penalties for r in requests]
        argmax = raw.argmax(-1).tolist() if any(plain) else []
        tokens = [argmax[i] if plain[i] else
                  sample_next(process_logits(raw[i], r.params, r.prompt_ids, r.generated), r.params, r.generator)
                  for i, r in enumerate(requests)]
        temperatures = {r.params.temperature or 1.0 for r in requests}  # greedy logprobs are at T = 1
        if len(temperatures) == 1:
            logp = token_logprobs(raw, temperatures.pop())  # (B, V)
        else:
            logp = torch.stack([token_logprobs(raw[i], r.params.temperature) for i, r in enumerate(requests)])
        chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()

        deltas = []
        for r, token, logprob, row in zip(requests, tokens, chosen, logp):
            r.generated.append(token)
            r.logprobs.append(logprob)
            if r.params.top_logprobs:
                values, ids = row.topk(r.params.top_logprobs)
                r.top_logprobs.append(dict(zip(ids.tolist(), values.tolist())))
            if token in r.stop_ids:
                r.finish_reason = "stop"
            elif len(r.generated) >= r.params.max_new_tokens or len(r.prompt_ids) + len(r.generated) >= self.max_len:
                r.finish_reason = "length"
            text_ids = r.generated[:-1] if r.finish_reason == "stop" else r.generated
            text = self._new_text(r, self.tokenizer.decode(text_ids))
            deltas.append(Delta(r.id, [token], text, [logprob], r.top_logprobs[-1:] if r.params.top_logprobs else [],
                                r.finish_reason is not None, r.finish_reason))
        return deltas

    def _new_text(self, r: _Request, full: str) -> str:
        """The text to emit now. Cuts at a stop string (finishing r), otherwise holds back an incomplete UTF-8
        character and any tail that could still grow into a stop string, until r finishes."""
        stops = r.params.stop
        if stops:
            search_from = max(0, len(r.sent) - max(len(s) for s in stops))
            hits = [i for i in (full.find(s, search_from) for s in stops) if i >= 0]
            if hits:
                r.finish_reason = "stop"
                full = full[: min(hits)]
        end = len(full)
        while end > len(r.sent) and full[end - 1] == "\ufffd":  # an incomplete character: wait, or drop at the end
            end -= 1
        if r.finish_reason is None:
            for s in stops:  # the longest tail of the text that is a proper prefix of a stop string
                for n in range(min(len(s) - 1, end - len(r.sent)), 0, -1):
                    if full[end - n:end] == s[:n]:
                        end -= n
                        break
        new = full[len(r.sent):end]
        r.sent += new
        return new

    # -- loops built on step() ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int] | str],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Output]:
        """Run prompts (token ids, or strings encoded with BOS) to completion. Returns one Output per prompt and
        sample (n per prompt, prompt-major); `params` may be one for all or one per prompt."""
        prompts = [self.tokenizer.encode(p, add_bos=True) if isinstance(p, str) else list(p) for p in prompts]
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise BadConfigError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        results: list[Output] = []
        owner: dict[int, tuple[int, int]] = {}  # request id -> (prompt index, sample index)
        requests: dict[int, _Request] = {}
        # Requests join in order of prompt length: prompts of one length admitted together share a prefill
        # pass, and a row's numbers do not depend on its neighbours, so only the speed changes.
        for i in sorted(range(len(prompts)), key=lambda k: len(prompts[k])):
            prompt, p = prompts[i], per_prompt[i]
            if p.num_beams > 1:
                for out in self.beam_search(prompt, p):
                    out.prompt_index = i
                    results.append(out)
                continue
            for j in range(p.n):
                request_id = self.add(prompt, _one_sample(p, j))
                owner[request_id] = (i, j)
                requests[request_id] = self.waiting[-1]
        while any(r.finish_reason is None for r in requests.values()):
            for d in self.step():
                if d.finished and d.request_id in owner:
                    r = requests[d.request_id]
                    i, j = owner[d.request_id]
                    results.append(Output(i, j, r.prompt_ids, r.generated, r.sent, r.finish_reason,
                                          r.logprobs, r.top_logprobs))
        return sorted(results, key=lambda o: (o.prompt_index, o.index))

    def stream(self, prompt: Sequence[int] | str, params: SamplingParams | None = None) -> Iterator[Delta]:
        """Yield the deltas of one request as they are made (other requests in the engine advance too)."""
        ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        request_id = self.add(ids, params)
        while True:
            for d in self.step():
                if d.request_id == request_id:
                    yield d
                    if d.finished:
                        return

    # -- beam search -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def beam_search(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[Output]:
        """Beam search with `transformers`' semantics (generation/utils.py, 5.x), so results can be compared:

        - beam 0 starts at score 0 and the others at -1e9, so step 1 does not pick one token k times;
        - each step takes the top max(2, 1 + n_eos) * k candidates of (beam score + log-softmax) over all beams;
          the best k that do not end (EOS, or the length limit) continue; ending candidates among the top k
          are scored sum(log p) / generated_length ** length_penalty and merged into the k best finished;
        - early_stopping=True stops once k hypotheses have finished; False stops when the best running beam,
          scored at its current length, can no longer beat the worst finished one.
        Logits processors other than log-softmax are not applied (as in `transformers` with default settings).
        """
        k, prompt = params.num_beams, list(prompt_ids)
        P = len(prompt)
        max_length = min(P + params.max_new_tokens, self.max_len)
        if P >= max_length:
            raise BadConfigError(f"prompt of {P} tokens leaves no room in the model's context of {self.max_len}")
        eos = sorted({self.tokenizer.eos_id, *params.stop_token_ids} - (set() if not params.ignore_eos else {self.tokenizer.eos_id}))
        n_keep = max(2, 1 + len(eos)) * k
        lp = params.length_penalty
        neg = -1.0e9

        running = torch.full((k, max_length), self.tokenizer.pad_id, dtype=torch.long)
        running[:, :P] = torch.tensor(prompt)
        running_scores = torch.full((k,), neg)
        running_scores[0] = 0.0
        finished = running.clone()
        finished_scores = torch.full((k,), neg)
        finished_flags = torch.zeros(k, dtype=torch.bool)
        finished_lengths = torch.zeros(k, dtype=torch.long)
        improvable = True
        eos_t = torch.tensor(eos, dtype=torch.long)

        cache = self.model.new_kv_cache(batch_size=k, max_len=max_length) if self.has_slot_cache else None
        if cache is not None:
            logits = self.model(running[:, :P].to(self.device), kv_cache=cache)[:, -1]
        else:
            logits = self.model(running[:, :P].to(self.device))[:, -1]
        cur_len = P
        while True:
            logp = F.log_softmax(logits.float().cpu(), dim=-1)  # (k, V)
            V = logp.shape[-1]
            scores = (logp + running_scores[:, None]).reshape(-1)
            top_scores, top_idx = torch.topk(scores, n_keep)
            beam_of, token = top_idx // V, top_idx % V
            candidates = running[beam_of].clone()
            candidates[:, cur_len] = token
            ends = torch.isin(token, eos_t) | (cur_len + 1 >= max_length)

            # the best k candidates that go on
            go_on = top_scores + ends.float() * neg
            keep = torch.topk(go_on, k).indices
            running, running_scores, parents = candidates[keep], go_on[keep], beam_of[keep]

            # ending candidates among the top k join the finished set if they are among its k best
            final = top_scores / ((cur_len + 1 - P) ** lp)
            if bool(finished_flags.all()) and params.early_stopping is True:
                final = final + neg
            if not improvable:
                final = final + neg
            just_finished = ends & (torch.arange(n_keep) < k)
            final = final + (~just_finished).float() * neg
            merged_scores = torch.cat([finished_scores, final])
            best = torch.topk(merged_scores, k).indices
            finished = torch.cat([finished, candidates])[best]
            finished_scores = merged_scores[best]
            finished_flags = torch.cat([finished_flags, just_finished])[best]
            finished_lengths = torch.cat([finished_lengths, torch.full((n_keep,), cur_len + 1 - P)])[best]

            cur_len += 1
            best_len = (max_length - P) if (params.early_stopping == "never" and lp > 0) else (cur_len - P)
            best_running = running_scores[0] / (best_len ** lp)
            worst_finished = finished_scores.min() if bool(finished_flags.all()) else torch.tensor(neg)
            improvable = improvable and bool(best_running > worst_finished)
            all_done = bool(finished_flags.all()) and params.early_stopping is True
            if not improvable or all_done or bool(ends.all()):
                break
            if cache is not None:
                for layer in range(len(cache.keys)):  # reorder the cache to follow the chosen parents
                    cache.keys[layer] = cache.keys[layer][parents.to(self.device)]
                    cache.values[layer] = cache.values[layer][parents.to(self.device)]
                logits = self.model(running[:, cur_len - 1:cur_len].to(self.device), kv_cache=cache)[:, -1]
            else:
                logits = self.model(running[:, :cur_len].to(self.device))[:, -1]

        outputs = []
        for j in range(params.n):
            n_gen = int(finished_lengths[j])
            ids = finished[j, P:P + n_gen].tolist()
            reason = "stop" if ids and ids[-1] in eos else "length"
            text_ids = ids[:-1] if reason == "stop" else ids
            outputs.append(Output(0, j, prompt, ids, self.tokenizer.decode(text_ids), reason,
                                  score=float(finished_scores[j])))
        return outputs


def _same_length_runs(requests: list[_Request]) -> list[list[_Request]]:
    """Split requests (in slot order) into runs of equal prompt length in consecutive slots: each run is
    prefilled as one batch."""
    runs: list[list[_Request]] = []
    for r in requests:
        last = runs[-1][-1] if runs else None
        if last is not None and r.slot == last.slot + 1 and len(r.prompt_ids) == len(last.prompt_ids):
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


def _one_sample(params: SamplingParams, j: int) -> SamplingParams:
    """The j-th of n samples: n = 1, and a seed of its own (seed + j) so the samples differ but repeat."""
    return replace(params, n=1, seed=None if params.seed is None else params.seed + j)

