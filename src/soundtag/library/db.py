"""The library database: one SQLite file (WAL), every write one transaction.

    models  id, runs (JSON), backend, classes (JSON), multilabel, thresholds (JSON), dims
    files   id, path (the absolute path's bytes), name (relative to the folder indexed, for
            people), folder, size, mtime_ns, ctime_ns, hash (BLAKE2b of the content), duration,
            model, error (why a file could not be tagged; NULL when it was), scores and
            embedding (float32 blobs), indexed_at
    tags    file_id, label, score: every label a file scored at least TAG_FLOOR for
    meta    generation (bumped by every change, so derived vector files know they are stale),
            model (the one that indexed last)
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SoundtagError

TAG_FLOOR = 0.01  # scores below this are kept in the scores blob but not in the tags table
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, runs TEXT NOT NULL, backend TEXT NOT NULL, classes TEXT NOT NULL,
    multilabel INTEGER NOT NULL, thresholds TEXT, dims INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE, name TEXT NOT NULL, folder BLOB NOT NULL,
    size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, hash TEXT, duration REAL, model TEXT,
    error TEXT, scores BLOB, embedding BLOB, indexed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tags (
    file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE, label TEXT NOT NULL,
    score REAL NOT NULL, PRIMARY KEY (label, file_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_by_score ON tags (label, score DESC);
CREATE INDEX IF NOT EXISTS tags_by_file ON tags (file_id);
CREATE INDEX IF NOT EXISTS files_by_model ON files (model);
"""
COLUMNS = ("path", "name", "folder", "size", "mtime_ns", "ctime_ns", "hash", "duration", "model", "error",
           "scores", "embedding")


class LibraryError(SoundtagError):
    """A library database that is missing, damaged or asked something it cannot answer."""


@dataclass(frozen=True)
class Model:
    """The scorer that tagged some files: its runs, backend, classes and embedding size."""

    id: str
    runs: list[str]
    backend: str
    classes: list[str]
    multilabel: bool
    thresholds: list[float] | None
    dims: int


@dataclass
class Row:
    """One file's record. `error` set: the file could not be tagged (no scores)."""

    path: str
    name: str
    folder: str
    size: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    hash: str | None
    duration: float | None
    model: str | None
    error: str | None
    scores: np.ndarray | None = None
    embedding: np.ndarray | None = None

    def values(self) -> tuple:
        blob = lambda a: None if a is None else np.asarray(a, "<f4").tobytes()  # noqa: E731
        return (os.fsencode(self.path), self.name, os.fsencode(self.folder), self.size, self.mtime_ns,
                self.ctime_ns, self.hash, self.duration, self.model, self.error, blob(self.scores),
                blob(self.embedding))

    @classmethod
    def of(cls, record: sqlite3.Row) -> Row:
        array = lambda b: None if b is None else np.frombuffer(b, "<f4").copy()  # noqa: E731
        return cls(os.fsdecode(record["path"]), record["name"], os.fsdecode(record["folder"]), record["size"],
                   record["mtime_ns"], record["ctime_ns"], record["hash"], record["duration"], record["model"],
                   record["error"], array(record["scores"]), array(record["embedding"]))


@dataclass(frozen=True)
class Known:
    """What the library remembers of a file, enough to tell whether it changed."""

    id: int
    size: int | None
    mtime_ns: int | None
    ctime_ns: int | None
    hash: str | None
    model: str | None
    error: str | None


@dataclass(frozen=True)
class Hit:
    """A file found by a search or a similarity lookup."""

    id: int
    name: str
    path: str
    score: float
    duration: float | None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "score": round(self.score, 6), "duration": self.duration,
                "error": self.error}


