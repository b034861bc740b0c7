"""`lmforge serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

    lmforge serve --model runs/world/sft/final --model base=runs/world/pretrain/final --port 8000

Endpoints (the decoding reference §8 has the schemas):

- `GET /v1/models`; `POST /v1/chat/completions` (the model's chat template applied) and `POST /v1/completions`
  (a string, a list of strings or token ids), with `temperature`, `top_p`, `max_tokens` /
  `max_completion_tokens`, `n`, `stop`, `seed`, `logprobs` / `top_logprobs`, `presence_penalty`,
  `frequency_penalty`, `stream` with `stream_options.include_usage`, and, as vLLM takes them, `top_k`, `min_p`,
  `repetition_penalty`, `ignore_eos` and `stop_token_ids` at the top level (`extra_body=` in the openai client).
- `GET /health` (no key needed): running and queued sequences per model, and the engine's step count.
- Web pages: a chat at `/`, an anonymous arena at `/arena`, ratings at `/leaderboard`, and the `/api` they use,
  over the SQLite store of `--store` (web.py, store.py).
- Streaming is server-sent events: `data: <chunk>` per event, each choice's text in `choices[].delta.content`
  (`choices[].text` for completions), one chunk per choice with a `finish_reason`, an optional usage chunk, then
  `data: [DONE]`.
- Errors use OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`: 400 for anything wrong in a
  request (FastAPI's 422 is not used: the openai client and FastChat expect 400), 401 for a missing or wrong
  key, 404 for an unknown model, 408 when a request outlives `--request-timeout`, 429 when the queue is full.

Each model is served under a name: the checkpoint directory's name, or its parent's when the directory is
called `final` (`runs/world/sft/final` is `sft`); `--model NAME=PATH` picks another. Requests are batched
continuously (`batcher.py`): they join and leave the running batch between engine steps, and a client that goes
away mid-request has its sequences aborted at the next step. The server binds 127.0.0.1 unless told otherwise.

Request bodies are parsed by hand rather than through pydantic models: each field is checked once, in one
place, against the ranges of the reference (§8), and every refusal names its field in `param`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import tyro
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from lmforge.errors import BadConfigError, UserError
from lmforge.infer.engine import Delta, Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.batcher import Batcher, EngineFailure, QueueFull, Submission
from lmforge.serve.store import DEFAULT_STORE


@dataclass(frozen=True)
class ServeConfig:
    model: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """Checkpoint directory to serve, as PATH or NAME=PATH; repeat the flag to serve several. The name clients
    ask for defaults to the directory's (its parent's when it is `final`: runs/world/sft/final is `sft`)."""
    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 exposes the server to the network (set --api-key then)."""
    port: int = 8000
    api_key: str = ""
    """If set, every /v1 request must send `Authorization: Bearer API_KEY`."""
    max_batch_size: int = 32
    """Sequences decoded together in one engine step (the engine's slots)."""
    max_queue: int = 128
    """Sequences that may wait for a slot; a request that would exceed it gets 429."""
    max_len: int = 0
    """Context length in tokens (prompt + completion); 0: the model's own."""
    request_timeout: float = 600.0
    """Seconds a request may take from arrival to its last token; past that it is aborted (408)."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted."""
    device: str = "auto"
    access_log: bool = True
    """Log one line per request."""
    store: str = DEFAULT_STORE
    """SQLite file of the chat page's conversations and the arena's battles and votes (created at first use;
    relative paths are from the working directory, where `lmforge arena export` looks by default)."""


# ---------------------------------------------------------------------------------------------------------
# Errors in OpenAI's envelope


