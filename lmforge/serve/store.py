"""The server's memory: chat conversations and arena battles with their votes, in one SQLite file.

    lmforge serve --model runs/world/sft/final --store lmforge_store.sqlite
    lmforge arena export prefs.jsonl [--store lmforge_store.sqlite]     decisive votes -> {prompt, chosen, rejected}
    lmforge arena rate lmforge_store.sqlite                              the votes as battles -> ratings

Tables:

    conversations  id, title, model, settings (JSON), created, updated       the chat page's sidebar
    messages       conversation_id, position, role, content, model, finish_reason, stats (JSON)
    battles        id, created, model_a, model_b, prompt, params (JSON), client_id,
                   reply_a, finish_a, tokens_a, reply_b, finish_b, tokens_b   one anonymous arena round
    votes          battle_id (one vote per battle), tstamp, winner, names_leaked
    rated_battles  a view: the votes `evaluate/arena.py` rates, in its battle format

Durability. The file is in WAL mode with `synchronous=FULL`: a vote's transaction is committed and the WAL
fsynced before `record_vote` returns, so a vote the server has acknowledged survives the process being killed
(and the machine losing power). WAL lets readers (the leaderboard, `lmforge arena rate` on a live store) run
beside the writer. One connection is shared by the server's threads behind a lock: SQLite serialises writers
anyway, and a vote is one small transaction.

Which votes count. `winner` is one of model_a, model_b, tie, tie (bothbad), as in the battle files that
`lmforge arena rate` reads. A battle between a model and itself (one model served) teaches a rating nothing
and is left out of `rated_battles`, but its decisive vote is still a human preference between two samples
and is exported. A battle whose replies name either model (`names_leaked`) was not anonymous, so its vote is
left out of both, as FastChat does (decoding_and_serving.md §10).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from lmforge.errors import BadConfigError, BadFileError

DEFAULT_STORE = "lmforge_store.sqlite"
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
ROLES = ("system", "user", "assistant")

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    model TEXT,
    finish_reason TEXT,
    stats TEXT,
    PRIMARY KEY (conversation_id, position)
);
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    prompt TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    client_id TEXT NOT NULL DEFAULT '',
    reply_a TEXT, finish_a TEXT, tokens_a INTEGER,
    reply_b TEXT, finish_b TEXT, tokens_b INTEGER
);
CREATE TABLE IF NOT EXISTS votes (
    battle_id TEXT PRIMARY KEY REFERENCES battles(id),
    tstamp REAL NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('model_a', 'model_b', 'tie', 'tie (bothbad)')),
    names_leaked INTEGER NOT NULL DEFAULT 0
);
CREATE VIEW IF NOT EXISTS rated_battles AS
    SELECT v.battle_id, v.tstamp, b.model_a, b.model_b, v.winner,
           length(b.reply_a) AS len_a, length(b.reply_b) AS len_b, b.prompt
    FROM votes v JOIN battles b ON b.id = v.battle_id
    WHERE b.model_a != b.model_b AND v.names_leaked = 0;
"""


