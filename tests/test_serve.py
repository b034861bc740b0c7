"""`lmforge serve` through the official `openai` client and raw HTTP, against one real server (a subprocess on a
free port, a tiny model trained a little): chat and completions, streaming == non-streamed with one seed,
logprobs, n, stop strings, the error envelope and its statuses, bad input that leaves the server serving, a
client that leaves being aborted within 2 s, the queue bound (429); then `EndpointModel` against the same server,
equal to the local engine for one seed. A timeout and an engine failure are checked in-process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import tiny_config, train_a_little
from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import BadConfigError, UserError
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import Transformer
from lmforge.serve.api import Job, RequestError, ServedModel, job_deltas, model_specs, stream_events
from lmforge.serve.batcher import Batcher, QueueFull
from lmforge.serve.client import EndpointError, EndpointModel, parse_endpoint

KEY = "sk-test-key"
CONTEXT = 2048
MAX_BATCH, MAX_QUEUE = 8, 8


@pytest.fixture(scope="module")
def checkpoint(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = train_a_little(Transformer(tiny_config(tokenizer.vocab_size, max_seq_len=CONTEXT)), tokenizer)
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(directory, model, tokenizer, lineage={"stage": "test"})
    return directory


@pytest.fixture(scope="module")
def local_engine(checkpoint):
    model, tokenizer, _ = load_checkpoint(checkpoint)
    return Engine(model.eval(), tokenizer, max_batch_size=4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint):
    """`lmforge serve` serving the checkpoint twice (as `tiny`, its directory's name, and as `other`)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", str(checkpoint), "--model", f"other={checkpoint}",
         "--port", str(port), "--api-key", KEY, "--max-batch-size", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
         "--max-body-bytes", "100000", "--no-access-log"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not come up in 30 s")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def post(server, path, body=None, content=None, key=KEY, timeout=30.0):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server + path, json=body, content=content, headers=headers, timeout=timeout)


def health(server) -> dict:
    return httpx.get(server + "/health", timeout=5).json()


def wait_idle(server, within: float) -> float:
    """Poll /health every 50 ms until nothing runs or waits; returns the seconds it took."""
    start = time.perf_counter()
    while time.perf_counter() - start < within:
        h = health(server)
        if h["active"] == 0 and h["queued"] == 0:
            return time.perf_counter() - start
        time.sleep(0.05)
    raise AssertionError(f"still busy after {within} s: {health(server)}")


HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The cat sat on"}]


# ---------------------------------------------------------------------------------------------------------
# the openai client


def test_models_are_listed_by_name(client):
    assert sorted(m.id for m in client.models.list()) == ["other", "tiny"]


def test_chat_completion(client, local_engine):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt = local_engine.tokenizer.render_prompt(HELLO)
    expected = local_engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=12))[0]
    assert choice.message.content == expected.text  # the chat template applied as `lmforge chat` does
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_joins_to_the_non_streamed_text(client):
    request = dict(model="tiny", messages=HELLO, max_tokens=40, temperature=1.0, seed=11)
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_raw_event_stream_ends_with_done(server):
    with httpx.stream("POST", server + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                      json={"model": "tiny", "prompt": "The cat", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                            "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]


def test_completion_with_logprobs(client, local_engine):
    reply = client.completions.create(model="tiny", prompt="Mina lives in", max_tokens=8, temperature=0, logprobs=3,
                                      extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    expected = local_engine.generate(["Mina lives in"], SamplingParams(temperature=0, max_new_tokens=8,
                                                                       ignore_eos=True))[0]
    assert reply.choices[0].text == expected.text and len(logprobs.tokens) == 8
    assert logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    for chosen, alternatives in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(alternatives) == 3 and chosen == pytest.approx(max(alternatives.values()), abs=1e-6)  # greedy


def test_chat_logprobs_and_top_logprobs(client):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, logprobs=True, top_logprobs=2,
                                           seed=1, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 5 and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)


def test_n_samples_are_indexed_and_seeded_like_the_engine(client, local_engine):
    reply = client.completions.create(model="tiny", prompt="The dog", n=2, max_tokens=15, temperature=1.0, seed=5)
    assert [c.index for c in reply.choices] == [0, 1]
    expected = local_engine.generate(["The dog"], SamplingParams(n=2, max_new_tokens=15, seed=5))
    assert [c.text for c in reply.choices] == [o.text for o in expected]
    assert reply.choices[0].text != reply.choices[1].text


def test_stop_sequence_cuts_before_it_streamed_or_not(client):
    request = dict(model="tiny", prompt="def add(a, b):\n", max_tokens=20, temperature=0)
    full = client.completions.create(**request).choices[0].text
    stop = full[3:5]  # a two-character string the greedy text is known to contain
    assert stop and stop in full
    cut = client.completions.create(**request, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**request, stop=stop, stream=True))
    assert streamed == cut.text


def test_errors_use_the_envelope_and_status(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=2.5)
    assert bad.value.status_code == 400 and bad.value.body["param"] == "temperature"
    assert set(bad.value.response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert missing.value.code == "model_not_found"
    anonymous = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    response = post(server, "/v1/chat/completions", {"model": "tiny", "messages": HELLO}, key=None)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server + "/health").status_code == 200  # no key needed to check on the server


# ---------------------------------------------------------------------------------------------------------
# bad input, clients that leave, a full queue


@pytest.mark.parametrize("body,needle", [
    (b'{"model": "tiny", "messages": [', "not valid JSON"),
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"model": "tiny", "messages": HELLO, "max_tokens": CONTEXT}, "context"),
    ({"model": "tiny", "prompt": "word " * CONTEXT}, "context"),
    ({"model": "tiny", "prompt": "x" * 200_000}, "larger than"),
    ({"model": "tiny", "prompt": "hi", "n": 0}, "'n'"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "hi", "logit_bias": {"5": 10}}, "not supported"),
])
def test_bad_input_is_a_400_and_the_server_keeps_serving(server, body, needle):
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    response = post(server, path, content=body) if isinstance(body, bytes) else post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    ok = post(server, "/v1/completions", {"model": "tiny", "prompt": "The cat", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_a_client_that_leaves_mid_stream_is_aborted(server):
    steps_before = health(server)["models"]["tiny"]["steps"]
    body = {"model": "tiny", "prompt": "The cat", "max_tokens": CONTEXT - 16, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        for _ in range(5):  # a few tokens have arrived: the request is running
            next(lines)
        assert health(server)["active"] == 1
    assert wait_idle(server, within=2.0) < 2.0
    steps = health(server)["models"]["tiny"]["steps"]
    time.sleep(0.2)
    assert health(server)["models"]["tiny"]["steps"] == steps  # the engine has stopped
    assert steps - steps_before < CONTEXT - 16  # ... long before the request would have ended


def test_a_plain_request_whose_client_gives_up_is_aborted(server):
    body = {"model": "tiny", "prompt": "The cat", "max_tokens": CONTEXT - 16, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=0.5)
    assert wait_idle(server, within=2.0) < 2.0


def test_a_full_queue_answers_429_and_the_rest_run(server):
    """More streams than slots + queue at once: the extra ones get 429, the others 200 and run."""
    n_clients = MAX_BATCH + MAX_QUEUE + 4
    statuses, everyone_answered = [], threading.Barrier(n_clients)
    body = {"model": "tiny", "prompt": "The cat", "max_tokens": CONTEXT - 16, "ignore_eos": True, "stream": True}

    def one():
        with httpx.stream("POST", server + "/v1/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as response:
            statuses.append((response.status_code, response.read() if response.status_code != 200 else b""))
            everyone_answered.wait(timeout=20)  # hold the slot until every request has its answer

    threads = [threading.Thread(target=one) for _ in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(code for code, _ in statuses)
    assert codes == [200] * (MAX_BATCH + MAX_QUEUE) + [429] * 4
    busy = json.loads(next(text for code, text in statuses if code == 429))["error"]
    assert busy["type"] == "rate_limit_error" and busy["code"] == "queue_full"
    wait_idle(server, within=2.0)


def make_job(batcher, tokenizer, timeout: float = 30.0) -> Job:
    served = ServedModel("tiny", "", tokenizer, batcher, created=0)
    return Job(served, is_chat=True, prompts=[[1, 2, 3]], params=SamplingParams(max_new_tokens=4), top_logprobs=None,
               stream=True, include_usage=False, timeout=timeout)


def test_a_request_past_its_timeout_is_aborted_with_408(local_engine):
    """In-process: a batcher whose thread never runs, so the request can only time out."""
    batcher = Batcher(local_engine, max_queue=1)
    job = make_job(batcher, local_engine.tokenizer, timeout=0.05)

    async def run():
        submission = batcher.submit(job.sequences())
        with pytest.raises(QueueFull):  # one sequence in, room for capacity - 1 more
            batcher.submit([([1], SamplingParams())] * batcher.capacity)
        with pytest.raises(RequestError) as timeout:
            async for _ in job_deltas(job, submission):
                pass
        return timeout.value, submission

    error, submission = asyncio.run(run())
    assert error.status == 408 and error.code == "request_timeout" and submission.cancelled


class FailingEngine:
    """Takes requests, then fails at its first step (as an out-of-memory error would)."""

    max_batch_size = 2

    def __init__(self):
        self.waiting, self.running = [], {}

    def add(self, prompt_ids, params):
        self.waiting.append(len(self.waiting))
        return self.waiting[-1]

    def has_unfinished(self):
        return bool(self.waiting)

    def step(self):
        raise RuntimeError("out of memory")

    def abort(self, request_id):
        self.waiting.remove(request_id)
        return True


def test_an_engine_failure_is_an_error_event_and_frees_the_batcher(tokenizer):
    batcher = Batcher(FailingEngine(), max_queue=0)
    job = make_job(batcher, tokenizer)

    async def run():
        return [event async for event in stream_events(job, batcher.submit(job.sequences()))]

    batcher.start()
    try:
        events = asyncio.run(run())
    finally:
        batcher.stop()
    assert json.loads(events[0][len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert "out of memory" in error["message"] and error["type"] == "server_error"
    assert events[-1] == "data: [DONE]\n\n" and batcher.queued == 0 and batcher.active == 0


def test_model_names():
    assert model_specs(("runs/world/sft/final", "base=runs/world/pretrain/final", "ckpt/tiny")) == {
        "sft": "runs/world/sft/final", "base": "runs/world/pretrain/final", "tiny": "ckpt/tiny"}
    with pytest.raises(BadConfigError, match="two models named"):
        model_specs(("a/sft/final", "b/sft"))


# ---------------------------------------------------------------------------------------------------------
# EndpointModel: a server as a model


def test_parse_endpoint():
    assert parse_endpoint("openai:http://127.0.0.1:8000/v1/sft") == ("http://127.0.0.1:8000/v1", "sft")
    assert parse_endpoint("openai:https://host/v1/org/model") == ("https://host/v1", "org/model")
    for bad in ("http://127.0.0.1:8000/v1/sft", "openai:127.0.0.1:8000/v1/sft", "openai:http://host/v1/"):
        with pytest.raises(BadConfigError):
            parse_endpoint(bad)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0, max_new_tokens=16),
                                    SamplingParams(temperature=0.9, top_k=50, seed=3, n=2, max_new_tokens=16)],
                         ids=["greedy", "seeded"])
def test_endpoint_model_equals_the_local_engine(server, local_engine, params):
    prompts = ["The cat", "Mina lives in", "고양이가", "def add(a, b):\n", "Emoji"]
    conversations = [HELLO, [{"role": "user", "content": "Mina lives in"}]]
    tokenizer = local_engine.tokenizer
    with EndpointModel(server + "/v1", "tiny", api_key=KEY, concurrency=4) as model:
        assert model.complete(prompts, params) == [o.text for o in local_engine.generate(prompts, params)]
        chats = local_engine.generate([tokenizer.render_prompt(c) for c in conversations], params)
        assert model.chat(conversations, params) == [o.text for o in chats]


def test_endpoint_model_errors_are_user_errors(server):
    with EndpointModel(server + "/v1", "no-such-model", api_key=KEY) as model:
        with pytest.raises(EndpointError, match="404.*no-such-model"):
            model.complete(["hi"], SamplingParams(max_new_tokens=2))
    with EndpointModel(server + "/v1", "tiny", api_key="wrong") as model:
        with pytest.raises(EndpointError, match="401"):
            model.chat([HELLO], SamplingParams(max_new_tokens=2))
    with EndpointModel(f"http://127.0.0.1:{free_port()}/v1", "tiny") as model:
        with pytest.raises(UserError, match="cannot reach"):
            model.complete(["hi"], SamplingParams(max_new_tokens=2))
