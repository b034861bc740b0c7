"""The vote and conversation store (serve/store.py): conversations round-trip; a vote needs both replies and
comes once; a reply that names a model keeps its vote out of ratings and exports. Durability through a real
`lmforge serve` (a subprocess): 1,000 votes sent at once are all stored, and a server killed with SIGKILL
midway has lost no vote it acknowledged. `lmforge arena export` writes preferences that `lmforge dpo` and
`lmforge reward train` train on as they are, and `lmforge arena rate` reads the store as battles."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from lmforge.cli import main
from lmforge.evaluate.arena import read_battles
from lmforge.serve.store import WINNERS, Store, VoteRefused, names_leaked

N_VOTES = 1000


# ---------------------------------------------------------------------------------------------------------
# the store in-process


def test_conversations_round_trip(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    first = store.create_conversation("Mina", model="sft", settings={"temperature": "0"})
    second = store.create_conversation("Other")
    messages = [{"role": "user", "content": "Where does Mina live?"},
                {"role": "assistant", "content": "Velmora.", "model": "sft", "finish_reason": "stop",
                 "stats": {"completion_tokens": 3, "seconds": 0.1}}]
    replaced = store.replace_conversation(first["id"], "Mina's home", "sft", {"seed": "1"}, messages)
    assert replaced["title"] == "Mina's home" and replaced["settings"] == {"seed": "1"}
    assert [(m["role"], m["content"]) for m in replaced["messages"]] == [(m["role"], m["content"]) for m in messages]
    assert replaced["messages"][1]["stats"] == {"completion_tokens": 3, "seconds": 0.1}
    assert replaced["messages"][0]["stats"] is None

    # regenerate and edit-and-resend rewrite the end: the stored conversation is exactly the new list
    store.replace_conversation(first["id"], "Mina's home", "sft", {}, messages[:1])
    assert len(store.get_conversation(first["id"])["messages"]) == 1
    assert [c["id"] for c in store.list_conversations()] == [first["id"], second["id"]]  # newest change first
    assert [c["id"] for c in store.list_conversations("mina live")] == [first["id"]]  # found by message text
    assert store.replace_conversation("nope", "t", "", {}, []) is None

    assert store.delete_conversation(first["id"]) and not store.delete_conversation(first["id"])
    assert store.get_conversation(first["id"]) is None
    store.close()
    with sqlite3.connect(tmp_path / "store.sqlite") as db:  # the messages went with their conversation
        assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_a_vote_needs_both_replies_and_comes_once(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    battle = store.start_battle("sft", "base", "Where does Mina live?", {"temperature": 0})
    with pytest.raises(VoteRefused) as refused:
        store.record_vote(battle, "model_a")
    assert refused.value.reason == "unfinished"
    assert store.record_reply(battle, "a", "Velmora.", "stop", 3)
    assert not store.record_reply(battle, "a", "Something else.", "stop", 3)  # the first reply stays
    assert store.record_reply(battle, "b", "The cat sat.", "length", 4)
    voted = store.record_vote(battle, "model_a")
    assert (voted["model_a"], voted["model_b"], voted["winner"]) == ("sft", "base", "model_a")
    assert not voted["names_leaked"]
    with pytest.raises(VoteRefused) as refused:
        store.record_vote(battle, "model_b")
    assert refused.value.reason == "voted"
    with pytest.raises(VoteRefused) as refused:
        store.record_vote("no-such-battle", "tie")
    assert refused.value.reason == "unknown"
    assert store.get_battle(battle)["reply_a"] == "Velmora." and store.count_votes() == {"votes": 1, "rated": 1}


def test_names_in_a_reply_are_leaks():
    assert names_leaked(("sft", "base"), ("As the SFT model, I think so.", "Hello"))
    assert names_leaked(("sft-v2", "base"), ("", "I am sft-v2."))
    assert not names_leaked(("sft", "base"), ("The baseline is sfty.", "databases"))
    assert not names_leaked(("sft", "base"), ("sft-v2 is another model", ""))


def add_battles(store: Store) -> dict[str, str]:
    """Decisive votes for the right facts, a tie, a both-bad, a battle of a model against itself, one whose
    reply names a model, and one not voted on. Returns {kind: battle id}."""
    ids = {}
    facts = [("Where does Mina live?", "Velmora.", "Osk."), ("What is 2+2?", "4", "5"),
             ("What does Mina bake?", "Bread.", "Stones."), ("Say hello.", "Hello!", "No."),
             ("Name a pet.", "A cat.", "A rock."), ("What is 3+4?", "7", "9")]
    for i, (prompt, good, bad) in enumerate(facts):
        # the better reply is on side a for even i and side b for odd i, as random sides would put it
        reply_a, reply_b, winner = (good, bad, "model_a") if i % 2 == 0 else (bad, good, "model_b")
        ids[f"fact{i}"] = voted_battle(store, ("sft", "base") if i % 3 else ("base", "sft"), prompt,
                                       (reply_a, reply_b), winner)
    ids["tie"] = voted_battle(store, ("sft", "base"), "Hi.", ("Hi.", "Hey."), "tie")
    ids["bothbad"] = voted_battle(store, ("base", "sft"), "Hi?", ("Stones.", "Rocks."), "tie (bothbad)")
    ids["self"] = voted_battle(store, ("sft", "sft"), "Where is Velmora?", ("In the north.", "Nowhere."), "model_a")
    ids["leaked"] = voted_battle(store, ("sft", "base"), "Who are you?", ("I am sft.", "A cat."), "model_a")
    ids["unvoted"] = store.start_battle("sft", "base", "Unanswered?")
    return ids


def voted_battle(store: Store, models: tuple[str, str], prompt: str, replies: tuple[str, str], winner: str) -> str:
    battle = store.start_battle(*models, prompt)
    store.record_reply(battle, "a", replies[0], "stop", 2)
    store.record_reply(battle, "b", replies[1], "stop", 2)
    store.record_vote(battle, winner)
    return battle


def test_the_ratings_read_anonymous_battles_between_two_models(tmp_path, capsys):
    store = Store(tmp_path / "votes.sqlite")
    ids = add_battles(store)
    battles = read_battles(tmp_path / "votes.sqlite")
    assert {b["battle_id"] for b in battles} == {ids[k] for k in ids if k not in ("self", "leaked", "unvoted")}
    assert {(b["model_a"], b["model_b"]) for b in battles} == {("sft", "base"), ("base", "sft")}
    assert [b["tstamp"] for b in battles] == sorted(b["tstamp"] for b in battles)
    assert main(["arena", "rate", str(tmp_path / "votes.sqlite"), "--rounds", "20"]) == 0
    printed = capsys.readouterr().out
    assert "| sft |" in printed and "| base |" in printed and "8 battles" in printed


# ---------------------------------------------------------------------------------------------------------
# export -> the trainers, through the CLI


def test_exported_votes_train_dpo_and_a_reward_model(trained_checkpoint, tmp_path):
    store = Store(tmp_path / "votes.sqlite")
    ids = add_battles(store)
    store.close()
    out = tmp_path / "prefs.jsonl"
    assert main(["arena", "export", str(out), "--store", str(tmp_path / "votes.sqlite")]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # decisive votes only, the battle against itself included (two samples, one preferred), the leak left out
    assert {r["battle_id"] for r in records} == {ids[k] for k in ids if k.startswith("fact") or k == "self"}
    by_prompt = {r["prompt"]: r for r in records}
    assert (by_prompt["What is 2+2?"]["chosen"], by_prompt["What is 2+2?"]["rejected"]) == ("4", "5")
    assert (by_prompt["What is 3+4?"]["chosen"], by_prompt["What is 3+4?"]["rejected"]) == ("7", "9")

    steps = ["--train.steps", "2", "--train.batch-size", "2", "--train.warmup-steps", "0", "--train.no-progress",
             "--train.log-every", "1", "--train.eval-every", "100"]
    assert main(["dpo", "--model", str(trained_checkpoint), "--data", str(out), "--out", str(tmp_path / "dpo"),
                 *steps]) == 0
    assert main(["reward", "train", "--model", str(trained_checkpoint), "--data", str(out),
                 "--out", str(tmp_path / "rm"), *steps]) == 0
    for run in ("dpo", "rm"):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if "loss" in r][-1] == 2, run
        assert (tmp_path / run / "final" / "lmforge.json").is_file(), run


def test_export_refuses_a_store_without_enough_votes(tmp_path, capsys):
    Store(tmp_path / "empty.sqlite").start_battle("sft", "base", "Hi?")
    assert main(["arena", "export", str(tmp_path / "out.jsonl"), "--store", str(tmp_path / "empty.sqlite")]) != 0
    assert "fewer than --min-votes 1" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# durability through a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", f"sft={checkpoint}", "--model", f"base={checkpoint}",
         "--port", str(port), "--store", str(store), "--no-access-log"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            pytest.fail(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    pytest.fail("the server did not come up in 30 s")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def finished_battles(path: Path, n: int) -> list[str]:
    """n battles with both replies recorded, as the arena's streams leave them. Written in one transaction:
    through the store's methods they would be 3n fsynced transactions, slower than the votes under test."""
    Store(path).count_votes()  # creates the file and its schema
    ids = [uuid.uuid4().hex for _ in range(n)]
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO battles (id, created, model_a, model_b, prompt, reply_a, finish_a, tokens_a, "
                       "reply_b, finish_b, tokens_b) VALUES (?, ?, 'sft', 'base', ?, ?, 'stop', 5, ?, 'stop', 5)",
                       [(battle_id, time.time(), f"Question {i}?", f"First answer to {i}.", f"Second answer to {i}.")
                        for i, battle_id in enumerate(ids)])
    return ids


