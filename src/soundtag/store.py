"""The feature cache: every clip's features packed into one memory-mapped array.

A cache folder is keyed by the feature config and the file list (paths, sizes,
modification times). Inside it:

- `data.bin`: float16 (or float32) rows of `n_features` values, one row a
  frame, clips stored one after another, so a clip is one contiguous slice;
- `progress.tsv`: one line a finished clip (position, offset, frames, error),
  appended after its data, so a killed run resumes where it stopped;
- `index.json`: written when every clip is done; its presence marks the cache
  complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import audio, features
from .features import FeatureConfig

DTYPES = ("float16", "float32")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $SOUNDTAG_CACHE, else the user's cache directory."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("SOUNDTAG_CACHE"):
        return Path(os.environ["SOUNDTAG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soundtag"


def cache_key(files: Sequence[str | Path], config: FeatureConfig, dtype: str) -> str:
    """Hash of the feature config, the storage type and each file's identity."""
    h = hashlib.sha256(f"{config.key()}|{dtype}".encode())
    for f in files:
        try:
            st = os.stat(f)
            h.update(f"|{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{f}:missing".encode())
    return h.hexdigest()[:20]


@dataclass
class FeatureStore:
    """Read-only view of a complete cache: `store[i]` is clip i's features."""

    folder: Path
    config: FeatureConfig
    files: list[str]
    offsets: np.ndarray
    frames: np.ndarray
    errors: dict[int, str]
    data: np.ndarray

    @classmethod
    def open(cls, folder: str | Path) -> FeatureStore:
        folder = Path(folder)
        index = json.loads((folder / "index.json").read_text())
        config = FeatureConfig.from_dict(index["config"])
        offsets = np.asarray(index["offsets"], dtype=np.int64)
        frames = np.asarray(index["frames"], dtype=np.int64)
        total = int((offsets + frames).max(initial=0))
        shape = (total, config.n_features)
        data = (np.memmap(folder / "data.bin", dtype=index["dtype"], mode="r", shape=shape)
                if total else np.zeros(shape, index["dtype"]))
        errors = {int(k): v for k, v in index["errors"].items()}
        return cls(folder, config, index["files"], offsets, frames, errors, data)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        """Clip i's features [n_features, frames] (a view into the memory map)."""
        if i in self.errors:
            raise KeyError(f"{self.files[i]}: no features ({self.errors[i]})")
        o = int(self.offsets[i])
        return self.data[o : o + int(self.frames[i])].T

    @property
    def ok(self) -> np.ndarray:
        """Mask of clips that have features."""
        mask = np.ones(len(self), bool)
        mask[list(self.errors)] = False
        return mask

    def failures(self) -> dict[str, str]:
        """Unreadable files and why."""
        return {self.files[i]: reason for i, reason in sorted(self.errors.items())}


