"""Scorers turn clips' features into scores and embeddings. A run (its fold
networks, with test-time augmentation), a stack (a second-level network over
its runs' scores) and an ensemble of either are peers behind one protocol:

    scorer.score(clips) -> (scores [clips, classes], embeddings [clips, dims])

where each clip is a {FeatureConfig: features [n_features, frames]} mapping.
Scores are combined over views, then over folds, then over the members of an
ensemble, by arithmetic or geometric mean; an ensemble's embedding joins its
members' unit-length embeddings. An ensemble folder (`ensemble.json`: its
members, weights and mean) loads like a run, e.g. a pipeline's stages.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from .errors import ConfigError
from .features import FeatureConfig
from .registry import Registry
from .loader import eval_batches
from .models import folded
from .run import Run, RunError, found_path, stored_path
from .store import one_torch_thread
from .tta import MEANS, TTA

Clip = dict[FeatureConfig, np.ndarray]
Network = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # x [B, 1, F, T] → (logits, embedding)
T = TypeVar("T")
R = TypeVar("R")


class Scorer(Protocol):
    classes: list[str]
    multilabel: bool

    @property
    def feature_configs(self) -> list[FeatureConfig]: ...

    def score(self, clips: Sequence[Clip], progress: bool = False,
              exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Scores and embeddings of clips. Clips of about the same length share a
        batch, the shorter ones padded; `exact`: only clips of equal length do, so
        that a clip's scores never depend on the others."""
        ...

    def thresholds(self) -> np.ndarray: ...