class Database:
    """The SQLite file. Reads may come from several threads (one connection, a lock);
    writes come from one indexing process at a time (SQLite's own lock)."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise LibraryError(f"{self.path}: no such library; make one with `soundtag index RUN FOLDER --db "
                               f"{self.path}`")
        try:
            self.conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            if create:
                self.conn.executescript(SCHEMA)
            elif self.conn.execute("SELECT name FROM sqlite_master WHERE name='files'").fetchone() is None:
                raise LibraryError(f"{self.path}: not a soundtag library (no files table)")
        except sqlite3.DatabaseError as e:
            raise LibraryError(f"{self.path}: not a readable SQLite library ({e})") from None
        self.lock = threading.RLock()

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; it bumps the generation."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("INSERT INTO meta VALUES ('generation', '1') ON CONFLICT(key) DO UPDATE "
                                  "SET value = CAST(value AS INTEGER) + 1")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def query(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    def meta(self, key: str) -> str | None:
        found = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return found[0]["value"] if found else None

    @property
    def generation(self) -> int:
        return int(self.meta("generation") or 0)

    # --- models --------------------------------------------------------------------------
    def save_model(self, model: Model) -> None:
        """Record the model that indexes next (a change only when it is another one)."""
        if self.meta("model") == model.id and self.model(model.id) == model:
            return
        with self.transaction() as c:
            c.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (model.id, json.dumps(model.runs), model.backend, json.dumps(model.classes),
                       int(model.multilabel), json.dumps(model.thresholds), model.dims))
            c.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?)", (model.id,))

    def model(self, model_id: str | None = None) -> Model:
        """A model by id; the one that indexed last by default."""
        model_id = model_id or self.meta("model")
        found = self.query("SELECT * FROM models WHERE id = ?", (model_id,)) if model_id else []
        if not found:
            raise LibraryError(f"{self.path}: no files have been tagged into this library yet")
        m = found[0]
        return Model(m["id"], json.loads(m["runs"]), m["backend"], json.loads(m["classes"]),
                     bool(m["multilabel"]), json.loads(m["thresholds"]), m["dims"])

    # --- files ---------------------------------------------------------------------------
    def known(self, folder: str) -> dict[bytes, Known]:
        """Every file recorded under `folder` (absolute), by path bytes."""
        prefix = os.fsencode(os.path.join(folder, ""))
        rows = self.query("SELECT id, path, size, mtime_ns, ctime_ns, hash, model, error FROM files "
                          "WHERE substr(path, 1, ?) = ?", (len(prefix), prefix))
        return {r["path"]: Known(r["id"], r["size"], r["mtime_ns"], r["ctime_ns"], r["hash"], r["model"],
                                 r["error"]) for r in rows}

    def write(self, rows: Sequence[Row], restats: Sequence[tuple[int, int, int, int]], classes: Sequence[str]) -> None:
        """Insert or replace files' records with their tags, and give files whose
        content is unchanged (id, size, mtime_ns, ctime_ns) their new times: all in one
        transaction, so each record is committed with its tags or not at all."""
        if not rows and not restats:
            return  # no transaction: the generation moves only when something changed
        assignments = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS)
        insert = (f"INSERT INTO files ({', '.join(COLUMNS)}, indexed_at) VALUES ({', '.join('?' * len(COLUMNS))}, ?) "
                  f"ON CONFLICT(path) DO UPDATE SET {assignments}, indexed_at = excluded.indexed_at RETURNING id")
        with self.transaction() as c:
            for row in rows:
                file_id = c.execute(insert, (*row.values(), time.time())).fetchone()[0]
                c.execute("DELETE FROM tags WHERE file_id = ?", (file_id,))
                if row.scores is not None:
                    c.executemany("INSERT INTO tags VALUES (?, ?, ?)",
                                  [(file_id, label, float(s)) for label, s in zip(classes, row.scores)
                                   if s >= TAG_FLOOR])
            c.executemany("UPDATE files SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE id = ?",
                          [(size, mtime, ctime, file_id) for file_id, size, mtime, ctime in restats])

    def remove(self, ids: Sequence[int]) -> None:
        with self.transaction() as c:
            c.executemany("DELETE FROM files WHERE id = ?", [(i,) for i in ids])

    def row(self, file_id: int) -> Row | None:
        found = self.query("SELECT * FROM files WHERE id = ?", (file_id,))
        return Row.of(found[0]) if found else None

    def id_of(self, path: str) -> int | None:
        found = self.query("SELECT id FROM files WHERE path = ?", (os.fsencode(os.path.abspath(path)),))
        return found[0]["id"] if found else None

    def count(self, model: str | None = None) -> int:
        if model is None:
            return self.query("SELECT count(*) FROM files")[0][0]
        return self.query("SELECT count(*) FROM files WHERE model = ? AND embedding IS NOT NULL", (model,))[0][0]

    def embeddings(self, model: str, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, embeddings [n, dims]) of every file the model tagged, in id order, in batches."""
        last = -1
        while True:
            rows = self.query("SELECT id, embedding FROM files WHERE model = ? AND embedding IS NOT NULL "
                              "AND id > ? ORDER BY id LIMIT ?", (model, last, batch))
            if not rows:
                return
            last = rows[-1]["id"]
            yield (np.array([r["id"] for r in rows], np.int64),
                   np.stack([np.frombuffer(r["embedding"], "<f4") for r in rows]))
