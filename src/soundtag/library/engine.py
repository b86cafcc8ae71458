"""Indexing a folder into a library on this machine.

The plan (`plan`) compares the folder with the library: a file whose size,
mtime and ctime are those recorded (by the same model) is skipped without
being opened; the rest are read and hashed and, unless their content hash is
the one recorded, decoded and scored; records of files no longer there are
pruned. Worker processes forked from this one tag shares of a large run (threads
decode files ahead of the networks in a small one); the rows of each share or
chunk of up to `CHUNK` files are committed together, each with its tags, so an
interrupted run keeps every one it finished.

A file is scored at its own length (`Tagger.score_each`), so its row never
depends on which other files were indexed with it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import audio
from ..errors import SoundtagError
from ..predict import CHUNK, Tagger
from ..run import Run
from ..scorer import ENSEMBLE, Clip, is_ensemble, ordered_map, read_ensemble, set_threads
from ..stack import is_stack
from ..workers import Workers, processes_for, shares
from .db import Database, Known, LibraryError, Model, Row
from .walk import Listed, walk

CHANGED = "changed while being indexed; it is indexed again on the next run"


@dataclass
class Report:
    """What one indexing run did."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    pruned: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.added} added, {self.updated} re-scored, {self.unchanged} unchanged, {self.pruned} pruned, "
                f"{len(self.failed)} not taggable, in {self.seconds:.1f} s")


def backend_for(runs: Sequence[str | Path], backend: str) -> str:
    """`auto`: ONNX Runtime when every run folder has an ONNX export, else torch."""
    if backend != "auto":
        return backend
    exported = all(not is_stack(r) and not is_ensemble(r) and Run.open(r).onnx_paths() for r in runs)
    return "onnx" if exported else "torch"


def model_id(runs: Sequence[str | Path], backend: str) -> str:
    """The scorer's name: its runs' folder names, the backend and a digest of every
    file that decides its scores (configs, class lists, weights, exported networks)."""
    h = hashlib.sha256(backend.encode())
    for path in _scoring_files(map(Path, runs)):
        h.update(path.read_bytes())
    return f"{'+'.join(Path(r).name for r in runs)}:{backend}:{h.hexdigest()[:12]}"


def _scoring_files(folders: Iterable[Path]) -> Iterator[Path]:
    """The files of run, stack and ensemble folders (an ensemble's members too) that decide their scores."""
    for folder in folders:
        for name in ("config.yaml", "run.json", "stack.json", "stack.safetensors", ENSEMBLE):
            if (folder / name).is_file():
                yield folder / name
        yield from sorted([*folder.glob("fold*/model.safetensors"), *folder.glob("onnx/*.onnx")])
        if is_ensemble(folder):
            yield from _scoring_files(read_ensemble(folder)[0])


def describe(tagger: Tagger, runs: Sequence[str | Path], backend: str) -> Model:
    """The library's record of the scorer `tagger` wraps."""
    try:
        thresholds = [float(t) for t in tagger.thresholds()]
    except SoundtagError:  # a run without tuned thresholds still indexes
        thresholds = None
    blank = {c: np.zeros((c.n_features, 64), np.float32) for c in tagger.feature_configs}
    dims = tagger.score_each([blank])[1].shape[1]
    return Model(model_id(runs, backend), [str(Path(r).resolve()) for r in runs], backend, tagger.classes,
                 tagger.multilabel, thresholds, dims)


