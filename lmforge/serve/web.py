"""The web pages of `lmforge serve` and the JSON API behind them: a chat, an anonymous arena, a leaderboard.

    GET  /   chat          GET /arena   arena          GET /leaderboard   ratings
    GET  /static/...       their HTML, scripts and style: plain files, no build step, nothing from other sites

    GET    /api/conversations[?search=TEXT]      the sidebar, newest first
    POST   /api/conversations                    {title?, model?, settings?} -> the new conversation
    GET    /api/conversations/{id}               with its messages
    PUT    /api/conversations/{id}               {title, model, settings, messages}: the whole conversation
    DELETE /api/conversations/{id}
    POST   /api/arena/battles                    {prompt, params?, client_id?} -> {battle_id}
    POST   /api/arena/battles/{id}/reply/{a|b}   the side's reply as server-sent events
    POST   /api/arena/battles/{id}/vote          {winner} -> the battle with the model names revealed
    GET    /api/arena/battles/{id}               the battle; its model names only after the vote
    GET    /api/leaderboard[?min_battles=N]      Bradley-Terry ratings, 95% intervals, Elo, counts, win fractions

The chat page knows which model it talks to, so it streams straight from `/v1/chat/completions` and saves the
whole conversation with PUT after each turn (a stopped reply is saved as far as it got, marked "stopped").
The arena page must not know: the server draws the pair, keeps the names, streams each side through
`/api/arena/.../reply/{a|b}` with the chunks' `model` renamed to "model_a" / "model_b", and records each
reply in the store when its stream ends, however it ends. So the stored conversations are exactly what the
voter saw, and a page cannot vote on replies the server did not write.

Model text is untrusted (decoding_and_serving.md §9): the pages put it into the document with `textContent`
only, and the pages are sent with a Content-Security-Policy that allows scripts from this server's files and
nothing inline, so a reply that holds `<script>` or `<img onerror=...>` could not run even if a rendering bug
let it into the markup. With `--api-key`, /api needs the key as /v1 does; the pages ask for it and keep it
in the browser's localStorage. The pages and static files themselves hold no data and need no key.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from lmforge.serve.api import RequestError, ServedModel, ServeConfig, get_field, read_job, read_json_body, stream_events
from lmforge.serve.batcher import QueueFull
from lmforge.serve.store import ROLES, WINNERS, Store, VoteRefused

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "chat.html", "/arena": "arena.html", "/leaderboard": "leaderboard.html"}
PAGE_HEADERS = {
    # scripts and styles from this server's files only: nothing inline, nothing from another site
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
# Sampling fields an arena battle may set; both sides get the same ones.
ARENA_PARAMS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens", "seed")
LEADERBOARD_ROUNDS = 100
MAX_TITLE = 200


def add_web_routes(app: FastAPI, models: dict[str, ServedModel], cfg: ServeConfig, check_api_key) -> Store:
    """Mount the pages, the static files and /api on `app`; returns the store they share."""
    store = Store(cfg.store)
    # The pair must be unpredictable to the voter, or the battle is not anonymous: the system's randomness,
    # not a seed. (The ratings themselves are seeded: their bootstrap uses seed 0.)
    pair_drawer = random.SystemRandom()

    for route, filename in PAGES.items():
        app.add_api_route(route, page(filename), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    api = APIRouter(prefix="/api", dependencies=[Depends(check_api_key)])

    # --- conversations ----------------------------------------------------------------------------------------

    @api.get("/conversations")
    async def list_conversations(search: str = ""):
        return {"conversations": await run_in_threadpool(store.list_conversations, search)}

    @api.post("/conversations")
    async def create_conversation(request: Request):
        body = await read_json_body(request, cfg.max_body_bytes)
        title, model, settings, _ = read_conversation(body)
        return await run_in_threadpool(store.create_conversation, title, model, settings)

    @api.get("/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str):
        return found(await run_in_threadpool(store.get_conversation, conversation_id), "conversation")

    @api.put("/conversations/{conversation_id}")
    async def replace_conversation(conversation_id: str, request: Request):
        body = await read_json_body(request, cfg.max_body_bytes)
        title, model, settings, messages = read_conversation(body)
        replaced = await run_in_threadpool(store.replace_conversation, conversation_id, title, model, settings,
                                           messages)
        return found(replaced, "conversation")

    @api.delete("/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str):
        found(await run_in_threadpool(store.delete_conversation, conversation_id) or None, "conversation")
        return {"deleted": conversation_id}

    # --- arena ------------------------------------------------------------------------------------------------

    def arena_job(model_name: str, prompt: str, params: dict):
        """One side's request, checked as a chat completion would be (a bad parameter is a 400 here)."""
        served = models[model_name]
        body = {**params, "model": model_name, "messages": [{"role": "user", "content": prompt}],
                "stream": True, "stream_options": {"include_usage": True}}
        return read_job(body, served, True, served.batcher.capacity, cfg.request_timeout)

    @api.post("/arena/battles")
    async def start_battle(request: Request):
        body = await read_json_body(request, cfg.max_body_bytes)
        prompt = get_field(body, "prompt", str, "")
        if not prompt.strip():
            raise RequestError("'prompt' must be a non-empty string", param="prompt")
        params = get_field(body, "params", dict, {})
        unknown = sorted(set(params) - set(ARENA_PARAMS))
        if unknown:
            raise RequestError(f"params: {', '.join(unknown)} cannot be set in the arena; allowed: "
                               f"{', '.join(ARENA_PARAMS)}", param="params")
        client_id = get_field(body, "client_id", str, "", lambda v: len(v) <= 100, "at most 100 characters")
        names = list(models)
        # two different models on random sides; a single model is pitted against itself (decoding_and_serving §10)
        model_a, model_b = pair_drawer.sample(names, 2) if len(names) > 1 else (names[0], names[0])
        for name in {model_a, model_b}:
            arena_job(name, prompt, params)  # refuse bad params now, not after one side has streamed
        battle_id = await run_in_threadpool(store.start_battle, model_a, model_b, prompt, params, client_id)
        return {"battle_id": battle_id}

    @api.post("/arena/battles/{battle_id}/reply/{side}")
    async def stream_reply(battle_id: str, side: str):
        if side not in ("a", "b"):
            raise RequestError(f"side must be 'a' or 'b', got {side!r}", status=404, param="side")
        battle = found(await run_in_threadpool(store.get_battle, battle_id), "battle")
        if battle[f"reply_{side}"] is not None:
            raise RequestError(f"side {side} of this battle has already been answered", status=409,
                               code="already_answered")
        name = battle[f"model_{side}"]
        if name not in models:
            raise RequestError("this battle's model is no longer served", status=409, code="model_gone")
        job = arena_job(name, battle["prompt"], battle["params"])
        batcher = models[name].batcher
        try:
            submission = batcher.submit(job.sequences())
        except QueueFull as e:
            raise RequestError(str(e), status=429, type="rate_limit_error", code="queue_full") from None

        def record(reply: str, finish_reason: str, tokens: int | None) -> None:
            store.record_reply(battle_id, side, reply, finish_reason, tokens)

        events = recorded_events(stream_events(job, submission), f"model_{side}", record)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(batcher.cancel, submission))

    @api.post("/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, request: Request):
        body = await read_json_body(request, cfg.max_body_bytes)
        winner = get_field(body, "winner", str, None, lambda v: v in WINNERS, "one of " + ", ".join(WINNERS))
        if winner is None:
            raise RequestError("'winner' is required: " + ", ".join(WINNERS), param="winner")
        try:
            # returns only once the vote is committed: an acknowledged vote is never lost
            battle = await run_in_threadpool(store.record_vote, battle_id, winner)
        except VoteRefused as e:
            raise RequestError(str(e), status=404 if e.reason == "unknown" else 409, code=e.reason) from None
        return battle_view(battle)

    @api.get("/arena/battles/{battle_id}")
    async def get_battle(battle_id: str):
        return battle_view(found(await run_in_threadpool(store.get_battle, battle_id), "battle"))

    # --- leaderboard ------------------------------------------------------------------------------------------

    @api.get("/leaderboard")
    async def leaderboard_json(request: Request):
        raw = request.query_params.get("min_battles", "0")
        if not raw.isdigit():
            raise RequestError(f"'min_battles' must be an integer >= 0, got {raw!r:.40}", param="min_battles")
        return await run_in_threadpool(rate_votes, store, int(raw))

    app.include_router(api)
    return store


def page(filename: str):
    async def serve_page():
        return FileResponse(STATIC / filename, media_type="text/html", headers=PAGE_HEADERS)
    return serve_page


def found(value, what: str):
    if value is None:
        raise RequestError(f"no such {what}", status=404, code="not_found")
    return value


def read_conversation(body: dict) -> tuple[str, str, dict, list[dict]]:
    """A conversation as the chat page sends it, checked: (title, model, settings, messages)."""
    title = get_field(body, "title", str, "New chat", lambda v: len(v) <= MAX_TITLE, f"at most {MAX_TITLE} characters")
    model = get_field(body, "model", str, "")
    settings = get_field(body, "settings", dict, {})
    messages = []
    for i, message in enumerate(get_field(body, "messages", list, [])):
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise RequestError(f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}", param="messages")
        optional = {key: message.get(key) if isinstance(message.get(key), str) else None
                    for key in ("model", "finish_reason")}
        stats = message.get("stats") if isinstance(message.get("stats"), dict) else None
        messages.append({"role": message["role"], "content": message["content"], **optional, "stats": stats})
    return title, model, settings, messages


async def recorded_events(events, label: str, record):
    """`stream_events` with every chunk's `model` replaced by `label`, and `record(reply, finish_reason,
    completion_tokens)` called when the stream ends, however it ends: finished, failed ("error"), or left by
    its client ("stopped": the client's disconnect cancels this generator, and `finally` still runs)."""
    reply, finish_reason, tokens = "", None, None
    try:
        async for piece in events:
            relabelled = []
            for event in piece.split("\n\n")[:-1]:  # a piece is one or more whole events, each ending in "\n\n"
                data = event.removeprefix("data: ")
                if data != "[DONE]":
                    chunk = json.loads(data)
                    if "error" in chunk:
                        finish_reason = "error"
                    else:
                        chunk["model"] = label
                        for choice in chunk["choices"]:
                            reply += choice["delta"].get("content") or ""
                            finish_reason = choice["finish_reason"] or finish_reason
                        tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                    data = json.dumps(chunk, ensure_ascii=False)
                relabelled.append(f"data: {data}\n\n")
            yield "".join(relabelled)
    finally:
        record(reply, finish_reason or "stopped", tokens)


def battle_view(battle: dict) -> dict:
    """What a page may see of a battle: the model names only once the vote is in."""
    view = {"battle_id": battle["id"], "prompt": battle["prompt"], "winner": battle["winner"],
            **{f"{key}_{side}": battle[f"{key}_{side}"] for key in ("reply", "finish", "tokens") for side in "ab"}}
    if battle["winner"] is not None:
        view.update(model_a=battle["model_a"], model_b=battle["model_b"],
                    names_leaked=bool(battle["names_leaked"]))
    return view


def rate_votes(store: Store, min_battles: int) -> dict:
    """The leaderboard as JSON: rows best first (see `evaluate.arena.leaderboard`), vote counts, win fractions.
    Models with fewer than `min_battles` rated battles are left out with the battles they played."""
    from lmforge.evaluate.arena import leaderboard, win_fraction_matrix  # scipy: loaded when first asked for

    battles = store.rated_battles()
    played = Counter(b["model_a"] for b in battles) + Counter(b["model_b"] for b in battles)
    battles = [b for b in battles if played[b["model_a"]] >= min_battles and played[b["model_b"]] >= min_battles]
    models = {b["model_a"] for b in battles} | {b["model_b"] for b in battles}
    rows, matrix = [], {"models": [], "fraction": [], "battles": []}
    if len(models) >= 2:
        rows = [{key: finite_or_none(value) for key, value in row.items()}
                for row in leaderboard(battles, rounds=LEADERBOARD_ROUNDS, seed=0)]
        names, fraction, counts = win_fraction_matrix(battles)
        matrix = {"models": names, "fraction": [[finite_or_none(v) for v in row] for row in fraction.tolist()],
                  "battles": counts.tolist()}
    return {**store.count_votes(), "rated_here": len(battles), "min_battles": min_battles,
            "rounds": LEADERBOARD_ROUNDS, "rows": rows, "win_fraction": matrix}


def finite_or_none(value):
    """JSON has no NaN: an interval no bootstrap round could estimate, or two models that never met, is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
