"""Nearest neighbours by cosine similarity over a library's embeddings.

Both indexes are files derived from the database, rebuilt when it has changed
since (its generation differs) and replaced atomically:

- exact: `DB.vectors/<model digest>/matrix.npy` (unit-length float32 rows,
  memory-mapped) and `ids.npy`; a lookup is one pass of matrix × query in
  blocks, then a partial sort;
- approximate: `.../approx.usearch`, an HNSW graph (the optional `usearch`
  package, `pip install 'soundtag[ann]'`), for libraries of millions of clips.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .db import Database, LibraryError

BLOCK = 1 << 16  # rows multiplied at a time: bounded memory whatever the library's size
# HNSW graph: half-precision vectors, 12 links a node, breadth 40 while building (a third of the
# build time of float32, 16 and 128 at the same recall) and 256 while searching (recall@10 0.975
# in 1.5 ms on a million clips, bench/library.py)
APPROX_EXPANSION = 256


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def folder_for(db: Database, model: str) -> Path:
    return db.path.with_name(db.path.name + ".vectors") / model.rsplit(":", 1)[-1]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


class Vectors:
    """The exact index of one model's embeddings."""

    def __init__(self, ids: np.ndarray, matrix: np.ndarray):
        self.ids, self.matrix = ids, matrix

    @classmethod
    def open(cls, db: Database, model: str, dims: int) -> Vectors:
        """The current matrix, rebuilt first if the database changed since it was written."""
        folder = folder_for(db, model)
        generation = db.generation
        if _state(folder, "exact") != generation:
            with _locked(folder):
                if _state(folder, "exact") != generation:
                    _build_exact(db, model, dims, folder, generation)
        return cls.load(folder)

    @classmethod
    def load(cls, folder: Path) -> Vectors:
        ids = np.load(folder / "ids.npy")
        matrix = np.load(folder / "matrix.npy", mmap_mode="r")[: len(ids)] if len(ids) else np.zeros((0, 0))
        return cls(ids, matrix)

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, cosine similarities) of the k rows nearest `query`, best first."""
        if not len(self.ids):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = unit_rows(np.asarray(query, np.float32)[None])[0]
        sims = np.empty(len(self.ids), np.float32)
        for start in range(0, len(self.ids), BLOCK):
            np.matmul(self.matrix[start : start + BLOCK], q, out=sims[start : start + BLOCK])
        k = min(k, len(sims))
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top], kind="stable")]
        return self.ids[top], sims[top]


class Approximate:
    """The HNSW index of one model's embeddings (usearch)."""

    def __init__(self, index):
        self.index = index

    @classmethod
    def open(cls, db: Database, model: str, dims: int) -> Approximate:
        folder = folder_for(db, model)
        generation = db.generation
        if _state(folder, "approx") != generation:
            exact = Vectors.open(db, model, dims)
            with _locked(folder):
                if _state(folder, "approx") != generation:
                    build_approximate(exact.ids, exact.matrix, folder / "approx.usearch")
                    _set_state(folder, "approx", generation)
        return cls.load(folder / "approx.usearch")

    @classmethod
    def load(cls, path: Path) -> Approximate:
        index = _usearch().Index.restore(str(path), view=True)
        index.expansion_search = APPROX_EXPANSION
        return cls(index)

    def nearest(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.index) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        found = self.index.search(unit_rows(np.asarray(query, np.float32)[None])[0], min(k, len(self.index)))
        return np.asarray(found.keys, np.int64), (1 - np.asarray(found.distances)).astype(np.float32)


def build_approximate(ids: np.ndarray, matrix: np.ndarray, path: Path, threads: int = 0) -> None:
    """An HNSW graph of `matrix`'s rows keyed by `ids`, saved atomically at `path`."""
    index = _usearch().Index(ndim=matrix.shape[1] if len(ids) else 1, metric="cos", dtype="f16",
                              connectivity=12, expansion_add=40)
    index.expansion_search = APPROX_EXPANSION
    for start in range(0, len(ids), BLOCK):
        index.add(ids[start : start + BLOCK], np.ascontiguousarray(matrix[start : start + BLOCK]),
                  threads=threads or len(os.sched_getaffinity(0)))
    tmp = path.with_name(path.name + ".tmp")
    index.save(str(tmp))
    os.replace(tmp, path)


def _usearch():
    try:
        import usearch.index
    except ImportError:
        raise LibraryError("approximate lookups need the usearch package: pip install 'soundtag[ann]'") from None
    return usearch.index


def _build_exact(db: Database, model: str, dims: int, folder: Path, generation: int) -> None:
    count = max(1, db.count(model))  # a memory map cannot be empty; `ids` says how many rows count
    tmp_matrix, tmp_ids = folder / "matrix.npy.tmp", folder / "ids.npy.tmp"
    matrix = np.lib.format.open_memmap(tmp_matrix, "w+", np.float32, (count, dims))
    ids = np.zeros(count, np.int64)
    at = 0
    for batch_ids, batch in db.embeddings(model):
        n = min(len(batch_ids), count - at)  # rows added since counting wait for the next rebuild
        matrix[at : at + n], ids[at : at + n] = unit_rows(batch[:n]), batch_ids[:n]
        at += n
    matrix.flush()
    del matrix
    with open(tmp_ids, "wb") as f:
        np.save(f, ids[:at])
    os.replace(tmp_matrix, folder / "matrix.npy")
    os.replace(tmp_ids, folder / "ids.npy")
    _set_state(folder, "exact", generation)


def _state(folder: Path, kind: str) -> int | None:
    try:
        return json.loads((folder / "state.json").read_text()).get(kind)
    except (OSError, ValueError):
        return None


def _set_state(folder: Path, kind: str, generation: int) -> None:
    state = {}
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        pass
    state[kind] = generation
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / "state.json")