class RequestError(Exception):
    """A request the server refuses; becomes `{"error": {...}}` with `status`."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def envelope(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# The models being served


@dataclass
class ServedModel:
    name: str
    path: str
    tokenizer: object
    batcher: Batcher
    created: int

    @property
    def max_len(self) -> int:
        return self.batcher.engine.max_len


def model_specs(specs: tuple[str, ...]) -> dict[str, str]:
    """`--model` values -> {name: path}. PATH alone is named after its directory (its parent's when the directory
    is `final`); NAME=PATH names it NAME. A value that is an existing path is always a path."""
    named: dict[str, str] = {}
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
        else:
            path = spec
            directory = Path(spec).resolve()
            name = directory.parent.name if directory.name == "final" else directory.name
        if not name:
            raise BadConfigError(f"--model {spec}: empty model name")
        if name in named:
            raise BadConfigError(f"--model: two models named {name!r}; rename one with --model NAME=PATH")
        named[name] = path
    return named


def load_models(cfg: ServeConfig) -> dict[str, ServedModel]:
    from lmforge.infer.generate import _load

    if not cfg.model:
        raise BadConfigError("give at least one --model PATH (or NAME=PATH)")
    if cfg.max_batch_size < 1 or cfg.max_queue < 0:
        raise BadConfigError("--max-batch-size must be >= 1 and --max-queue >= 0")
    models = {}
    for name, path in model_specs(cfg.model).items():
        model, tokenizer = _load(path, cfg.device)
        engine = Engine(model, tokenizer, max_batch_size=cfg.max_batch_size, max_len=cfg.max_len or None)
        models[name] = ServedModel(name, path, tokenizer, Batcher(engine, cfg.max_queue), int(time.time()))
    return models


# ---------------------------------------------------------------------------------------------------------
# Reading a request


async def read_json_body(request: Request, limit: int) -> dict:
    """The body as a JSON object, read no further than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = RequestError(f"request body larger than {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def get_field(body: dict, name: str, kind: type, default, ok=None, rule: str = ""):
    """body[name] checked to be of `kind` (an int is also a float; a bool is not an int) and to pass `ok`."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise RequestError(f"'{name}' must be {_KIND_NAMES[kind]}, got {value!r:.60}", param=name)
    if ok is not None and not ok(value):
        raise RequestError(f"'{name}' must be {rule}, got {value!r:.60}", param=name)
    return value


_KIND_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string", list: "a list",
               dict: "an object"}

# Fields of the OpenAI API that this server cannot honour: refused rather than silently ignored.
UNSUPPORTED = ("logit_bias", "tools", "functions", "echo", "suffix", "use_beam_search")


def pick_model(body: dict, models: dict[str, ServedModel]) -> ServedModel:
    name = get_field(body, "model", str, None)
    if name is None:
        raise RequestError("'model' is required", param="model")
    if name not in models:
        raise RequestError(f"model {name!r} is not served here; served: {', '.join(models)}", status=404,
                           param="model", code="model_not_found")
    return models[name]


def chat_prompt(body: dict, served: ServedModel) -> list[int]:
    """`messages` -> prompt ids through the model's chat template, ending where the assistant's reply starts."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text can be read by a text model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}]: 'content' must be a string or a list of text parts",
                               param="messages")
        # "developer" is OpenAI's newer name for the system role
        role = "system" if message["role"] == "developer" else message["role"]
        plain.append({"role": role, "content": content})
    try:
        return served.tokenizer.render_prompt(plain)
    except Exception as e:  # noqa: BLE001 - an unknown role, or a template that refuses these messages
        raise RequestError(f"messages: {e}", param="messages") from None


def completion_prompts(body: dict, served: ServedModel) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt")
    vocab = served.tokenizer.vocab_size

    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise RequestError("'prompt' must be a string, a list of strings, or (lists of) token ids", param="prompt")
    encoded = []
    for p in prompts:
        if isinstance(p, str):
            encoded.append(served.tokenizer.encode(p, add_bos=True))
        elif not all(0 <= t < vocab for t in p):
            raise RequestError(f"'prompt': token ids must be in [0, {vocab})", param="prompt")
        else:
            encoded.append(list(p))
    return encoded


@dataclass(frozen=True)
class Job:
    """What a request asks for, checked: prompts (token ids), sampling params (n included) and how to answer."""

    served: ServedModel
    is_chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    top_logprobs: int | None  # None: no logprobs in the answer
    stream: bool
    include_usage: bool
    timeout: float

    def sequences(self) -> list[tuple[list[int], SamplingParams]]:
        """Prompt-major: choice index i * n + j is prompt i's sample j. Sample j is seeded seed + j, as in
        `Engine.generate`, so a seeded request gives the same texts here as on a local engine."""
        p, n = self.params, self.params.n
        return [(prompt, replace(p, n=1, seed=None if p.seed is None else p.seed + j))
                for prompt in self.prompts for j in range(n)]