def content_hash(path: str) -> str:
    """BLAKE2b of the file's bytes (raises OSError)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def identity(st: os.stat_result | None) -> tuple[int | None, int | None, int | None]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns) if st else (None, None, None)


@dataclass(frozen=True)
class Job:
    """A file to read, what the walk saw of it, and what the library knows of it (None: new)."""

    path: str
    stat: os.stat_result
    known: Known | None


def plan(db: Database, folder: str, model: str, report: Report) -> tuple[list[Job], list[Listed], list[int]]:
    """(files to read, entries to record as broken, record ids to prune)."""
    known = db.known(folder)
    jobs, broken, listed = [], [], set()
    for entry in walk(folder):
        key = os.fsencode(entry.path)
        listed.add(key)
        was = known.get(key)
        if entry.stat is None:
            if was is None or was.error != entry.reason:
                broken.append(entry)
            else:
                report.unchanged += 1
        elif was is not None and was.model == model and (was.size, was.mtime_ns, was.ctime_ns) == identity(
                entry.stat):
            report.unchanged += 1
        else:
            jobs.append(Job(entry.path, entry.stat, was))
    return jobs, broken, [k.id for path, k in known.items() if path not in listed]


class Indexer:
    """Tags files into a library with one model."""

    def __init__(self, db: Database, tagger: Tagger, model: Model, folder: str):
        self.db, self.tagger, self.model, self.folder = db, tagger, model, folder

    def row(self, path: str, st: os.stat_result | None, digest: str | None = None, error: str | None = None,
            duration: float | None = None) -> Row:
        return Row(path, printable(os.path.relpath(path, self.folder)), self.folder, *identity(st), digest,
                   duration, self.model.id, error)

    def prepare(self, job: Job) -> tuple[Row, Clip | None]:
        """Read, hash and decode one file: its row and clip (scores to come), a row
        saying why it cannot be tagged, or a row marked RESTAT (same content)."""
        path = job.path
        try:
            before = os.stat(path)
            if not stat.S_ISREG(before.st_mode):
                return self.row(path, before, error=unusable(path)), None
            digest = content_hash(path)
        except OSError as e:
            return self.row(path, None, error=unusable(path, e)), None
        known = job.known
        if known and known.hash == digest and known.model == self.model.id and known.error is None:
            return self.row(path, before, digest, error=RESTAT), None
        try:
            duration, clip, _ = self.tagger.decode(path, whole=False)
            reason = None
        except audio.AudioError as e:
            duration, clip, reason = None, None, " ".join(e.reason.split())
        if not unchanged_since(path, before):
            return self.row(path, None, digest, error=CHANGED), None
        return self.row(path, before, digest, reason, duration), clip

    def write(self, done: Sequence[tuple[Row, Job | None]], report: Report) -> None:
        """Record files' rows (with their tags) in one transaction, and count them."""
        rows, restats = [], []
        for row, job in done:
            known = job.known if job else None
            if row.error == RESTAT:
                restats.append((known.id, row.size, row.mtime_ns, row.ctime_ns))
                report.unchanged += 1
                continue
            rows.append(row)
            if row.error:
                report.failed[row.path] = row.error
            elif known is None:
                report.added += 1
            else:
                report.updated += 1
        self.db.write(rows, restats, self.model.classes)

    def score(self, prepared: Sequence[tuple[Row, Clip | None]]) -> None:
        """Fill in the scores and embeddings of the rows that have a clip."""
        scored = [i for i, (_, clip) in enumerate(prepared) if clip is not None]
        if scored:
            scores, embeddings = self.tagger.score_each([prepared[i][1] for i in scored])
            for i, s, e in zip(scored, scores, embeddings):
                prepared[i][0].scores, prepared[i][0].embedding = s, e

    def tag(self, jobs: Sequence[Job]) -> list[Row]:
        """Rows of files read, decoded and scored in turn on this thread (a worker process's share)."""
        prepared = [self.prepare(job) for job in jobs]
        self.score(prepared)
        return [row for row, _ in prepared]

    def run(self, jobs: list[Job], threads: int, progress: bool, report: Report) -> None:
        """Tag the files, CHUNK at a time, and write the rows of each chunk (and of
        the files that cannot be tagged before it) together. A run of at least
        `workers.PROCESS_FILES` files a process is shared among the tagger's worker processes;
        a smaller one prepares files on `threads` threads here."""
        processes = processes_for(len(jobs), self.tagger.processes)
        with tqdm(total=len(jobs), unit="file", desc="indexing", disable=not progress, dynamic_ncols=True) as bar:
            if processes > 1:
                self._run_in_processes(jobs, processes, bar, report)
            else:
                self._run_here(jobs, threads, bar, report)

    def _run_here(self, jobs: list[Job], threads: int, bar: tqdm, report: Report) -> None:
        pending: list[tuple[Row, Job, Clip | None]] = []

        def flush() -> None:
            self.score([(row, clip) for row, _, clip in pending])
            self.write([(row, job) for row, job, _ in pending], report)
            bar.update(len(pending))
            pending.clear()

        for job, (row, clip) in zip(jobs, ordered_map(self.prepare, jobs, threads, CHUNK)):
            pending.append((row, job, clip))
            if len(pending) == CHUNK:
                flush()
        flush()

    def _run_in_processes(self, jobs: list[Job], processes: int, bar: tqdm, report: Report) -> None:
        """Shares of the jobs tagged by worker processes forked from this one (which
        never touch the database); each share's rows are written as it comes back."""
        parts = [part for _, part in shares(jobs, processes, CHUNK)]
        with Workers(self, processes, lambda: set_threads(self.tagger.scorer, 1)) as workers:
            for i, rows in workers.run("tag", parts):
                self.write(list(zip(rows, parts[i])), report)
                bar.update(len(rows))


RESTAT = "\0restat"  # a marker in Row.error, never stored: same content, new times


def unchanged_since(path: str, before: os.stat_result) -> bool:
    """Whether the file still has the size and times it had when reading began
    (any write moves its ctime)."""
    try:
        return identity(os.stat(path)) == identity(before)
    except OSError:
        return False


def printable(text: str) -> str:
    """A name as text, bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def unusable(path: str, error: OSError | None = None) -> str:
    """Why a file that exists cannot be read, in audio.py's words where it has them."""
    try:
        audio.info(path)
    except audio.AudioError as e:
        return e.reason
    return f"cannot be read ({error.strerror})" if error else "not a regular file"


Scoring = Callable[["Indexer", list[Job], Report], None]


def index_folder(db: Database, tagger: Tagger, model: Model, folder: str | Path, threads: int = 0,
                 progress: bool = True, scoring: Scoring | None = None) -> Report:
    """Bring the library's records of `folder` up to date; `scoring` replaces
    the local scoring of the files to read (the Ray engine)."""
    start = time.perf_counter()
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise LibraryError(f"{folder}: not a folder")
    db.save_model(model)
    report = Report()
    jobs, broken, gone = plan(db, folder, model.id, report)
    indexer = Indexer(db, tagger, model, folder)
    indexer.write([(indexer.row(entry.path, None, error=entry.reason), None) for entry in broken], report)
    if gone:
        db.remove(gone)
        report.pruned = len(gone)
    if scoring is None:
        indexer.run(jobs, threads or tagger.threads, progress, report)
    else:
        scoring(indexer, jobs, report)
    report.seconds = time.perf_counter() - start
    return report