def extract(files: Sequence[str | Path], config: FeatureConfig, cache_dir: str | Path | None = None,
            workers: int | None = None, dtype: str = "float16", progress: bool = True) -> FeatureStore:
    """Compute the features of `files` once and return the cache.

    A complete cache is opened as is; a partial one (an interrupted run) is
    resumed. Unreadable clips are recorded with their reason and skipped.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown feature dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    files = [str(f) for f in files]
    folder = cache_root(cache_dir) / f"{config.key()}-{cache_key(files, config, dtype)}"
    if (folder / "index.json").exists():
        return FeatureStore.open(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = _resume(folder, config.n_features, np.dtype(dtype).itemsize)
    todo = [i for i in range(len(files)) if i not in done]
    with open(folder / "data.bin", "ab") as data, open(folder / "progress.tsv", "a") as log:
        offset = data.tell() // (config.n_features * np.dtype(dtype).itemsize)
        bar = tqdm(total=len(files), initial=len(done), unit="clip", desc="features",
                   disable=not progress, dynamic_ncols=True)
        for i, spec, error in compute_all(files, todo, config, dtype, workers):
            n = 0 if spec is None else spec.shape[1]
            if spec is not None:
                data.write(np.ascontiguousarray(spec.T).tobytes())
                data.flush()
            log.write(f"{i}\t{offset}\t{n}\t{error}\n")
            log.flush()
            done[i] = (offset, n, error)
            offset += n
            bar.update()
        bar.close()
    _write_index(folder, files, config, dtype, done)
    return FeatureStore.open(folder)


def _resume(folder: Path, n_features: int, itemsize: int) -> dict[int, tuple[int, int, str]]:
    """Clips finished by an earlier run; data past the last one is cut off."""
    done: dict[int, tuple[int, int, str]] = {}
    log = folder / "progress.tsv"
    if log.exists():
        text = log.read_text()
        lines = text.split("\n")[:-1]  # the last piece is empty or a torn line
        for count, line in enumerate(lines):
            try:
                i, offset, n, error = line.split("\t", 3)
                done[int(i)] = (int(offset), int(n), error)
            except ValueError:  # a garbled line: everything from here on is redone
                lines = lines[:count]
                break
        log.write_text("".join(line + "\n" for line in lines))
    end = max((o + n for o, n, _ in done.values()), default=0)
    with open(folder / "data.bin", "ab") as data:
        data.truncate(end * n_features * itemsize)
    return done


def _write_index(folder: Path, files: list[str], config: FeatureConfig, dtype: str,
                 done: dict[int, tuple[int, int, str]]) -> None:
    index = {
        "config": config.to_dict(),
        "dtype": dtype,
        "files": files,
        "offsets": [done[i][0] for i in range(len(files))],
        "frames": [done[i][1] for i in range(len(files))],
        "errors": {str(i): done[i][2] for i in range(len(files)) if done[i][2]},
    }
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    tmp.replace(folder / "index.json")


class _OneTorchThread:
    """Torch on one thread while any caller needs it so (clips and batches run
    side by side instead); the caller's setting comes back when the last one
    ends. Counted, because torch's thread setting is global to the process."""

    def __init__(self) -> None:
        self.lock, self.users, self.saved = threading.Lock(), 0, 1

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.users == 0:
                self.saved = torch.get_num_threads()
                torch.set_num_threads(1)
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    torch.set_num_threads(self.saved)


one_torch_thread = _OneTorchThread()


def compute_all(files: list[str], todo: list[int], config: FeatureConfig, dtype: str,
                 workers: int | None) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """(position, features or None, error) for each clip in `todo`, in order."""
    jobs = [(i, files[i], config, dtype) for i in todo]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 8))
    if workers <= 1:
        with one_torch_thread():  # one clip's STFT gains nothing from more, and suffers on a busy machine
            yield from map(_compute_one, jobs)
        return
    ctx = multiprocessing.get_context("fork")  # starts in milliseconds; workers run torch on one thread
    with ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.imap(_compute_one, jobs, chunksize=4)


def _compute_one(job: tuple[int, str, FeatureConfig, str]) -> tuple[int, np.ndarray | None, str]:
    i, path, config, dtype = job
    specs, error = clip_features(path, [config], dtype)
    return i, None if specs is None else specs[0], error


def clip_features(path: str, configs: Sequence[FeatureConfig],
                  dtype: str = "float32") -> tuple[list[np.ndarray] | None, str]:
    """A clip's features under each config, decoding it once per sample rate and
    trim; or None and the reason the clip is unreadable."""
    waves: dict[tuple[int, float | None], np.ndarray] = {}
    try:
        for c in configs:
            if (c.sample_rate, c.trim_db) not in waves:
                waves[c.sample_rate, c.trim_db] = audio.load(path, c.sample_rate, c.trim_db)
    except audio.AudioError as e:
        return None, " ".join(e.reason.split())
    return [features.compute(waves[c.sample_rate, c.trim_db], c).astype(dtype) for c in configs], ""
