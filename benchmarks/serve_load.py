"""Serving under load: `lmforge serve` with continuous batching vs the same server one request at a time.

A model of a preset, trained a few steps on random words, is saved as a checkpoint and served by two
`lmforge serve` processes on loopback, identical but for `--max-batch-size`: N (batched) and 1 (one request at a
time, the rest queued). `--clients` streaming clients then send one completion each, all at once, to each server
in turn: batched, one at a time, batched again, so that drift hits both alike (the batched figures are the mean
of its two runs). Prompts are random words cut to a length in tokens drawn from `--prompt-len`; exactly
`--new-tokens` tokens come out of each (`ignore_eos`), greedily. Metrics follow vLLM's `bench serve` (the
decoding reference §11):

    TTFT  first chunk with text - send time          TPOT  (last chunk - first chunk) / (tokens - 1)
    request throughput = completed / duration        output throughput = output tokens / duration

with token counts from each stream's usage chunk. The ratio is output tokens/s batched over one at a time.
Finally a burst of `--burst` more clients than the batched server has room for (running + queued) arrives at
once: the overflow must get 429 and everything admitted must complete.

    python benchmarks/serve_load.py                          # CPU: preset micro, 64 clients, 64 tokens each
    python benchmarks/serve_load.py --preset tiny --clients 32

The client runs in this process (asyncio + httpx), each server in its own; on a 2-core machine the client and
the server under load each get about one core.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import httpx
import torch

from decode_speed import cpu_name, synthetic_tokenizer
from lmforge.checkpoint import save_checkpoint
from lmforge.model import Transformer, count_parameters, get_preset


def train_a_little(model: Transformer, tokenizer, words: list[str], rng: random.Random, steps: int = 40):
    """A few AdamW steps on random words. Random weights tend to loop on one byte token (say 0xE5) that never
    completes a character, so a stream would show no text at all; a little training makes the model write words
    and the streams carry text from the first token, as a real model's do."""
    docs = [tokenizer.encode(" ".join(rng.choice(words) for _ in range(80)), add_bos=True)[:65] for _ in range(256)]
    data = torch.tensor([d for d in docs if len(d) == 65])  # (N, 65)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (16,))]
        logits = model(batch[:, :-1])  # (16, 64, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: str, max_batch_size: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "lmforge", "serve", "--model", f"bench={checkpoint}", "--port", str(port),
               "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue), "--no-access-log"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, within: float = 60.0) -> None:
    deadline = time.perf_counter() + within
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server at {url} exited: {process.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit(f"the server at {url} did not start within {within:.0f} s")


async def one_request(http: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int) -> dict:
    """Stream one completion; returns its status, timings (s) and token counts, or the error."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    usage = None
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"status": response.status_code, "error": (await response.aread()).decode()[:200]}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                return {"status": 200, "error": chunk["error"]["message"]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    if usage is None or first is None:
        return {"status": 200, "error": "the stream ended without text or usage"}
    return {"status": 200, "error": None, "sent": sent, "first": first, "last": last,
            "output_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"]}


async def run_load(url: str, prompts: list[list[int]], new_tokens: int) -> tuple[list[dict], float]:
    """All prompts at once, one streaming client each; returns the results and the wall time."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(http, url, p, new_tokens) for p in prompts))
        return list(results), time.perf_counter() - start


def summarise(results: list[dict], duration: float) -> dict:
    done = [r for r in results if r["status"] == 200 and r["error"] is None]
    ttft = [1000 * (r["first"] - r["sent"]) for r in done]
    tpot = [1000 * (r["last"] - r["first"]) / (r["output_tokens"] - 1) for r in done if r["output_tokens"] > 1]
    output_tokens = sum(r["output_tokens"] for r in done)

    def p(values, q):  # nearest-rank percentile
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")

    return {"requests": len(results), "completed": len(done), "errors": len(results) - len(done),
            "duration": duration, "request_rate": len(done) / duration, "output_rate": output_tokens / duration,
            "ttft_p50": statistics.median(ttft), "ttft_p99": p(ttft, 99),
            "tpot_p50": statistics.median(tpot), "tpot_p99": p(tpot, 99), "output_tokens": output_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="micro")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients, one request each")
    p.add_argument("--max-batch-size", type=int, default=64, help="the batched server's")
    p.add_argument("--max-queue", type=int, default=64, help="both servers' (>= clients, so the baseline queues all)")
    p.add_argument("--prompt-len", default="8,32", help="min,max prompt tokens (uniform)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--burst", type=int, default=32, help="clients beyond the batched server's room, sent at once")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    started = time.perf_counter()
    if args.max_queue < args.clients:
        raise SystemExit("--max-queue must be at least --clients: the one-at-a-time server queues every client")

    # --- a model trained a little on random words, as a checkpoint served twice -----------------------------
    tokenizer = synthetic_tokenizer(args.vocab_size)
    low, high = map(int, args.prompt_len.split(","))
    cfg = replace(get_preset(args.preset), vocab_size=args.vocab_size,
                  max_seq_len=max(get_preset(args.preset).max_seq_len, high + args.new_tokens * 2))
    rng = random.Random(args.seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    text = [tokenizer.encode(" ".join(rng.choice(words) for _ in range(40)), add_bos=True) for _ in range(args.clients)]
    prompts = [ids[:rng.randint(low, high)] for ids in text]
    torch.manual_seed(args.seed)
    model = train_a_little(Transformer(cfg), tokenizer, words, rng)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, model, tokenizer)
        servers = {"batched": start_server(tmp, args.max_batch_size, args.max_queue),
                   "one at a time": start_server(tmp, 1, args.max_queue)}
        try:
            for process, url in servers.values():
                wait_ready(process, url)
            for _, url in servers.values():  # warm-up: first-call allocations, connection set-up
                asyncio.run(run_load(url, prompts[:2], 4))

            # --- the same load against each server, batched before and after the baseline (A B A) ------------
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for name in ["batched", "one at a time", "batched"]:
                results, duration = asyncio.run(run_load(servers[name][1], prompts, args.new_tokens))
                runs[name].append(summarise(results, duration))
                print(f"{name}: {runs[name][-1]['output_rate']:,.0f} output tok/s, "
                      f"{runs[name][-1]['errors']} errors", file=sys.stderr)

            # --- a burst beyond the batched server's room: the overflow must get 429 -----------------------
            room = args.max_batch_size + args.max_queue
            burst_prompts = [prompts[i % len(prompts)] for i in range(room + args.burst)]
            burst, _ = asyncio.run(run_load(servers["batched"][1], burst_prompts, args.new_tokens))
        finally:
            for process, _ in servers.values():
                process.terminate()
            for process, _ in servers.values():
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()

    # --- report, ready to paste into benchmarks/RESULTS.md ------------------------------------------------
    rejected = sum(r["status"] == 429 for r in burst)
    completed = sum(r["status"] == 200 and r["error"] is None for r in burst)
    other_errors = len(burst) - rejected - completed
    print(f"command: `{' '.join(['python', *map(shlex.quote, sys.argv)])}`")
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"machine: {platform.platform()}, {cpu_name()}, {os.cpu_count()} CPUs, server threads 1, "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    print(f"model: preset {args.preset} ({count_parameters(cfg)['total'] / 1e6:.2f}M parameters, vocab "
          f"{args.vocab_size}, trained 40 steps on random words, fp32 CPU); {args.clients} streaming clients at "
          f"once, prompts {low}-{high} tokens, {args.new_tokens} new tokens each (ignore_eos), greedy; batched "
          f"runs before and after the baseline (mean of 2)")
    print()
    print("| server | requests | errors | requests/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    mean = {}
    for name, label in [("batched", f"batched (max batch {args.max_batch_size})"), ("one at a time", "max batch 1")]:
        rs = runs[name]
        mean[name] = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        m = mean[name]
        print(f"| {label} | {sum(r['requests'] for r in rs)} | {sum(r['errors'] for r in rs)} | "
              f"{m['request_rate']:.1f} | {m['output_rate']:,.0f} | {m['ttft_p50']:.0f} / {m['ttft_p99']:.0f} | "
              f"{m['tpot_p50']:.1f} / {m['tpot_p99']:.1f} |")
    ratio = mean["batched"]["output_rate"] / mean["one at a time"]["output_rate"]
    print()
    print(f"batched / one at a time (output tokens/s): {ratio:.2f}x")
    print(f"burst: {len(burst)} clients at once against room for {room} ({args.max_batch_size} running + "
          f"{args.max_queue} queued): {completed} completed, {rejected} got 429, {other_errors} other errors")
    print(f"benchmark wall time: {time.perf_counter() - started:.0f} s (model, servers, loads and burst)")


if __name__ == "__main__":
    main()