def send_votes(url: str, battle_ids: list[str], acknowledged: list[str], statuses: list[int]) -> None:
    """POST every vote at once, each on its own connection; a battle id goes into `acknowledged` when its vote
    was answered 200. Raw HTTP/1.1 on asyncio streams: a pooled client (httpx) with this many requests in
    flight spends several times the server's CPU, and the test would measure the client."""
    host, port = url.removeprefix("http://").split(":")

    async def vote(i: int, battle_id: str):
        body = json.dumps({"winner": WINNERS[i % len(WINNERS)]}).encode()
        head = (f"POST /api/arena/battles/{battle_id}/vote HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head.encode() + body)
            await writer.drain()
            response = await reader.read()  # to the end: the server closes the connection after answering
            writer.close()
        except OSError:  # refused or reset: the server was killed
            return
        status_line = response.split(b"\r\n", 1)[0].split()
        if len(status_line) < 2:  # cut off before the answer
            return
        statuses.append(int(status_line[1]))
        if statuses[-1] == 200:
            acknowledged.append(battle_id)

    async def vote_all():
        await asyncio.gather(*(vote(i, b) for i, b in enumerate(battle_ids)))

    asyncio.run(vote_all())


def enough_file_descriptors(n: int) -> None:
    """Each vote holds a socket in this process and one in the server: raise the soft limit if it is lower."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = n + 256
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"{n} connections at once need {wanted} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def stored_votes(path: Path) -> dict[str, str]:
    """Opened afresh, as after a restart: SQLite replays the WAL of a killed writer."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT battle_id, winner FROM votes").fetchall())


