"""Scoring clips with trained runs: test-time augmentation, fold and run
ensembles, on torch or ONNX Runtime.

A `Tagger` holds one or more runs. Each clip's features are computed once per
feature config, every network scores every view of the clip (the whole clip,
crops of several lengths and offsets, or sliding tiles), and the scores are
combined per clip over views, then over folds, then over runs, by arithmetic
or geometric mean.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from .datasets import Dataset
from .errors import ConfigError
from .features import FeatureConfig
from .loader import ClipSet, eval_batches
from .run import Run, RunError
from .store import clip_features, extract, one_torch_thread

MODES = ("full", "crops", "tiles")
CHUNK = 128  # clips scored together while tagging files
MEANS = ("arithmetic", "geometric")
Network = Callable[[np.ndarray], np.ndarray]
T = TypeVar("T")
R = TypeVar("R")


def activate(logits: np.ndarray, multilabel: bool) -> np.ndarray:
    """Scores from logits: sigmoid for multi-label sets, softmax otherwise."""
    t = torch.from_numpy(np.ascontiguousarray(logits, np.float32))
    return (torch.sigmoid(t) if multilabel else torch.softmax(t, dim=1)).numpy()


def combine(scores: np.ndarray, mean: str = "arithmetic", weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted arithmetic or geometric mean over the first axis."""
    if mean not in MEANS:
        raise ConfigError(f"unknown mean {mean!r}; valid: {', '.join(MEANS)}")
    w = np.ones(len(scores)) if weights is None else _check_weights(weights)
    w = (w / w.sum()).reshape(-1, *([1] * (scores.ndim - 1)))
    if mean == "geometric":
        return np.exp((w * np.log(np.clip(scores, 1e-7, 1.0))).sum(0)).astype(np.float32)
    return (w * scores).sum(0).astype(np.float32)


def _check_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"run weights must be finite and ≥ 0 with a positive total, not {list(weights)}")
    return w


@torch.inference_mode()
def clip_logits(model: torch.nn.Module, clips: ClipSet, batch_size: int = 32, bf16: bool = False,
                device: torch.device = torch.device("cpu"),
                memory: torch.memory_format = torch.contiguous_format) -> np.ndarray:
    """Logits [clips, classes] of whole clips with a torch network, in the order of `clips`."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    out = np.zeros((len(clips), model.head.out_features), np.float32)
    for idx, x in eval_batches(clips.spec, clips.lengths, batch_size):
        with autocast:
            logits, _ = model(x.to(device).contiguous(memory_format=memory))
        out[idx] = logits.float().cpu().numpy()
    model.train(was_training)
    return out


@dataclass(frozen=True)
class TTA:
    """Which views of a clip are scored. `lengths`, `tile` and `hop` are in seconds."""

    mode: str = "full"
    lengths: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
    offsets: int = 5
    tile: float = 2.0
    hop: float = 1.0
    mean: str = "arithmetic"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown TTA mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.mean not in MEANS:
            raise ConfigError(f"unknown mean {self.mean!r}; valid: {', '.join(MEANS)}")
        if self.offsets < 1 or self.tile <= 0 or self.hop <= 0 or not self.lengths or min(self.lengths) <= 0:
            raise ConfigError("TTA needs offsets ≥ 1, a positive tile and hop, and positive crop lengths")

    def views(self, spec: np.ndarray, fps: float) -> list[np.ndarray]:
        """Batches [n, 1, F, T] of the views of one clip, one batch per view length."""
        frames = spec.shape[1]
        if self.mode == "full":
            return [spec[None, None].astype(np.float32)]
        if self.mode == "tiles":
            size = max(8, round(self.tile * fps))
            starts = tile_starts(frames, size, max(1, round(self.hop * fps)))
            return [np.stack([_window(spec, s, size) for s in starts])[:, None]]
        out = []
        for seconds in self.lengths:
            size = max(8, round(seconds * fps))
            starts = np.linspace(0, max(0, frames - size), self.offsets).round().astype(int)
            out.append(np.stack([_window(spec, s, size) for s in np.unique(starts)])[:, None])
        return out


def tile_starts(frames: int, size: int, hop: int) -> list[int]:
    """Tile starts covering the clip, the last tile flush with its end."""
    if frames <= size:
        return [0]
    starts = list(range(0, frames - size + 1, hop))
    return starts if starts[-1] == frames - size else starts + [frames - size]


def _window(spec: np.ndarray, start: int, size: int) -> np.ndarray:
    """`size` frames from `start`, wrapping a clip shorter than that."""
    idx = (start + np.arange(size)) % spec.shape[1]
    return spec[:, idx].astype(np.float32)


def torch_network(model: torch.nn.Module) -> Network:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))[0].numpy()
    return run


def onnx_network(path: Path) -> Network:
    """An ONNX Runtime session on one thread: the tagger runs batches side by
    side instead, which uses small batches better than intra-op threads."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"logmel": np.ascontiguousarray(x, np.float32)})[0]
    return run


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, ahead: int = 0) -> Iterator[R]:
    """`map(fn, items)` on `threads` threads, in order, with at most `ahead`
    items (default: two a thread) in flight; work not started yet is dropped
    when the consumer stops early or fails."""
    if threads <= 1 and not ahead:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max(1, threads)) as pool:
        running: deque[Future[R]] = deque()
        try:
            for item in items:
                running.append(pool.submit(fn, item))
                if len(running) >= (ahead or 2 * threads):
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()
        finally:
            for future in running:
                future.cancel()