def read_job(body: dict, served: ServedModel, is_chat: bool, capacity: int, timeout: float) -> Job:
    for name in UNSUPPORTED:
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by this server", param=name)
    prompts = [chat_prompt(body, served)] if is_chat else completion_prompts(body, served)
    longest = max(len(p) for p in prompts)
    if longest >= served.max_len:
        raise RequestError(f"the prompt has {longest} tokens; the model's context is {served.max_len}, with room "
                           f"for at least one new token", param="messages" if is_chat else "prompt",
                           code="context_length_exceeded")

    # max_completion_tokens is the newer name; chat defaults to the rest of the context, completions to 16
    # (the legacy API's default, also vLLM's)
    room = served.max_len - longest
    max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get_field(body, max_tokens_name, int, room if is_chat else min(16, room), lambda v: v >= 1, ">= 1")
    if longest + max_tokens > served.max_len:
        raise RequestError(f"'{max_tokens_name}' is {max_tokens}, but the prompt has {longest} tokens and the "
                           f"model's context is {served.max_len}: at most {room} new tokens fit",
                           param=max_tokens_name, code="context_length_exceeded")

    if is_chat:
        wants_logprobs = get_field(body, "logprobs", bool, False)
        top = get_field(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20, "in [0, 20]")
        if top and not wants_logprobs:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        top_logprobs = top if wants_logprobs else None
    else:
        top_logprobs = get_field(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "in [0, 5]")

    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= 16
                                 and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("'stop' must be a non-empty string or a list of at most 16 of them", param="stop")
    stop_token_ids = get_field(body, "stop_token_ids", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_token_ids):
        raise RequestError("'stop_token_ids' must be a list of token ids", param="stop_token_ids")

    n = get_field(body, "n", int, 1, lambda v: v >= 1, ">= 1")
    if n * len(prompts) > capacity:
        raise RequestError(f"{n * len(prompts)} sequences (n x prompts) can never fit this server's batch and queue "
                           f"({capacity})", param="n")
    top_k = get_field(body, "top_k", int, 0, lambda v: v >= -1, ">= 0, or -1 for off")
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=get_field(body, "temperature", float, 1.0, lambda v: 0 <= v <= 2, "in [0, 2]"),
            top_p=get_field(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
            top_k=max(top_k, 0),  # vLLM's -1 and lmforge's 0 both mean off
            min_p=get_field(body, "min_p", float, 0.0, lambda v: 0 <= v <= 1, "in [0, 1]"),
            repetition_penalty=get_field(body, "repetition_penalty", float, 1.0,
                                         lambda v: 0 < v < math.inf, "positive"),
            presence_penalty=get_field(body, "presence_penalty", float, 0.0, lambda v: -2 <= v <= 2, "in [-2, 2]"),
            frequency_penalty=get_field(body, "frequency_penalty", float, 0.0, lambda v: -2 <= v <= 2,
                                        "in [-2, 2]"),
            stop=tuple(stop or ()),
            stop_token_ids=tuple(stop_token_ids),
            ignore_eos=get_field(body, "ignore_eos", bool, False),
            seed=get_field(body, "seed", int, None, lambda v: abs(v) < 2**62, "an integer below 2**62 in size"),
            n=n,
            logprobs=top_logprobs is not None,
            top_logprobs=top_logprobs or 0,
        )
    except BadConfigError as e:  # a rule SamplingParams keeps that the checks above do not repeat
        raise RequestError(str(e)) from None

    stream = get_field(body, "stream", bool, False)
    options = get_field(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise RequestError("'stream_options' is only allowed with 'stream': true", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    return Job(served, is_chat, prompts, params, top_logprobs, stream, include_usage, timeout)


# ---------------------------------------------------------------------------------------------------------
# Running a job: deltas from the batcher, until every sequence has finished


async def job_deltas(job: Job, submission: Submission):
    """Yield lists of `(index, Delta)`, whatever has arrived since the last yield, until every sequence has
    finished. When the event loop falls behind the engine, a request's deltas pile up in its queue and go out
    together: the per-event cost (a JSON dump, a socket write) is then paid once per wake-up, not once per token.
    Leaving early (a client gone, a timeout, an error) aborts whatever is still running, so its batch slots free
    up at the next step."""
    unfinished = len(submission.sequences)
    deadline = asyncio.get_running_loop().time() + job.timeout
    try:
        while unfinished:
            try:
                async with asyncio.timeout_at(deadline):
                    arrived = [await submission.queue.get()]
            except TimeoutError:
                raise RequestError(f"the request took longer than {job.timeout:g} s", status=408,
                                   type="timeout_error", code="request_timeout") from None
            while not submission.queue.empty():
                arrived.append(submission.queue.get_nowait())
            for _, item in arrived:
                if isinstance(item, EngineFailure):
                    raise RequestError(str(item), status=500, type="server_error")
                if item.finished:
                    unfinished -= 1
            yield arrived
    finally:
        if unfinished:
            job.served.batcher.cancel(submission)


@dataclass
class ChoiceState:
    """One choice's progress: its text so far, tokens generated, log-probabilities not yet sent."""

    text: str = ""
    n_tokens: int = 0
    finish_reason: str | None = None
    pending: list = field(default_factory=list)  # (token text, logprob, [(alternative, logprob), ...]) per token
    text_offset: int = 0

    def add(self, job: Job, delta: Delta) -> None:
        self.text += delta.text
        self.n_tokens += len(delta.token_ids)
        if delta.finished:
            self.finish_reason = delta.finish_reason
        if job.top_logprobs is None:
            return
        tokenizer, params = job.served.tokenizer, job.params
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else {tokenizer.eos_id})
        for k, (token, logprob) in enumerate(zip(delta.token_ids, delta.logprobs)):
            if delta.finish_reason == "stop" and token in stop_ids:
                continue  # the stop token ends the text but is not part of it (OpenAI, vLLM)
            alternatives = delta.top_logprobs[k] if delta.top_logprobs else {}
            self.pending.append((token_text(tokenizer, token), logprob,
                                 [(token_text(tokenizer, t), lp) for t, lp in alternatives.items()]))

    def take_logprobs(self, job: Job) -> dict | None:
        """The pending log-probabilities in the endpoint's format (then forgotten), or None without logprobs."""
        if job.top_logprobs is None:
            return None
        entries, self.pending = self.pending, []
        if job.is_chat:
            return {"content": [
                {"token": text, "logprob": lp, "bytes": list(text.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in alternatives]}
                for text, lp, alternatives in entries]}
        offsets = []
        for text, _, _ in entries:
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(alternatives) for _, _, alternatives in entries] if job.top_logprobs else None,
                "text_offset": offsets}


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special=False)


