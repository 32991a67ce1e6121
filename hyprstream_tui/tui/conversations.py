"""Saved chat conversations: a small SQLite file under $HYPRSTREAM_HOME.

Every message is written as it is sent or finished, so a crash loses at most the reply being
streamed. Replies keep their provenance (model commit, adapter commit, parameters, seed, tokens/s)
as JSON. One connection guarded by a lock: calls come from the TUI's worker threads.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hyprstream_tui.errors import InvalidInput, NotFound, StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    adapter TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
"""
ROLES = ("system", "user", "assistant")
MAX_TITLE = 120


@dataclass(frozen=True, kw_only=True)
class Conversation:
    id: int
    title: str
    model: str
    adapter: str
    created: float
    updated: float


@dataclass(frozen=True, kw_only=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: str
    content: str
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0


def _title(value: str) -> str:
    title = " ".join(str(value).split())
    if not title:
        raise InvalidInput("A conversation title cannot be empty: type a few words.")
    return title[:MAX_TITLE]


class ConversationStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"Cannot open the conversations database {self.path}: {exc}.") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self._db.execute(sql, args)
            except sqlite3.Error as exc:
                raise StorageError(f"The conversations database {self.path} failed: {exc}.") from None

    # ---- conversations -------------------------------------------------------------------------
    def create(self, title: str, *, model: str = "", adapter: str = "") -> Conversation:
        now = time.time()
        cur = self._run("INSERT INTO conversations(title, model, adapter, created, updated) VALUES (?,?,?,?,?)",
                        (_title(title), model, adapter, now, now))
        return self.get(_inserted_id(cur))

    def get(self, conversation_id: int) -> Conversation:
        row = self._run("SELECT id, title, model, adapter, created, updated FROM conversations WHERE id=?",
                        (conversation_id,)).fetchone()
        if row is None:
            raise NotFound(f"No conversation {conversation_id}: it may have been deleted.")
        return Conversation(id=row[0], title=row[1], model=row[2], adapter=row[3], created=row[4], updated=row[5])

    def list(self) -> list[Conversation]:
        rows = self._run("SELECT id, title, model, adapter, created, updated FROM conversations "
                         "ORDER BY updated DESC, id DESC").fetchall()
        return [Conversation(id=r[0], title=r[1], model=r[2], adapter=r[3], created=r[4], updated=r[5]) for r in rows]

    def rename(self, conversation_id: int, title: str) -> Conversation:
        self.get(conversation_id)
        self._run("UPDATE conversations SET title=?, updated=? WHERE id=?", (_title(title), time.time(), conversation_id))
        return self.get(conversation_id)

    def delete(self, conversation_id: int) -> None:
        self.get(conversation_id)
        self._run("DELETE FROM conversations WHERE id=?", (conversation_id,))

    # ---- messages ------------------------------------------------------------------------------
    def add_message(self, conversation_id: int, role: str, content: str, meta: dict[str, Any] | None = None) -> StoredMessage:
        if role not in ROLES:
            raise InvalidInput(f"Unknown role {role!r}: use system, user or assistant.")
        now = time.time()
        cur = self._run("INSERT INTO messages(conversation_id, role, content, meta, created) VALUES (?,?,?,?,?)",
                        (conversation_id, role, content, json.dumps(meta or {}), now))
        self._run("UPDATE conversations SET updated=? WHERE id=?", (now, conversation_id))
        return StoredMessage(id=_inserted_id(cur), conversation_id=conversation_id, role=role, content=content,
                             meta=dict(meta or {}), created=now)

    def messages(self, conversation_id: int) -> builtins.list[StoredMessage]:
        rows = self._run("SELECT id, conversation_id, role, content, meta, created FROM messages "
                         "WHERE conversation_id=? ORDER BY id", (conversation_id,)).fetchall()
        return [StoredMessage(id=r[0], conversation_id=r[1], role=r[2], content=r[3], meta=json.loads(r[4] or "{}"),
                              created=r[5]) for r in rows]

    def delete_messages(self, conversation_id: int, ids: builtins.list[int]) -> None:
        """Delete exactly these messages (a regenerated reply, an edited prompt and what followed)."""
        if ids:
            marks = ",".join("?" * len(ids))
            self._run(f"DELETE FROM messages WHERE conversation_id=? AND id IN ({marks})", (conversation_id, *ids))

    def truncate(self, conversation_id: int, *, from_message: int) -> None:
        """Delete message `from_message` and every later one (regenerate, edit and resend)."""
        self._run("DELETE FROM messages WHERE conversation_id=? AND id>=?", (conversation_id, from_message))

    # ---- export --------------------------------------------------------------------------------
    def export_markdown(self, conversation_id: int) -> str:
        conv = self.get(conversation_id)
        target = conv.model + (f":{conv.adapter}" if conv.adapter else "")
        lines = [f"# {conv.title}", "", f"*{target}*" if target else "", ""]
        for m in self.messages(conversation_id):
            lines += [f"## {m.role}", "", m.content.rstrip(), ""]
            if m.meta.get("provenance"):
                lines += [f"<!-- {format_provenance(m.meta)} -->", ""]
        return "\n".join(lines).rstrip() + "\n"

    def export_jsonl(self, conversation_id: int) -> str:
        self.get(conversation_id)
        return "".join(json.dumps({"role": m.role, "content": m.content, **({"meta": m.meta} if m.meta else {})},
                                  ensure_ascii=False, sort_keys=True) + "\n" for m in self.messages(conversation_id))

    def __iter__(self) -> Iterator[Conversation]:
        return iter(self.list())


def _inserted_id(cur: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just added (sqlite3 types `lastrowid` as optional)."""
    if cur.lastrowid is None:
        raise StorageError("The conversations database added no row.")
    return cur.lastrowid


def format_provenance(meta: dict[str, Any]) -> str:
    """One line: model@commit, adapter@commit, parameters, seed, tokens/s."""
    prov = meta.get("provenance") or {}
    parts = [f"{prov.get('model', '?')}@{(prov.get('model_commit') or '?')[:7]}"]
    if prov.get("adapter"):
        parts.append(f"adapter {prov['adapter']}@{(prov.get('adapter_commit') or '?')[:7]}")
    params = prov.get("params") or {}
    keys = ("temperature", "top_p", "top_k", "max_tokens")
    parts.append(" ".join(f"{k}={params[k]}" for k in keys if k in params))
    parts.append(f"seed={prov.get('seed', '?')}")
    if meta.get("tok_s") is not None:
        parts.append(f"{meta['tok_s']:.1f} tok/s")
    if meta.get("finish_reason"):
        parts.append(f"finish={meta['finish_reason']}")
    return " · ".join(p for p in parts if p)
