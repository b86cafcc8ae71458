"""`Library`: a sound collection's tags and embeddings in SQLite, searched by
label and by similarity."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..predict import Tagger
from .db import Database, Hit, LibraryError, Model, Row
from .engine import Report, backend_for, describe, index_folder
from .vectors import Approximate, Vectors

ENGINES = ("local", "ray")


class Library:
    """One library file. `Library(path)` opens an existing one; `index` creates it."""

    def __init__(self, path: str | Path, create: bool = False):
        self.db = Database(path, create)
        self._tagger: Tagger | None = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self.db.path

    @property
    def model(self) -> Model:
        """The model that indexed last: similarity lookups use its embeddings."""
        return self.db.model()

    # --- indexing ------------------------------------------------------------------------------
    @classmethod
    def index(cls, path: str | Path, runs: Sequence[str | Path], folder: str | Path, backend: str = "auto",
              threads: int = 0, engine: str = "local", address: str | None = None,
              progress: bool = True, processes: int = 0) -> Report:
        """Tag every audio file under `folder` into the library at `path` (created if
        need be) with the runs' ensemble; unchanged files are skipped. A large run
        is shared among `processes` worker processes (default: `threads`, all cores)."""
        if engine not in ENGINES:
            raise LibraryError(f"unknown indexing engine {engine!r}; valid: {', '.join(ENGINES)}")
        backend = backend_for(runs, backend)
        tagger = Tagger.load(list(runs), backend=backend, threads=threads, processes=processes)
        with cls(path, create=True) as library:
            model = describe(tagger, runs, backend)
            scoring = None
            if engine == "ray":
                from .ray_engine import ray_scoring
                scoring = ray_scoring(runs, backend, address, library.path, progress)
            return index_folder(library.db, tagger, model, folder, threads, progress, scoring)

    # --- lookups -------------------------------------------------------------------------------
    def labels(self) -> list[str]:
        return self.model.classes

    def search(self, label: str, min_score: float = 0.0, limit: int = 50) -> list[Hit]:
        """Files tagged `label` with at least `min_score`, best first."""
        labels = self._all_classes()
        if label not in labels:
            raise LibraryError(f"unknown label {label!r}; labels in this library: {', '.join(sorted(labels))}")
        rows = self.db.query("SELECT f.id, f.name, f.path, t.score, f.duration FROM tags t JOIN files f "
                             "ON f.id = t.file_id WHERE t.label = ? AND t.score >= ? "
                             "ORDER BY t.score DESC, f.id LIMIT ?", (label, float(min_score), int(limit)))
        return [Hit(r["id"], r["name"], os.fsdecode(r["path"]), r["score"], r["duration"]) for r in rows]

    def similar(self, query: int | str | Path | np.ndarray, k: int = 10, approximate: bool = False) -> list[Hit]:
        """The k files whose embeddings are nearest `query` by cosine similarity: a
        library id, a file (embedded on the fly unless recorded and unchanged) or an
        embedding. The query's own record is left out."""
        model = self.model
        exclude, vector = None, query
        if not isinstance(query, np.ndarray):
            exclude, vector = self._query_vector(query, model)
        if vector.shape != (model.dims,):
            raise LibraryError(f"the query embedding has {vector.size} values; this library's have {model.dims}")
        index = (Approximate if approximate else Vectors).open(self.db, model.id, model.dims)
        ids, sims = index.nearest(vector, k + (exclude is not None))
        hits = [(int(i), float(s)) for i, s in zip(ids, sims) if i != exclude][:k]
        return self._hits(hits)

    def embed(self, path: str | Path) -> np.ndarray:
        """A file's embedding under the library's model."""
        if self._tagger is None:
            model = self.model
            self._tagger = Tagger.load(model.runs, backend=model.backend)
        _, clip, _ = self._tagger.decode(path, whole=False)
        return self._tagger.score_each([clip])[1][0]

    def get(self, file_id: int) -> Row:
        row = self.db.row(file_id)
        if row is None:
            raise LibraryError(f"{self.path}: no file with id {file_id}")
        return row

    def tags(self, file_id: int, k: int = 3) -> list[tuple[str, float]]:
        rows = self.db.query("SELECT label, score FROM tags WHERE file_id = ? ORDER BY score DESC LIMIT ?",
                             (file_id, k))
        return [(r["label"], r["score"]) for r in rows]

    def entries(self, offset: int = 0, limit: int = 50, text: str = "") -> tuple[int, list[Hit]]:
        """(matching files, one page of them by name) for browsing; `text` filters names."""
        pattern = "%" + re.sub(r"([%_\\])", r"\\\1", text) + "%"
        where = "WHERE name LIKE ? ESCAPE '\\'"
        total = self.db.query(f"SELECT count(*) FROM files {where}", (pattern,))[0][0]
        rows = self.db.query(f"SELECT id, name, path, duration, error FROM files {where} ORDER BY name, id "
                             "LIMIT ? OFFSET ?", (pattern, int(limit), int(offset)))
        return total, [Hit(r["id"], r["name"], os.fsdecode(r["path"]), 0.0, r["duration"], r["error"])
                       for r in rows]

    def _query_vector(self, query: int | str | Path, model: Model) -> tuple[int | None, np.ndarray]:
        """(the query's own id, if recorded, and its embedding)."""
        if isinstance(query, int) or (isinstance(query, str) and query.isdigit() and not os.path.exists(query)):
            row = self.get(int(query))
            if row.embedding is None or row.model != model.id:
                raise LibraryError(f"file {query} ({row.name}) has no embedding from the library's model"
                                   f"{': ' + row.error if row.error else ''}")
            return int(query), row.embedding
        file_id = self.db.id_of(str(query))
        row = self.db.row(file_id) if file_id is not None else None
        if row is not None and row.embedding is not None and row.model == model.id and _unchanged(row):
            return file_id, row.embedding
        return file_id, self.embed(query)

    def _hits(self, found: list[tuple[int, float]]) -> list[Hit]:
        if not found:
            return []
        rows = self.db.query(f"SELECT id, name, path, duration FROM files WHERE id IN "
                             f"({', '.join('?' * len(found))})", [i for i, _ in found])
        by_id = {r["id"]: r for r in rows}
        return [Hit(i, by_id[i]["name"], os.fsdecode(by_id[i]["path"]), s, by_id[i]["duration"])
                for i, s in found if i in by_id]

    def _all_classes(self) -> set[str]:
        """The labels of every model that tagged files into the library."""
        return {c for r in self.db.query("SELECT classes FROM models") for c in json.loads(r["classes"])}


def _unchanged(row: Row) -> bool:
    try:
        st = os.stat(row.path)
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (row.size, row.mtime_ns, row.ctime_ns)