def usage(job: Job, choices: list[ChoiceState]) -> dict:
    prompt_tokens = sum(len(p) for p in job.prompts)  # each prompt once, whatever n is (OpenAI)
    completion_tokens = sum(c.n_tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def answer(job: Job, submission: Submission) -> dict:
    """The whole response of a non-streamed request."""
    choices = [ChoiceState() for _ in submission.sequences]
    async for arrived in job_deltas(job, submission):
        for index, delta in arrived:
            choices[index].add(job, delta)
    response_id = ("chatcmpl-" if job.is_chat else "cmpl-") + uuid.uuid4().hex
    body = {"id": response_id, "object": "chat.completion" if job.is_chat else "text_completion",
            "created": int(time.time()), "model": job.served.name, "system_fingerprint": "lmforge"}
    if job.is_chat:
        body["choices"] = [{"index": i, "message": {"role": "assistant", "content": c.text},
                            "logprobs": c.take_logprobs(job), "finish_reason": c.finish_reason}
                           for i, c in enumerate(choices)]
    else:
        body["choices"] = [{"index": i, "text": c.text, "logprobs": c.take_logprobs(job),
                            "finish_reason": c.finish_reason} for i, c in enumerate(choices)]
    body["usage"] = usage(job, choices)
    return body


async def stream_events(job: Job, submission: Submission):
    """Server-sent events of a streamed request: chunks as the engine makes text, one finish chunk per choice,
    the usage chunk if asked for, then [DONE]. An error after the stream has begun is sent as an event."""
    choices = [ChoiceState() for _ in submission.sequences]
    response_id = ("chatcmpl-" if job.is_chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": response_id, "object": "chat.completion.chunk" if job.is_chat else "text_completion",
            "created": int(time.time()), "model": job.served.name, "system_fingerprint": "lmforge"}

    def event(chunk_choices: list[dict], **extra) -> str:
        chunk = {**head, "choices": chunk_choices, **extra}
        if job.include_usage and "usage" not in chunk:
            chunk["usage"] = None
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def choice(index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        logprobs = None if role else choices[index].take_logprobs(job)
        if not job.is_chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    try:
        if job.is_chat:  # the first chunk of every choice names the role
            yield event([choice(i, "", role=True) for i in range(len(choices))])
        async for arrived in job_deltas(job, submission):
            new_text: dict[int, str] = {}  # per choice, in order of arrival
            for index, delta in arrived:
                choices[index].add(job, delta)
                new_text[index] = new_text.get(index, "") + delta.text
            finished = {index for index, delta in arrived if delta.finished}
            events = []
            for index, text in new_text.items():
                if text:
                    events.append(event([choice(index, text)]))
                if index in finished:
                    events.append(event([choice(index, None, finish_reason=choices[index].finish_reason)]))
            if events:  # nothing when the new tokens' text is held back (a partial character or stop string)
                yield "".join(events)
        if job.include_usage:
            yield event([], usage=usage(job, choices))
    except RequestError as e:
        yield f"data: {json.dumps(e.envelope())}\n\n"
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------
# The app


def build_app(models: dict[str, ServedModel], cfg: ServeConfig) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        for served in models.values():
            served.batcher.start()
        yield
        for served in models.values():
            served.batcher.stop()

    app = FastAPI(title="lmforge", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse(e.envelope(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown paths and methods, in the same envelope
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(RequestError(str(e.detail), e.status_code, kind).envelope(), status_code=e.status_code)

    async def check_api_key(request: Request):
        if not cfg.api_key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
            raise RequestError("missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                               status=401, type="authentication_error", code="invalid_api_key")

    router = APIRouter(dependencies=[Depends(check_api_key)])

    @router.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "lmforge", "max_model_len": m.max_len}
            for m in models.values()]}

    async def generate(request: Request, is_chat: bool):
        body = await read_json_body(request, cfg.max_body_bytes)
        served = pick_model(body, models)
        batcher = served.batcher
        job = read_job(body, served, is_chat, batcher.capacity, cfg.request_timeout)
        try:
            submission = batcher.submit(job.sequences())
        except QueueFull as e:
            raise RequestError(str(e), status=429, type="rate_limit_error", code="queue_full") from None
        if job.stream:
            # the background task also runs when the client leaves before the first event (the stream's own
            # cleanup covers a client that leaves later); cancel() is a no-op once everything has finished
            return StreamingResponse(stream_events(job, submission), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(batcher.cancel, submission))
        # A plain request's handler is not told when its client leaves; race the work against the disconnect.
        work = asyncio.ensure_future(answer(job, submission))
        gone = asyncio.ensure_future(client_gone(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            batcher.cancel(submission)
            return Response(status_code=499)  # nobody reads it
        gone.cancel()
        return work.result()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, is_chat=True)

    @router.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, is_chat=False)

    app.include_router(router)

    @app.get("/health")
    async def health():
        per_model = {m.name: {"active": m.batcher.active, "queued": m.batcher.queued, "steps": m.batcher.steps,
                              "max_batch_size": m.batcher.engine.max_batch_size, "max_queue": m.batcher.max_queue}
                     for m in models.values()}
        return {"status": "ok", "active": sum(m["active"] for m in per_model.values()),
                "queued": sum(m["queued"] for m in per_model.values()), "models": per_model}

    from lmforge.serve.web import add_web_routes  # web.py builds on this module's request handling

    add_web_routes(app, models, cfg, check_api_key)
    return app


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    models = load_models(cfg)
    app = build_app(models, cfg)
    for m in models.values():
        print(f"serving {m.name!r} ({m.path}, context {m.max_len}) at http://{cfg.host}:{cfg.port}/v1", flush=True)
    print(f"chat at http://{cfg.host}:{cfg.port}/, arena at /arena, leaderboard at /leaderboard "
          f"(conversations and votes in {cfg.store})", flush=True)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print("warning: listening beyond this machine without --api-key", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, access_log=cfg.access_log, timeout_graceful_shutdown=5,
                    log_level="info")
    except SystemExit as e:  # uvicorn exits when it cannot bind the port
        raise UserError(f"could not serve on {cfg.host}:{cfg.port} (is the port in use?)") from e
