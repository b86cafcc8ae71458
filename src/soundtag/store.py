"""The feature store: every clip's features computed once per front end, found
again by the file's identity whatever list, order or subset asks for it.

One folder per front end and storage type, `ROOT/<FeatureConfig.key()>-<dtype>/`:

- `config.json`: the feature config, the dtype and the number of feature rows;
- `data.bin`: append-only; each clip's features as `frames` rows of
  `n_features` values ([frames, n_features], C order), one clip after another,
  so a clip is one contiguous slice of the memory map;
- `index.tsv`: append-only, one line a clip, tab-separated:
  `key offset nbytes frames crc reason check`. `key` is a 128-bit hash (hex) of
  the file's identity: its absolute path's bytes (os.fsencode), size,
  mtime_ns and the crc32 of its first and last 64 KiB. `offset` and `nbytes`
  are the clip's byte range in data.bin, `crc` its zlib.crc32; `reason` says
  why an unreadable clip has no features (empty otherwise); `check` is the
  crc32 of the line before it. A later line for a key supersedes earlier ones.
  An augmentation copy (copies.py) is keyed by the hash of its file's key and
  its variant (`pitch=2`), so each variant of a clip is a clip of its own.
- `lock`: locked (fcntl.lockf) by the one process appending at a time.

A clip's data is written and flushed before its index line, so a killed run
loses only the clips in flight. Lines that fail their check (torn or garbled)
are ignored, and the next writer cuts data.bin back to the end of the last
indexed clip. Readers take no lock: a clip is used only when its range lies
inside data.bin and its checksum matches; anything else is recomputed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from . import audio, features
from .features import FeatureConfig

if TYPE_CHECKING:
    from .copies import Variant

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
CONFIG, DATA, INDEX, LOCK = "config.json", "data.bin", "index.tsv", "lock"
EDGE_BYTES = 64 * 1024  # bytes at each end of a file hashed into its identity
_WRITING = threading.Lock()  # lockf locks belong to the process, so threads queue here too


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $SOUNDTAG_CACHE, else the user's cache directory."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("SOUNDTAG_CACHE"):
        return Path(os.environ["SOUNDTAG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soundtag"


def store_folder(config: FeatureConfig, dtype: str, cache_dir: str | Path | None = None) -> Path:
    """The folder holding every clip's features under `config` as `dtype`."""
    return cache_root(cache_dir) / f"{config.key()}-{dtype}"


