"""Indexing on Ray Data (`soundtag index --engine ray`, the optional extra
`soundtag[ray]`): the driver lists the folder and plans as the local engine
does; Ray reads the files to score as binary, an actor pool scores them (each
actor loads the scorer once), and each chunk of results becomes a Parquet
shard under `DB.shards/<model digest>/` (renamed into place when complete).
One writer, the driver, then merges the shards into the library and removes
them. An interrupted job resumes from the shards it has: their files are not
scored again while they are unchanged.

Every machine of the cluster must see the files at the same paths and have
soundtag installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import audio
from ..predict import CHUNK
from .db import LibraryError, Row
from .engine import CHANGED, Indexer, Job, Report, Scoring, identity

SHARD_FILES = 512  # files a shard holds
BATCH = 32  # files an actor scores at a time
COLUMNS = ("path", "size", "mtime_ns", "ctime_ns", "hash", "duration", "error", "scores", "embedding")


class Scorer:
    """A Ray actor: the scorer, loaded once, scoring batches of files read as bytes."""

    def __init__(self, runs: list[str], backend: str, listed: dict[str, tuple[int, int, int]]):
        from ..predict import Tagger
        self.tagger, self.listed = Tagger.load(runs, backend=backend, threads=1), listed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in COLUMNS}
        clips, at = [], []
        for path, data in zip(batch["path"], batch["bytes"]):
            path = str(path) if str(path).startswith(os.sep) else os.sep + str(path)  # Ray may drop the root
            size, mtime, ctime = self.listed[path]
            duration, clip, error = self.decode(path, bytes(data), (size, mtime, ctime))
            for column, value in zip(COLUMNS, (path, size, mtime, ctime, _digest(bytes(data)), duration, error,
                                               None, None)):
                out[column].append(value)
            if clip is not None:
                clips.append(clip)
                at.append(len(out["path"]) - 1)
        if clips:
            scores, embeddings = self.tagger.score_each(clips)
            for i, s, e in zip(at, scores, embeddings):
                out["scores"][i], out["embedding"][i] = s.astype("<f4").tobytes(), e.astype("<f4").tobytes()
        return out

    def decode(self, path: str, data: bytes, listed: tuple[int, int, int]):
        """(duration, clip, None), or (None, None, why not) — CHANGED when the file is
        no longer what the driver listed."""
        try:
            if identity(os.stat(path)) != listed or len(data) != listed[0]:
                return None, None, CHANGED
        except OSError:
            return None, None, CHANGED
        with tempfile.NamedTemporaryFile(suffix=Path(path).suffix) as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                duration, clip, _ = self.tagger.decode(tmp.name, whole=False)
            except audio.AudioError as e:
                return None, None, " ".join(e.reason.split())
        return duration, clip, None


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def ray_scoring(runs: Sequence[str | Path], backend: str, address: str | None, db_path: Path,
                progress: bool) -> Scoring:
    """The Ray engine's replacement for the local scoring of the files to read."""
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        raise LibraryError("the Ray engine needs Ray Data: pip install 'soundtag[ray]'") from None
    runs = [str(Path(r).resolve()) for r in runs]

    def score(indexer: Indexer, jobs: list[Job], report: Report) -> None:
        shards = db_path.with_name(db_path.name + ".shards") / indexer.model.id.rsplit(":", 1)[-1]
        readable, local = _split(jobs)
        for job in local:  # not regular or not readable: recorded with their reason here
            indexer.write(indexer.prepare(job)[0], job, report)
        done = _shard_paths(shards, readable)
        todo = [j for j in readable if j.path not in done]
        if todo:
            _score_on_ray(todo, runs, backend, address, shards, progress)
        _merge(indexer, shards, readable, report)
        shutil.rmtree(shards, ignore_errors=True)
    return score


def _split(jobs: list[Job]) -> tuple[list[Job], list[Job]]:
    readable, local = [], []
    for job in jobs:
        ok = stat.S_ISREG(job.stat.st_mode) and os.access(job.path, os.R_OK)
        (readable if ok else local).append(job)
    return readable, local


def _score_on_ray(jobs: list[Job], runs: list[str], backend: str, address: str | None, shards: Path,
                  progress: bool) -> None:
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=progress, configure_logging=False,
                 **({} if address else {"num_cpus": len(os.sched_getaffinity(0))}))
    try:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        actors = max(1, int(ray.cluster_resources().get("CPU", 1)))
        shards.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(jobs), SHARD_FILES):
            chunk = jobs[start : start + SHARD_FILES]
            listed = {j.path: identity(j.stat) for j in chunk}
            tmp = shards / f"tmp-{uuid.uuid4().hex}"
            (ray.data.read_binary_files([j.path for j in chunk], include_paths=True)
             .map_batches(Scorer, fn_constructor_args=(runs, backend, listed), batch_size=BATCH,
                          compute=ray.data.ActorPoolStrategy(size=min(actors, max(1, len(chunk) // BATCH))),
                          num_cpus=1)
             .write_parquet(str(tmp)))
            tmp.rename(shards / f"shard-{uuid.uuid4().hex}")
    finally:
        if started:
            ray.shutdown()


def _records(shards: Path):
    import pyarrow.parquet as pq
    for shard in sorted(shards.glob("shard-*")):
        try:
            table = pq.read_table(shard)
        except OSError:  # a damaged shard: its files are scored again
            continue
        yield from table.to_pylist()


def _shard_paths(shards: Path, jobs: list[Job]) -> set[str]:
    """Files whose results a shard already holds, for the file as it is now."""
    wanted = {j.path: identity(j.stat) for j in jobs}
    return {r["path"] for r in _records(shards)
            if wanted.get(r["path"]) == (r["size"], r["mtime_ns"], r["ctime_ns"])}


def _merge(indexer: Indexer, shards: Path, jobs: list[Job], report: Report) -> None:
    by_path = {j.path: j for j in jobs}
    done: list[tuple[Row, Job]] = []
    for r in _records(shards):
        job = by_path.pop(r["path"], None)
        if job is None or identity(job.stat) != (r["size"], r["mtime_ns"], r["ctime_ns"]):
            continue
        changed = r["error"] == CHANGED
        row = indexer.row(r["path"], None if changed else job.stat, r["hash"], r["error"], r["duration"])
        if r["scores"] is not None:
            row.scores, row.embedding = (np.frombuffer(r["scores"], "<f4"), np.frombuffer(r["embedding"], "<f4"))
        done.append((row, job))
        if len(done) == CHUNK:
            indexer.write(done, report)
            done.clear()
    indexer.write(done, report)