def combine(scores: np.ndarray, mean: str = "arithmetic", weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted arithmetic or geometric mean over the first axis."""
    if mean not in MEANS:
        raise ConfigError(f"unknown mean {mean!r}; valid: {', '.join(MEANS)}")
    w = np.ones(len(scores)) if weights is None else check_weights(weights)
    w = (w / w.sum()).reshape(-1, *([1] * (scores.ndim - 1)))
    if mean == "geometric":
        return np.exp((w * np.log(np.clip(scores, 1e-7, 1.0))).sum(0)).astype(np.float32)
    return (w * scores).sum(0).astype(np.float32)


def check_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"run weights must be finite and ≥ 0 with a positive total, not {list(weights)}")
    return w


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


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


# --- networks: one per fold, on a backend --------------------------------------------------
def torch_network(model: torch.nn.Module, device: torch.device | None = None) -> Network:
    """A torch model as a network, its inputs moved to `device` (the CPU by default)."""
    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, embedding = model(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device or "cpu"))
            return logits.float().cpu().numpy(), embedding.float().cpu().numpy()
    return run


def onnx_network(path: Path) -> Network:
    """An ONNX Runtime session on one thread: scorers run batches side by side
    instead, which uses small batches better than intra-op threads. Memory
    patterns are off: ONNX Runtime plans one per input shape, and batches of
    clips rarely repeat a shape (6-11% faster on the dev corpus's batches)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_mem_pattern = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = session.run(["logits", "embedding"], {"logmel": np.ascontiguousarray(x, np.float32)})
        return logits, embedding
    return run


BACKENDS: Registry[Callable[[Run], list[Network]]] = Registry("backend")


@BACKENDS.register("torch")
def torch_networks(run: Run) -> list[Network]:
    return [torch_network(folded(m)) for m in run.load_models()]


@BACKENDS.register("onnx")
def onnx_networks(run: Run) -> list[Network]:
    paths = run.onnx_paths()
    if not paths:
        raise RunError(f"{run.folder}: no ONNX export; run `soundtag export {run.folder} --format onnx` first")
    return [onnx_network(p) for p in paths]


@BACKENDS.register("onnx-int8")
def onnx_int8_networks(run: Run) -> list[Network]:
    paths = run.onnx_int8_paths()
    if not paths:
        raise RunError(f"{run.folder}: no int8 ONNX export; run `soundtag export {run.folder} --format onnx --int8` "
                       "first")
    return [onnx_network(p) for p in paths]


def networks(run: Run, backend: str) -> list[Network]:
    return BACKENDS.get(backend)(run)


# --- scorers ---------------------------------------------------------------------------------
class RunScorer:
    """One run: every fold network scores every view of a clip."""

    def __init__(self, run: Run, nets: list[Network], tta: TTA | None = None, mean: str = "arithmetic",
                 threads: int = 0):
        if mean not in MEANS:
            raise ConfigError(f"unknown mean {mean!r}; valid: {', '.join(MEANS)}")
        self.run, self.networks, self.mean = run, nets, mean
        self.tta = tta if tta is not None else run.config.tta  # the run's own by default
        self.threads = threads or len(os.sched_getaffinity(0))
        self.classes, self.multilabel, self.task = run.classes, run.multilabel, run.task
        self.features = run.config.features

    @property
    def name(self) -> str:
        return str(self.run.folder)

    @property
    def feature_configs(self) -> list[FeatureConfig]:
        return [self.features]

    def thresholds(self) -> np.ndarray:
        return self.run.thresholds()

    def _over_networks(self, views: list[np.ndarray], view_mean: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Scores and embeddings of a clip's views (or of a batch of clips, one view each)."""
        scores, embeddings = [], []
        for net in self.networks:
            pairs = [net(v) for v in views]
            s = np.concatenate([self.task.activate(logits) for logits, _ in pairs])
            e = np.concatenate([emb for _, emb in pairs])
            scores.append(combine(s, view_mean) if view_mean else s)
            embeddings.append(e.mean(0, keepdims=True) if view_mean else e)
        return combine(np.stack(scores), self.mean), np.mean(embeddings, axis=0)

    def score(self, clips: Sequence[Clip], progress: bool = False,
              exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        specs = [c[self.features] for c in clips]
        fps = self.features.sample_rate / self.features.hop_length

        def score_batch(batch: tuple[np.ndarray, torch.Tensor]):
            return batch[0], *self._over_networks([batch[1].numpy()], None)

        def score_views(clip: tuple[int, np.ndarray]):
            return clip[0], *self._over_networks(self.tta.views(clip[1], fps), self.tta.mean)

        if self.tta.mode == "full":
            lengths = np.array([s.shape[1] for s in specs])
            batches = eval_batches(specs.__getitem__, lengths, 32, slack=1.0 if exact else 1.1,
                                   max_frames=self.features.max_frames)
            scored = ordered_map(score_batch, batches, self.threads)
        else:
            scored = ordered_map(score_views, enumerate(specs), self.threads)
        scores = np.zeros((len(specs), len(self.classes)), np.float32)
        embeddings: np.ndarray | None = None
        with one_torch_thread(), tqdm(total=len(specs), unit="clip", desc="tagging", disable=not progress) as bar:
            for idx, s, e in scored:
                if embeddings is None:
                    embeddings = np.zeros((len(specs), e.shape[1]), np.float32)
                scores[idx], embeddings[idx] = s, e
                bar.update(np.size(idx))
        return scores, embeddings if embeddings is not None else np.zeros((0, 0), np.float32)


def set_threads(scorer: Scorer, threads: int) -> None:
    """Score batches on `threads` threads in every run that `scorer` holds."""
    for member in getattr(scorer, "members", ()):
        set_threads(member, threads)
    if isinstance(scorer, RunScorer):
        scorer.threads = threads


class Ensemble:
    """Several scorers over the same classes, their scores combined by a weighted mean."""

    def __init__(self, members: Sequence[Scorer], weights: Sequence[float] | None = None,
                 mean: str = "arithmetic"):
        if not members:
            raise ConfigError("an ensemble needs at least one run")
        first = members[0]
        for m in members[1:]:
            if m.classes != first.classes:
                raise RunError(f"{_name(m)}: its classes differ from those of {_name(first)}; "
                               "only runs over the same class list can be ensembled")
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(weights) != len(members):
            raise ConfigError(f"{len(weights)} weights given for {len(members)} runs")
        if mean not in MEANS:
            raise ConfigError(f"unknown mean {mean!r}; valid: {', '.join(MEANS)}")
        self.members, self.weights, self.mean = list(members), check_weights(weights), mean
        self.classes, self.multilabel = first.classes, first.multilabel

    @property
    def feature_configs(self) -> list[FeatureConfig]:
        return list(dict.fromkeys(c for m in self.members for c in m.feature_configs))

    def thresholds(self) -> np.ndarray:
        """The members' thresholds tuned out of fold, averaged."""
        return np.mean([m.thresholds() for m in self.members], axis=0)

    def score(self, clips: Sequence[Clip], progress: bool = False,
              exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        results = [m.score(clips, progress, exact) for m in self.members]
        scores = combine(np.stack([s for s, _ in results]), self.mean, self.weights)
        return scores, np.concatenate([unit(e) for _, e in results], axis=1)


def _name(scorer: Scorer) -> str:
    return getattr(scorer, "name", type(scorer).__name__)


ENSEMBLE = "ensemble.json"  # an ensemble folder's members (kept absolute and relative), weights and mean


def is_ensemble(folder: str | Path) -> bool:
    return (Path(folder) / ENSEMBLE).is_file()


def write_ensemble(folder: str | Path, members: Sequence[str | Path], weights: Sequence[float] | None = None,
                   mean: str = "arithmetic") -> Path:
    """Make `folder` an ensemble of run, stack or ensemble folders that every
    command taking a RUN scores with (e.g. a pipeline's stages)."""
    folder = Path(folder)
    weights = list(weights) if weights is not None else [1.0] * len(members)
    check_weights(weights)
    if mean not in MEANS or len(weights) != len(members):
        raise ConfigError(f"an ensemble of {len(members)} needs as many weights (not {len(weights)}) "
                          f"and a mean among {', '.join(MEANS)} (not {mean!r})")
    info = {"members": [stored_path(m, folder) for m in members], "weights": weights, "mean": mean}
    (folder / ENSEMBLE).write_text(json.dumps(info, indent=1))
    return folder / ENSEMBLE


def read_ensemble(folder: str | Path) -> tuple[list[Path], list[float], str]:
    """An ensemble folder's members (found even when moved together with it), weights and mean."""
    path = Path(folder) / ENSEMBLE
    try:
        info = json.loads(path.read_text())
        return [found_path(m, Path(folder)) for m in info["members"]], list(info["weights"]), info["mean"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path}: damaged ensemble file ({e})") from None


def load_ensemble(folder: str | Path, backend: str = "torch", tta: TTA | None = None, mean: str = "arithmetic",
                  threads: int = 0) -> Ensemble:
    """An ensemble folder's members, combined by its weights and mean (`mean` combines each member's folds)."""
    members, weights, combined = read_ensemble(folder)
    return Ensemble([load_scorer(m, backend, tta, mean, threads) for m in members], weights, combined)


def load_scorer(folder: str | Path, backend: str = "torch", tta: TTA | None = None, mean: str = "arithmetic",
                threads: int = 0) -> Scorer:
    """A run, stack or ensemble folder as a scorer."""
    from .stack import StackScorer, is_stack
    if is_stack(folder):
        return StackScorer(folder, backend, tta, mean, threads)
    if is_ensemble(folder):
        return load_ensemble(folder, backend, tta, mean, threads)
    run = Run.open(folder)
    return RunScorer(run, networks(run, backend), tta, mean, threads)


def load(folders: Sequence[str | Path], weights: Sequence[float] | None = None, backend: str = "torch",
         tta: TTA | None = None, mean: str = "arithmetic", threads: int = 0) -> Scorer:
    """One folder's scorer, or an ensemble of several (optionally weighted)."""
    if not folders:
        raise ConfigError("need at least one run")
    scorers = [load_scorer(f, backend, tta, mean, threads) for f in folders]
    if len(scorers) == 1 and weights is None:
        return scorers[0]
    return Ensemble(scorers, weights, mean)