def file_key(path: str) -> str:
    """Hash of a file's identity: path bytes, size, mtime and the crc32 of its
    first and last 64 KiB. Raises OSError when the file cannot be read."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(EDGE_BYTES)
        f.seek(max(EDGE_BYTES, st.st_size - EDGE_BYTES))
        tail = f.read(EDGE_BYTES)
    h = hashlib.blake2b(os.fsencode(os.path.abspath(path)), digest_size=16)
    h.update(b"\0%d\0%d\0%08x%08x" % (st.st_size, st.st_mtime_ns, zlib.crc32(head), zlib.crc32(tail)))
    return h.hexdigest()


def variant_key(key: str | None, variant: Variant | None) -> str | None:
    """The key of a copy of the clip keyed `key` (the clip's own key without a variant)."""
    if key is None or variant is None:
        return key
    return hashlib.blake2b(f"{key}\0{variant.key()}".encode(), digest_size=16).hexdigest()


def _identities(files: list[str]) -> tuple[list[str | None], dict[int, str]]:
    """Each file's key (None where it cannot be opened) and why those cannot."""
    keys: list[str | None] = []
    unopenable: dict[int, str] = {}
    for i, path in enumerate(files):
        try:
            keys.append(file_key(path))
        except OSError as e:
            keys.append(None)
            unopenable[i] = _os_reason(e)
    return keys, unopenable


def _os_reason(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an audio file"
    return f"cannot be opened ({error.strerror or type(error).__name__})"


@dataclass(frozen=True)
class Entry:
    """One index line: where a clip's features lie in data.bin, or why it has none."""

    offset: int
    nbytes: int
    frames: int
    crc: int
    reason: str

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    def line(self, key: str) -> bytes:
        text = f"{key}\t{self.offset}\t{self.nbytes}\t{self.frames}\t{self.crc:08x}\t{self.reason}"
        body = text.encode("utf-8", "surrogateescape")
        return body + b"\t%08x\n" % zlib.crc32(body)

    @classmethod
    def parse(cls, line: bytes) -> tuple[str, Entry] | None:
        """(key, entry), or None for a torn or garbled line."""
        body, _, check = line.rpartition(b"\t")
        try:
            if int(check, 16) != zlib.crc32(body):
                return None
            key, offset, nbytes, frames, crc, reason = body.decode("utf-8", "surrogateescape").split("\t")
            return key, cls(int(offset), int(nbytes), int(frames), int(crc, 16), reason)
        except ValueError:
            return None


@dataclass
class Snapshot:
    """What a store's index and data hold at one moment: the entries whose data
    lies inside data.bin, and the end of the last of them."""

    entries: dict[str, Entry]
    end: int
    raw: np.ndarray  # data.bin's bytes (read-only memory map)

    @classmethod
    def read(cls, folder: Path) -> Snapshot:
        try:
            lines = (folder / INDEX).read_bytes().split(b"\n")[:-1]  # the last piece is empty or torn
        except FileNotFoundError:
            lines = []
        size = _size(folder / DATA)  # after the index: a clip's data is written before its line
        entries: dict[str, Entry] = {}
        end = outside = 0
        for key, entry in filter(None, map(Entry.parse, lines)):
            if entry.end > size:
                entries.pop(key, None)
                outside += 1
                continue
            entries[key] = entry
            end = max(end, entry.end)
        if outside:
            log.warning(f"{folder / INDEX}: {outside} clip(s) lie past the end of {DATA}; "
                        "they are recomputed when asked for")
        raw = np.memmap(folder / DATA, np.uint8, "r", shape=(end,)) if end else np.zeros(0, np.uint8)
        return cls(entries, end, raw)

    def verified(self, files: list[str], keys: list[str | None], skip: dict[str, Entry]) -> dict[str, Entry]:
        """The entries of the requested clips (other than those in `skip`) whose data matches its checksum."""
        good: dict[str, Entry] = {}
        for path, key in zip(files, keys):
            entry = self.entries.get(key) if key else None
            if entry is None or key in good or key in skip:
                continue
            if zlib.crc32(self.raw[entry.offset : entry.end]) != entry.crc:
                log.warning(f"{path}: cached features do not match their checksum; recomputing")
                continue
            good[key] = entry
        return good


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class FeatureStore:
    """Read-only view of some clips of a store: `store[i]` is `files[i]`'s features."""

    folder: Path
    config: FeatureConfig
    files: list[str]
    offsets: np.ndarray  # first row of each clip in `data`
    frames: np.ndarray
    errors: dict[int, str]
    data: np.ndarray  # [rows, n_features], a memory map of data.bin
    variants: list[str] = field(default_factory=list)  # each clip's variant key ("": as recorded); empty: none

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
        """Unreadable files (a copy: the file and its variant in brackets) and why."""
        named = [f"{f} [{v}]" if v else f for f, v in zip(self.files, self.variants)] if self.variants else self.files
        return {named[i]: reason for i, reason in sorted(self.errors.items())}


def extract(files: Sequence[str | Path], config: FeatureConfig, cache_dir: str | Path | None = None,
            workers: int | None = None, dtype: str = "float16", progress: bool = True,
            variants: Sequence[Variant | None] | None = None) -> FeatureStore:
    """The features of `files`, computing only the clips the store lacks.

    Clips are found by file identity, so any subset or order of stored clips
    is a lookup. Unreadable clips are recorded with their reason and retried
    only once the file changes. Another process writing the same store is
    waited for. `variants[i]`, where given and not None, makes clip i an
    augmentation copy of `files[i]`: remade so before its features are computed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown feature dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    files = [str(f) for f in files]
    folder = store_folder(config, dtype, cache_dir)
    _prepare(folder, config, dtype)
    keys, unopenable = _identities(files)
    variants = list(variants) if variants is not None else [None] * len(files)
    keys = [variant_key(key, variant) for key, variant in zip(keys, variants)]
    snapshot = Snapshot.read(folder)
    found = snapshot.verified(files, keys, {})
    if any(key and key not in found for key in keys):
        with _locked(folder):
            snapshot = Snapshot.read(folder)  # another process may have added clips meanwhile
            found.update(snapshot.verified(files, keys, found))
            todo = _missing(keys, found)
            if todo:
                found.update(_append(folder, snapshot.end, files, keys, todo, config, dtype, workers,
                                     progress, variants))
    view = _view(folder, config, dtype, files, keys, found, unopenable)
    view.variants = [v.key() if v else "" for v in variants] if any(variants) else []
    return view


def _prepare(folder: Path, config: FeatureConfig, dtype: str) -> None:
    """Create the store folder and its config.json if need be."""
    if (folder / CONFIG).is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{CONFIG}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"features": config.to_dict(), "dtype": dtype, "n_features": config.n_features},
                              indent=2) + "\n")
    tmp.replace(folder / CONFIG)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the store's write lock (waiting for another writer if there is one).
    A POSIX record lock: released when its process dies, not held by forked workers."""
    with _WRITING, open(folder / LOCK, "a+b") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.warning(f"{folder}: another process is writing this feature store; waiting for it")
            fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def _missing(keys: list[str | None], found: dict[str, Entry]) -> list[int]:
    """First position of each key the store lacks."""
    todo: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key and key not in found:
            todo.setdefault(key, i)
    return list(todo.values())


def _append(folder: Path, end: int, files: list[str], keys: list[str | None], todo: list[int],
            config: FeatureConfig, dtype: str, workers: int | None, progress: bool,
            variants: list[Variant | None]) -> dict[str, Entry]:
    """Compute the clips at `todo` and append them to data.bin after `end`, then to the index."""
    _terminate_torn_line(folder / INDEX)
    added: dict[str, Entry] = {}
    with open(folder / DATA, "ab") as data, open(folder / INDEX, "ab", buffering=0) as index:
        data.truncate(end)  # bytes past the last indexed clip are a killed writer's
        requested = len(set(filter(None, keys)))
        bar = tqdm(total=requested, initial=requested - len(todo), unit="clip", desc="features",
                   disable=not progress, dynamic_ncols=True)
        for i, spec, error in compute_all(files, todo, config, dtype, workers, variants):
            entry = Entry(end, 0, 0, 0, " ".join(error.split()))
            if spec is not None:
                rows = np.ascontiguousarray(spec.T)
                data.write(rows.data)
                data.flush()
                entry = Entry(end, rows.nbytes, rows.shape[0], zlib.crc32(rows.data), "")
            index.write(entry.line(keys[i]))
            added[keys[i]] = entry
            end = entry.end
            bar.update()
        bar.close()
    return added


def _terminate_torn_line(index: Path) -> None:
    """End a killed writer's unfinished last line, so that it fails its check
    instead of running into the next one."""
    if _size(index) == 0:
        return
    with open(index, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")


def _view(folder: Path, config: FeatureConfig, dtype: str, files: list[str], keys: list[str | None],
          found: dict[str, Entry], unopenable: dict[int, str]) -> FeatureStore:
    """The requested clips as a FeatureStore over one memory map of data.bin."""
    row_bytes = config.n_features * np.dtype(dtype).itemsize
    entries = [found[key] if key else None for key in keys]
    errors = dict(unopenable)
    errors.update({i: e.reason for i, e in enumerate(entries) if e is not None and e.reason})
    offsets = np.array([e.offset // row_bytes if e else 0 for e in entries], np.int64)
    frames = np.array([e.frames if e else 0 for e in entries], np.int64)
    rows = max((e.end // row_bytes for e in entries if e), default=0)
    shape = (rows, config.n_features)
    data = np.memmap(folder / DATA, dtype, "r", shape=shape) if rows else np.zeros(shape, dtype)
    return FeatureStore(folder, config, files, offsets, frames, dict(sorted(errors.items())), data)


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


def compute_all(files: list[str], todo: list[int], config: FeatureConfig, dtype: str, workers: int | None,
                variants: Sequence[Variant | None] | None = None) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """(position, features or None, error) for each clip in `todo`, in order."""
    jobs = [(i, files[i], config, dtype, variants[i] if variants else None) for i in todo]
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 8))
    if workers <= 1:
        with one_torch_thread():  # one clip's STFT gains nothing from more, and suffers on a busy machine
            yield from map(_compute_one, jobs)
        return
    ctx = multiprocessing.get_context("fork")  # starts in milliseconds; workers run torch on one thread
    with ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.imap(_compute_one, jobs, chunksize=4)


def _compute_one(job: tuple[int, str, FeatureConfig, str, Variant | None]) -> tuple[int, np.ndarray | None, str]:
    i, path, config, dtype, variant = job
    specs, error = clip_features(path, [config], dtype, variant)
    return i, None if specs is None else specs[0], error


def clip_features(path: str, configs: Sequence[FeatureConfig], dtype: str = "float32",
                  variant: Variant | None = None) -> tuple[list[np.ndarray] | None, str]:
    """A clip's features under each config, decoding it once per sample rate and
    trim (and remaking it as `variant`, if given); or None and the reason the
    clip is unreadable."""
    waves: dict[tuple[int, float | None], np.ndarray] = {}
    try:
        for c in configs:
            if (c.sample_rate, c.trim_db) not in waves:
                waves[c.sample_rate, c.trim_db] = audio.load(path, c.sample_rate, c.trim_db)
    except audio.AudioError as e:
        return None, " ".join(e.reason.split())
    if variant is not None:
        try:
            waves = {(rate, trim): variant.apply(wave, rate) for (rate, trim), wave in waves.items()}
        except Exception as e:  # whatever fails remaking one clip skips that copy, never the job
            return None, f"its copy {variant.key()} cannot be made ({' '.join(str(e).split())})"
    return [features.compute(waves[c.sample_rate, c.trim_db], c).astype(dtype) for c in configs], ""
