"""Any OpenAI-compatible server as a model: `lmforge serve`, vLLM, llama.cpp's server, Ollama, or OpenAI itself.

    model = EndpointModel(*parse_endpoint("openai:http://127.0.0.1:8000/v1/sft"))
    model.complete(["The town of"], SamplingParams(temperature=0, max_new_tokens=16))   -> ["Velmora is ..."]
    model.chat([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=32)) -> ["Hello! ..."]

Requests go out concurrently from a pool of `concurrency` threads, so a batching server runs them together in
one batch instead of one after another. Only `httpx` is used (the `openai` package is a test dependency).

`SamplingParams` maps onto the request fields as vLLM reads them: `max_new_tokens` -> `max_tokens`, and the
fields OpenAI lacks (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`) are sent at the top
level, where `lmforge serve` and vLLM take them and OpenAI ignores them. With the same seed, `lmforge serve`
returns what a local `Engine.generate` would: a seed reproduces a request's tokens whatever else is batched with
it, and sample j of n is seeded seed + j on both sides. Beam search has no counterpart in the API.

A server that is busy (429) is retried a few times with a growing pause; any other error envelope, or a server
that cannot be reached, raises `EndpointError` naming the endpoint.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from lmforge.errors import BadConfigError, UserError
from lmforge.infer.sampling import SamplingParams

BUSY_RETRIES = 6  # pauses of 0.5, 1, 2, 4, 8, 8 s: about 24 s for a busy server to make room


class EndpointError(UserError):
    """An endpoint could not be reached, or it answered with an error."""


def parse_endpoint(spec: str) -> tuple[str, str]:
    """`openai:http://HOST:PORT/v1/MODEL` -> (`http://HOST:PORT/v1`, `MODEL`). The model name may contain
    slashes (`openai:http://host/v1/org/model`); the base URL ends at the first `/v1`."""
    prefix = "openai:"
    rest = spec[len(prefix):] if spec.startswith(prefix) else ""
    base, sep, model = rest.partition("/v1/")
    if not rest.startswith(("http://", "https://")) or not sep or not model.strip("/"):
        raise BadConfigError(f"endpoint {spec!r}: expected openai:http://HOST:PORT/v1/MODEL")
    return base + "/v1", model.strip("/")


class EndpointModel:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0):
        self.base_url, self.model, self.concurrency = base_url.rstrip("/"), model, concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=concurrency))

    def complete(self, prompts: list[str], params: SamplingParams) -> list[str]:
        """Continue each prompt: n texts per prompt (params.n), prompt-major, as `Engine.generate` orders them."""
        return self._run("/completions", [{"prompt": p} for p in prompts], params, lambda c: c["text"])

    def chat(self, conversations: list[list[dict]], params: SamplingParams) -> list[str]:
        """The assistant's next reply to each conversation (lists of {role, content}): n per conversation."""
        return self._run("/chat/completions", [{"messages": m} for m in conversations], params,
                         lambda c: c["message"]["content"] or "")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "EndpointModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------------------

    def _run(self, path: str, inputs: list[dict], params: SamplingParams, text_of) -> list[str]:
        fields = request_fields(params)

        def one(payload: dict) -> list[str]:
            choices = sorted(self._post(path, {"model": self.model, **payload, **fields})["choices"],
                             key=lambda c: c["index"])
            return [text_of(c) for c in choices]

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(inputs)))) as pool:
            futures = [pool.submit(one, payload) for payload in inputs]
            try:
                return [text for future in futures for text in future.result()]
            except BaseException:
                for future in futures:  # fail fast: do not send what has not gone out yet
                    future.cancel()
                raise

    def _post(self, path: str, body: dict) -> dict:
        where = f"openai:{self.base_url}/{self.model}"
        for attempt in range(BUSY_RETRIES + 1):
            try:
                response = self.http.post(path, json=body)
            except httpx.TransportError as e:
                raise EndpointError(f"{where}: cannot reach the server ({type(e).__name__}: {e}); "
                                    f"is it running?") from None
            if response.status_code == 429 and attempt < BUSY_RETRIES:
                time.sleep(min(0.5 * 2 ** attempt, 8.0))
                continue
            if response.status_code != 200:
                raise EndpointError(f"{where}: HTTP {response.status_code}: {error_message(response)}")
            try:
                return response.json()
            except ValueError:
                raise EndpointError(f"{where}: the answer is not JSON: {response.text[:200]!r}") from None
        raise AssertionError("unreachable")


def request_fields(params: SamplingParams) -> dict:
    """SamplingParams -> the OpenAI request's fields (vLLM's extras at the top level)."""
    if params.num_beams > 1:
        raise BadConfigError("an OpenAI-compatible endpoint does not do beam search (num_beams must be 1)")
    fields = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
              "n": params.n, "presence_penalty": params.presence_penalty,
              "frequency_penalty": params.frequency_penalty}
    if params.seed is not None:
        fields["seed"] = params.seed
    if params.stop:
        fields["stop"] = list(params.stop)
    # the extras, only when they differ from off, so that servers which refuse unknown fields still work
    extras = {"top_k": params.top_k, "min_p": params.min_p, "repetition_penalty": params.repetition_penalty,
              "ignore_eos": params.ignore_eos, "stop_token_ids": list(params.stop_token_ids)}
    off = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": False, "stop_token_ids": []}
    fields.update({k: v for k, v in extras.items() if v != off[k]})
    return fields


def error_message(response: httpx.Response) -> str:
    """The message of an OpenAI error envelope, or the start of whatever else came back."""
    try:
        error = response.json()["error"]
        return f"{error.get('type') or 'error'}: {error.get('message')}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:200] or response.reason_phrase