@dataclass
class Member:
    """One run of an ensemble: the run and its networks (one per fold)."""

    run: Run
    networks: list[Network]
    weight: float = 1.0

    @property
    def name(self) -> str:
        return str(self.run.folder)

    @property
    def features(self) -> FeatureConfig:
        return self.run.config.features

    @property
    def classes(self) -> list[str]:
        return self.run.classes

    @property
    def multilabel(self) -> bool:
        return self.run.multilabel


def load_member(folder: str | Path, backend: str = "torch", weight: float = 1.0) -> Member:
    """A run folder as an ensemble member, on torch or on its exported ONNX files."""
    run = Run.open(folder)
    if backend == "onnx":
        files = sorted(Path(folder).glob("onnx/fold*.onnx"))
        if not files:
            raise RunError(f"{folder}: no ONNX export; run `soundtag export {folder} --format onnx` first")
        networks = [onnx_network(f) for f in files]
    elif backend == "torch":
        networks = [torch_network(m) for m in run.load_models()]
    else:
        raise ConfigError(f"unknown backend {backend!r}; valid: torch, onnx")
    return Member(run, networks, weight)


class Tagger:
    """Scores audio with an ensemble of runs; the Python face of `soundtag predict`."""

    def __init__(self, members: Sequence[Member], tta: TTA = TTA(), mean: str = "arithmetic",
                 stacker: Callable[[list[np.ndarray]], np.ndarray] | None = None, threads: int = 0):
        if not members:
            raise ConfigError("a tagger needs at least one run")
        first = members[0]
        for m in members[1:]:
            if m.classes != first.classes:
                raise RunError(f"{m.name}: its classes differ from those of {first.name}; "
                               "only runs over the same class list can be ensembled")
        if mean not in MEANS:
            raise ConfigError(f"unknown mean {mean!r}; valid: {', '.join(MEANS)}")
        self.members, self.tta, self.mean, self.stacker = list(members), tta, mean, stacker
        self.threads = threads or len(os.sched_getaffinity(0))  # batches (and clips' features) computed at once
        self.classes, self.multilabel = first.classes, first.multilabel

    @classmethod
    def load(cls, runs: Sequence[str | Path], weights: Sequence[float] | None = None, backend: str = "torch",
             tta: TTA = TTA(), mean: str = "arithmetic", threads: int = 0) -> Tagger:
        """Runs (folders) as an ensemble; a single stack folder brings its runs and stacker."""
        if len(runs) == 1 and (Path(runs[0]) / "stack.json").is_file():
            from .stack import Stacker
            stacker = Stacker(runs[0])
            return cls([load_member(r, backend) for r in stacker.runs], tta, mean, stacker, threads)
        weights = list(weights) if weights else [1.0] * len(runs)
        if len(weights) != len(runs):
            raise ConfigError(f"{len(weights)} weights given for {len(runs)} runs")
        _check_weights(weights)
        return cls([load_member(r, backend, w) for r, w in zip(runs, weights)], tta, mean, None, threads)

    def thresholds(self) -> np.ndarray:
        """Per-class thresholds: the mean of the runs' thresholds tuned out of fold."""
        return np.mean([m.run.thresholds() for m in self.members], axis=0)

    @property
    def feature_configs(self) -> list[FeatureConfig]:
        return list(dict.fromkeys(m.features for m in self.members))

    def score_clips(self, clips: Sequence[dict[FeatureConfig, np.ndarray]], progress: bool = False) -> np.ndarray:
        """Scores [clips, classes] from each clip's features under each config."""
        with one_torch_thread():
            per_run = [self._member_scores(m, [c[m.features] for c in clips], progress) for m in self.members]
        if self.stacker is not None:
            return self.stacker(per_run)
        return combine(np.stack(per_run), self.mean, np.array([m.weight for m in self.members]))

    def _member_scores(self, m: Member, specs: list[np.ndarray], progress: bool) -> np.ndarray:
        """Each clip's views are built once and scored by every network (fold) of the run."""
        fps = m.features.sample_rate / m.features.hop_length

        def over_networks(scores_of: Callable[[Network], np.ndarray]) -> np.ndarray:
            return combine(np.stack([scores_of(net) for net in m.networks]), self.mean)

        def score_batch(batch: tuple[np.ndarray, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
            idx, x = batch[0], batch[1].numpy()
            return idx, over_networks(lambda net: activate(net(x), m.multilabel))

        def score_views(clip: tuple[int, np.ndarray]) -> tuple[int, np.ndarray]:
            views = self.tta.views(clip[1], fps)
            return clip[0], over_networks(lambda net: combine(
                np.concatenate([activate(net(v), m.multilabel) for v in views]), self.tta.mean))

        if self.tta.mode == "full":
            lengths = np.array([s.shape[1] for s in specs])
            scored = ordered_map(score_batch, eval_batches(specs.__getitem__, lengths, 32), self.threads)
        else:
            scored = ordered_map(score_views, enumerate(specs), self.threads)
        out = np.zeros((len(specs), len(m.classes)), np.float32)
        with tqdm(total=len(specs), unit="clip", desc="tagging", disable=not progress) as bar:
            for idx, scores in scored:
                out[idx] = scores
                bar.update(np.size(idx))
        return out

    def tag_files(self, files: Sequence[str | Path], workers: int | None = None,
                  progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
        """Scores [files, classes] (NaN rows for unreadable files) and {position: reason}.

        `workers` threads (default: the tagger's) decode files and compute their
        features up to `CHUNK` clips ahead of the networks, which score the
        clips already computed, `CHUNK` at a time."""
        files = [str(f) for f in files]
        configs = self.feature_configs
        scores = np.full((len(files), len(self.classes)), np.nan, np.float32)
        errors: dict[int, str] = {}
        pending: list[tuple[int, dict[FeatureConfig, np.ndarray]]] = []
        bar = tqdm(total=len(files), unit="file", desc="tagging", disable=not progress, dynamic_ncols=True)

        def score_pending() -> None:
            if pending:
                scores[[i for i, _ in pending]] = self.score_clips([clip for _, clip in pending])
                bar.update(len(pending))
                pending.clear()

        with bar, one_torch_thread():
            computed = ordered_map(lambda f: clip_features(f, configs), files, workers or self.threads, CHUNK)
            for i, (specs, error) in enumerate(computed):
                if specs is None:
                    errors[i] = error
                    bar.update()
                    continue
                pending.append((i, dict(zip(configs, specs))))
                if len(pending) == CHUNK:
                    score_pending()
            score_pending()
        return scores, errors

    def tag_dataset(self, dataset: Dataset, cache_dir: str | Path | None = None,
                    progress: bool = True) -> tuple[np.ndarray, dict[int, str]]:
        """Like `tag_files`, with the features taken from (and kept in) the cache."""
        stores = {c: extract(dataset.files, c, cache_dir, progress=progress) for c in self.feature_configs}
        errors = {i: reason for s in stores.values() for i, reason in s.errors.items()}
        ok = [i for i in range(len(dataset)) if i not in errors]
        scores = np.full((len(dataset), len(self.classes)), np.nan, np.float32)
        if ok:
            scores[ok] = self.score_clips([{c: s[i] for c, s in stores.items()} for i in ok], progress)
        return scores, errors