class VoteRefused(Exception):
    """A vote the store will not take: the battle is unknown, already voted on, or not finished."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason  # "unknown", "voted" or "unfinished"


def names_leaked(model_names: tuple[str, ...], replies: tuple[str, ...]) -> bool:
    """Does any reply name any of the models, as a whole word, in any case? ("I am sft-v2" names `sft-v2`.)"""
    return any(re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", reply, re.IGNORECASE)
               for name in model_names for reply in replies)


class Store:
    """The SQLite file behind the chat and arena pages. Every method is one transaction and is thread-safe."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        # An existing file is opened now, so that a wrong one is reported at startup. A missing one is created
        # at first use: a server used only through /v1 leaves no file behind.
        if self.path.exists():
            self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                # isolation_level=None: no implicit transactions; `_transaction` says where each begins and ends
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                db.row_factory = sqlite3.Row
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA foreign_keys=ON")
                db.execute("PRAGMA busy_timeout=10000")  # another process (a CLI reader) may hold the file
                db.executescript(SCHEMA)
            except sqlite3.DatabaseError as e:
                raise BadFileError(f"{self.path}: cannot be used as the vote and conversation store ({e})") from None
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextlib.contextmanager
    def _transaction(self):
        """BEGIN IMMEDIATE takes the write lock at once, so two writers never both read and then collide."""
        with self._lock:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # --- conversations ---------------------------------------------------------------------------------------

    def list_conversations(self, search: str = "") -> list[dict]:
        """Newest first; `search` matches the title or any message's text (as plain text; ASCII letters in any case)."""
        escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")  # LIKE's wildcards
        pattern = f"%{escaped}%"
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, title, model, updated FROM conversations WHERE ? = '' OR title LIKE ? ESCAPE '\\' "
                "OR id IN (SELECT conversation_id FROM messages WHERE content LIKE ? ESCAPE '\\') "
                "ORDER BY updated DESC", (search, pattern, pattern)).fetchall()
        return [dict(row) for row in rows]

    def create_conversation(self, title: str, model: str = "", settings: dict | None = None) -> dict:
        now = time.time()
        conversation = {"id": uuid.uuid4().hex, "title": title, "model": model, "settings": settings or {},
                        "created": now, "updated": now, "messages": []}
        with self._transaction() as db:
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
                       (conversation["id"], title, model, json.dumps(settings or {}), now, now))
        return conversation

    def get_conversation(self, conversation_id: str) -> dict | None:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            messages = db.execute("SELECT role, content, model, finish_reason, stats FROM messages "
                                  "WHERE conversation_id = ? ORDER BY position", (conversation_id,)).fetchall()
        if row is None:
            return None
        return {**dict(row), "settings": json.loads(row["settings"]),
                "messages": [{**dict(m), "stats": json.loads(m["stats"]) if m["stats"] else None} for m in messages]}

    def replace_conversation(self, conversation_id: str, title: str, model: str, settings: dict,
                             messages: list[dict]) -> dict | None:
        """The whole conversation as the page now has it (regenerate and edit-and-resend rewrite its end).
        None when there is no such conversation."""
        with self._transaction() as db:
            updated = db.execute("UPDATE conversations SET title = ?, model = ?, settings = ?, updated = ? "
                                 "WHERE id = ?", (title, model, json.dumps(settings), time.time(), conversation_id))
            if updated.rowcount == 0:
                return None
            db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?)", [
                (conversation_id, position, m["role"], m["content"], m.get("model"), m.get("finish_reason"),
                 json.dumps(m["stats"]) if m.get("stats") is not None else None)
                for position, m in enumerate(messages)])
        return self.get_conversation(conversation_id)

    def delete_conversation(self, conversation_id: str) -> bool:
        with self._transaction() as db:
            return db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount > 0

    # --- arena ------------------------------------------------------------------------------------------------

    def start_battle(self, model_a: str, model_b: str, prompt: str, params: dict | None = None,
                     client_id: str = "") -> str:
        battle_id = uuid.uuid4().hex
        with self._transaction() as db:
            db.execute("INSERT INTO battles (id, created, model_a, model_b, prompt, params, client_id) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (battle_id, time.time(), model_a, model_b, prompt, json.dumps(params or {}), client_id))
        return battle_id

    def get_battle(self, battle_id: str) -> dict | None:
        """The battle with its vote (`winner` and `tstamp` None before one)."""
        with self._transaction() as db:
            row = db.execute("SELECT b.*, v.winner, v.tstamp, v.names_leaked FROM battles b "
                             "LEFT JOIN votes v ON v.battle_id = b.id WHERE b.id = ?", (battle_id,)).fetchone()
        return None if row is None else {**dict(row), "params": json.loads(row["params"])}

    def record_reply(self, battle_id: str, side: str, reply: str, finish_reason: str, tokens: int) -> bool:
        """A side's reply, once: False when that side already has one (the first stream to end wins)."""
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        with self._transaction() as db:
            return db.execute(f"UPDATE battles SET reply_{side} = ?, finish_{side} = ?, tokens_{side} = ? "
                              f"WHERE id = ? AND reply_{side} IS NULL",
                              (reply, finish_reason, tokens, battle_id)).rowcount > 0

    def record_vote(self, battle_id: str, winner: str) -> dict:
        """Store the battle's one vote, committed (and fsynced) before returning; the battle with its names."""
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {winner!r}")
        with self._transaction() as db:
            battle = db.execute("SELECT * FROM battles WHERE id = ?", (battle_id,)).fetchone()
            if battle is None:
                raise VoteRefused(f"no battle {battle_id!r}", "unknown")
            if battle["reply_a"] is None or battle["reply_b"] is None:
                raise VoteRefused("both replies must be finished before the vote", "unfinished")
            if db.execute("SELECT 1 FROM votes WHERE battle_id = ?", (battle_id,)).fetchone():
                raise VoteRefused(f"battle {battle_id!r} already has its vote", "voted")
            leaked = names_leaked((battle["model_a"], battle["model_b"]), (battle["reply_a"], battle["reply_b"]))
            db.execute("INSERT INTO votes VALUES (?, ?, ?, ?)", (battle_id, time.time(), winner, int(leaked)))
        return {**dict(battle), "winner": winner, "names_leaked": leaked}

    def count_votes(self) -> dict:
        """Votes in all, and those the ratings use."""
        with self._transaction() as db:
            total = db.execute("SELECT count(*) FROM votes").fetchone()[0]
            rated = db.execute("SELECT count(*) FROM rated_battles").fetchone()[0]
        return {"votes": total, "rated": rated}

    def rated_battles(self) -> list[dict]:
        """The battles `evaluate/arena.py` rates, oldest first (online Elo needs the order)."""
        with self._transaction() as db:
            rows = db.execute("SELECT * FROM rated_battles ORDER BY tstamp").fetchall()
        return [dict(row) for row in rows]

    def preference_pairs(self) -> list[dict]:
        """Decisive, anonymous votes as `{prompt, chosen, rejected}` (oldest first), with the models and the
        battle named beside them. A pair with an empty reply, or two equal replies, teaches nothing: left out."""
        with self._transaction() as db:
            rows = db.execute("SELECT b.*, v.winner, v.tstamp FROM votes v JOIN battles b ON b.id = v.battle_id "
                              "WHERE v.winner IN ('model_a', 'model_b') AND v.names_leaked = 0 "
                              "ORDER BY v.tstamp").fetchall()
        pairs = []
        for row in rows:
            chosen, rejected = ("a", "b") if row["winner"] == "model_a" else ("b", "a")
            if not row[f"reply_{chosen}"].strip() or not row[f"reply_{rejected}"].strip() \
                    or row["reply_a"] == row["reply_b"]:
                continue
            pairs.append({"prompt": row["prompt"], "chosen": row[f"reply_{chosen}"],
                          "rejected": row[f"reply_{rejected}"], "chosen_model": row[f"model_{chosen}"],
                          "rejected_model": row[f"model_{rejected}"], "battle_id": row["id"],
                          "tstamp": row["tstamp"]})
        return pairs


# ---------------------------------------------------------------------------------------------------------
# lmforge arena export


@dataclass(frozen=True)
class ExportConfig:
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="OUT.jsonl")]
    """Preference JSONL to write: one {prompt, chosen, rejected} per decisive vote (`lmforge dpo --data`,
    `lmforge reward train --data` read it as it is)."""
    store: str = DEFAULT_STORE
    """The vote store that `lmforge serve --store` wrote."""
    min_votes: int = 1
    """Fail, writing nothing, when the store holds fewer decisive votes than this."""


def run_export(cfg: ExportConfig) -> list[dict]:
    if cfg.min_votes < 0:
        raise BadConfigError("--min-votes must be >= 0")
    if not Path(cfg.store).is_file():
        raise BadFileError(f"{cfg.store}: no such vote store (start `lmforge serve --store PATH` and vote at /arena)")
    store = Store(cfg.store)
    try:
        pairs = store.preference_pairs()
    finally:
        store.close()
    if len(pairs) < cfg.min_votes:
        raise BadFileError(f"{cfg.store}: {len(pairs)} decisive votes usable as preferences, fewer than "
                           f"--min-votes {cfg.min_votes}")
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs), encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {len(pairs)} preference pairs to {out}", file=sys.stderr)
    return pairs