@pytest.fixture(scope="module")
def vote_server(trained_checkpoint, tmp_path_factory):
    """One server for both durability tests (starting one costs more than the votes), on a store holding
    2 x 1,000 finished battles: (process, url, store path, the first 1,000 ids, the second 1,000 ids). The
    SIGKILL test kills it, so that test comes last."""
    enough_file_descriptors(N_VOTES)
    path = tmp_path_factory.mktemp("durability") / "votes.sqlite"
    battle_ids = finished_battles(path, 2 * N_VOTES)
    process, url = start_server(trained_checkpoint, path)
    try:
        yield process, url, path, battle_ids[:N_VOTES], battle_ids[N_VOTES:]
    finally:
        stop_server(process)


def test_a_thousand_concurrent_votes_are_all_stored(vote_server):
    _, url, path, battle_ids, _ = vote_server
    acknowledged, statuses = [], []
    start = time.perf_counter()
    send_votes(url, battle_ids, acknowledged, statuses)
    seconds = time.perf_counter() - start
    assert statuses == [200] * N_VOTES, f"{len(statuses)} answers: {set(statuses)}"
    board = httpx.get(url + "/api/leaderboard", timeout=60).json()
    assert (board["votes"], board["rated"]) == (N_VOTES, N_VOTES)
    assert sum(row["battles"] for row in board["rows"]) == 2 * N_VOTES
    votes = stored_votes(path)
    assert len(votes) == N_VOTES and set(votes) == set(battle_ids)
    assert all(votes[b] == WINNERS[i % len(WINNERS)] for i, b in enumerate(battle_ids))
    print(f"{N_VOTES} votes in {seconds:.1f} s")


def test_sigkill_loses_no_acknowledged_vote(vote_server):
    process, url, path, _, battle_ids = vote_server
    before = stored_votes(path)
    acknowledged, statuses = [], []
    sender = threading.Thread(target=send_votes, args=(url, battle_ids, acknowledged, statuses))
    sender.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < N_VOTES // 4 and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)  # no shutdown, no flush: whatever the file holds now is all there is
    process.wait()
    sender.join(timeout=60)
    killed_at = len(acknowledged)
    assert N_VOTES // 4 <= killed_at < N_VOTES, f"the kill was not midway: {killed_at} votes acknowledged"
    votes = stored_votes(path)
    lost = set(acknowledged) - set(votes)
    assert not lost, f"{len(lost)} acknowledged votes lost"
    sent = {b: WINNERS[i % len(WINNERS)] for i, b in enumerate(battle_ids)}
    assert all(votes[b] == sent[b] for b in acknowledged)
    assert set(votes) - set(before) <= set(battle_ids)
    print(f"killed after {killed_at} acknowledged votes; {len(votes) - len(before)} stored")
