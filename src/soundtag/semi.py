"""Semi-supervised recipes over a dataset's trusted clips and the others, run
as stages of a recipe folder (`pipeline.py`: settings, folds drawn once,
resuming, report, `ensemble.json`).

Pseudo-labels with a scheduled threshold (NTU, FSDKaggle2018): `iter0` trains
on the trusted clips, the pool (unverified, noisy or test clips) left out.
Iteration i then adds, for each fold k, the pool clips whose top score from
fold k of iteration i-1 is at least the lower threshold of iteration i (moving
linearly from `start` to `end`) and, if `upper` is set, at most `upper`; they
join with origin pseudo and the labels fold k predicts (single-label: the top
class; multi-label: every class at or above the threshold), train in fold k
only, and every iteration trains from scratch. A pool clip is only scored by a
fold that did not train on it: once fold k trains on a clip, fold k never
scores it again and it keeps the label it was added with.

Label spreading (NTU, single-label sets): `base` trains on the verified
clips; for each fold k, fold k's embeddings of its training clips (labelled)
and of the unverified clips (unlabelled) go through scikit-learn's
`LabelSpreading`; an unverified clip whose spread label agrees with its given
label trains in fold k (origin selected, never held out), the others are
dropped or kept as noisy clips with a lower loss weight; `final` trains on
the result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps

from . import plots
from .clips import ClipTable
from .config import TrainConfig, check_choice
from .datasets import Dataset
from .errors import ConfigError, DataError
from .pipeline import (Stages, cached_frame, fold_scorer, open_recipe, origin_counts, recipe_clips, score_files,
                       stage_config, write_report)
from .run import Run
from .scorer import unit, write_ensemble

POOLS = ("unverified", "noisy", "test")
KERNELS = ("knn", "rbf")
DISAGREE = ("drop", "weight")
SPREAD = "spread.csv"


# --- pseudo-labels ---------------------------------------------------------------------------------------
@dataclass
class PseudoConfig:
    """Pseudo-labelling settings: the pool, the lower threshold's schedule, an optional upper threshold."""

    pool: str = "unverified"
    start: float = 0.9
    end: float = 0.7
    iterations: int = 3
    upper: float | None = None

    def validate(self, base: TrainConfig) -> None:
        check_choice("pool", self.pool, POOLS)
        if not (0 <= self.start <= 1 and 0 <= self.end <= 1):
            raise ConfigError(f"start and end are scores, between 0 and 1, not {self.start} and {self.end}")
        if not 1 <= self.iterations <= 100:
            raise ConfigError(f"iterations must be from 1 to 100, not {self.iterations}")
        if self.upper is not None and not max(self.start, self.end) < self.upper <= 1:
            raise ConfigError(f"upper must be above start and end and at most 1, not {self.upper}")
        if base.noisy == "only":
            raise ConfigError("noisy: only leaves no trusted clips to pseudo-label from; use include or exclude")
        stage_config(base, {}, "pseudo")

    def thresholds(self) -> np.ndarray:
        return threshold_schedule(self.start, self.end, self.iterations)


def threshold_schedule(start: float, end: float, iterations: int) -> np.ndarray:
    """The lower threshold of iterations 1..`iterations`: from `start` to `end` in even steps."""
    return np.linspace(start, end, iterations)


def pseudo_labels(scores: np.ndarray, lower: float, upper: float | None,
                  multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the clips whose top score is at least `lower` (and at most
    `upper`), and their labels: the top class, or every class at or above
    `lower` for a multi-label set. NaN rows (unreadable clips) are never picked."""
    finite = np.isfinite(scores).all(1)
    top = np.where(finite, np.nan_to_num(scores).max(1), -np.inf)
    picked = (top >= lower) & (top <= (np.inf if upper is None else upper))
    if multilabel:
        targets = (np.nan_to_num(scores) >= lower).astype(np.float32)
    else:
        targets = np.eye(scores.shape[1], dtype=np.float32)[np.nan_to_num(scores).argmax(1)]
    return picked, targets * picked[:, None]


def split_pool(data: Dataset, pool: str) -> tuple[ClipTable, ClipTable]:
    """The trusted training clips and the pool (the test split, or the training clips of that origin)."""
    clips = ClipTable.from_dataset(data.subset("train"))
    if pool == "test":
        trusted, pooled = clips, ClipTable.from_dataset(data.subset("test"))
    else:
        trusted, pooled = clips.select(clips.origin != pool), clips.select(clips.origin == pool)
    if not len(pooled) or not len(trusted):
        raise DataError(f"{data.root}: {len(pooled)} {pool} clip(s) to pseudo-label and {len(trusted)} "
                        "other training clip(s); pseudo-labels need both")
    return trusted, pooled


def pseudo_clips(previous: Run, pool: ClipTable, lower: float, upper: float | None,
                 cache_dir: str | Path | None, progress: bool) -> ClipTable:
    """The pseudo clips of `previous` and, for each of its folds, the pool
    clips that fold did not train on and now scores within the thresholds;
    a row per clip and label set, training in the folds that chose it."""
    table = previous.read_clips()
    chosen: dict[tuple[str, str, bytes], set[int]] = {}
    labels: dict[bytes, np.ndarray] = {}

    def add(file: str, name: str, target: np.ndarray, folds) -> None:
        key = target.astype(np.float32).tobytes()
        labels[key] = target
        chosen.setdefault((file, name, key), set()).update(folds)

    for i in np.flatnonzero(table.origin == "pseudo"):
        add(table.files[i], table.names[i], table.targets[i], table.train_folds[i])
    for k in previous.trained_folds():
        trained = {table.files[i] for i in np.flatnonzero(table.training(k))}
        todo = [i for i, f in enumerate(pool.files) if f not in trained]
        scores, _ = score_files(fold_scorer(previous, k), [pool.files[i] for i in todo], cache_dir, progress)
        picked, targets = pseudo_labels(scores, lower, upper, previous.multilabel)
        for j in np.flatnonzero(picked):
            add(pool.files[todo[j]], pool.names[todo[j]], targets[j], [k])
    keys = list(chosen)
    n = len(keys)
    return ClipTable(table.classes, table.multilabel, [f for f, _, _ in keys], [name for _, name, _ in keys],
                     np.array([labels[t] for _, _, t in keys], np.float32).reshape(n, len(table.classes)),
                     np.full(n, -1, np.int64), np.ones(n, np.float32), np.full(n, "pseudo", "<U10"),
                     [tuple(sorted(chosen[key])) for key in keys])


def run_pseudo(data: Dataset, settings: PseudoConfig, base: TrainConfig, out: str | Path, *,
               force: bool = False, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Train iter0 and one run an iteration into `out` (or resume them there);
    returns the folder, whose ensemble is the last iteration."""
    settings.validate(base)
    trusted, pool = split_pool(data, settings.pool)
    folder = open_recipe(out, "pseudo", settings, base, data, force)
    table = recipe_clips(folder, trusted, base, trusted.held_out_candidates)
    config = stage_config(base, {}, "pseudo")
    stages = Stages(folder, cache_dir, progress)
    runs = {"iter0": stages.run("iter0", lambda: table, config)}
    about = {"iter0": f"trusted clips ({settings.pool} clips left out)"}
    for i, lower in enumerate(settings.thresholds(), start=1):
        previous = runs[f"iter{i - 1}"]
        made = partial(pseudo_clips, previous, pool, float(lower), settings.upper, cache_dir, progress)
        runs[f"iter{i}"] = stages.run(f"iter{i}", lambda made=made: table.join(made()), config)
        about[f"iter{i}"] = f"trusted + pseudo clips, threshold {lower:.3g}"
    last = runs[f"iter{settings.iterations}"]
    write_ensemble(folder, [last.folder])
    totals = [origin_counts(run, "pseudo") for run in runs.values()]
    added = {f"iter{i}": totals[i] - totals[i - 1] for i in range(1, len(totals))}
    write_report(folder, "Pseudo-labels", runs, about, added, "pool clips added per class",
                 f"Ensemble: iter{settings.iterations} (`ensemble.json`).")
    return folder


# --- label spreading ---------------------------------------------------------------------------------------
@dataclass
class SpreadConfig:
    """Label spreading settings (scikit-learn's LabelSpreading on unit-length embeddings)."""

    kernel: str = "knn"
    gamma: float = 20.0  # rbf: exp(-gamma · squared distance)
    n_neighbors: int = 7  # knn
    alpha: float = 0.2  # how much a clip's label may move toward its neighbours' (0 < alpha < 1)
    max_iter: int = 30
    disagree: str = "drop"  # what becomes of an unverified clip whose spread label differs: drop or weight
    disagree_weight: float = 0.3  # its loss weight with disagree: weight

    def validate(self, base: TrainConfig) -> None:
        check_choice("kernel", self.kernel, KERNELS)
        check_choice("disagree", self.disagree, DISAGREE)
        if not (self.gamma > 0 and self.n_neighbors >= 1 and self.max_iter >= 1):
            raise ConfigError(f"gamma must be above 0, n_neighbors and max_iter at least 1; not {self.gamma}, "
                              f"{self.n_neighbors} and {self.max_iter}")
        if not (0 < self.alpha < 1 and 0 < self.disagree_weight <= 1):
            raise ConfigError(f"alpha must be between 0 and 1 and disagree_weight above 0 and at most 1, not "
                              f"{self.alpha} and {self.disagree_weight}")
        self.final_config(base)

    def final_config(self, base: TrainConfig) -> TrainConfig:
        """The final stage's config: the doubted clips (noisy) weighted `disagree_weight`."""
        weights = {o: f for o, f in base.origin_weights.items() if o != "noisy"}
        return stage_config(base, {}, "spread", noisy="include", noisy_weight=self.disagree_weight,
                            origin_weights=weights)


def spread_labels(embeddings: np.ndarray, labels: np.ndarray, settings: SpreadConfig) -> np.ndarray:
    """Every clip's label after spreading the given ones (labels ≥ 0; -1:
    unlabelled) over unit-length embeddings."""
    from sklearn.semi_supervised import LabelSpreading
    model = LabelSpreading(kernel=settings.kernel, gamma=settings.gamma, n_neighbors=settings.n_neighbors,
                           alpha=settings.alpha, max_iter=settings.max_iter)
    try:
        model.fit(unit(embeddings), labels)
    except ValueError as e:  # e.g. fewer clips than n_neighbors
        raise DataError(f"label spreading over {len(labels)} clips: {' '.join(str(e).split())}") from None
    return model.transduction_


def spread_fold(base: Run, k: int, table: ClipTable, settings: SpreadConfig, cache_dir: str | Path | None,
                progress: bool) -> pd.DataFrame:
    """Fold k's spreading over fold k's embeddings: its training clips
    labelled, the unverified ones not (see `spread_frame`)."""
    labelled = (table.origin == "curated") & table.training(k)
    rows = np.flatnonzero(labelled | (table.origin == "unverified"))
    _, embeddings = score_files(fold_scorer(base, k), [table.files[i] for i in rows], cache_dir, progress)
    ok = np.isfinite(embeddings).all(1)
    return spread_frame(table, k, rows[ok], labelled[rows[ok]], embeddings[ok], settings)


def spread_frame(table: ClipTable, k: int, rows: np.ndarray, labelled: np.ndarray, embeddings: np.ndarray,
                 settings: SpreadConfig) -> pd.DataFrame:
    """One row a clip of `table` (its `rows`, their embeddings, whether their
    labels are given to the spreading): its given and spread labels and its
    place on the embeddings' first two principal components."""
    from sklearn.decomposition import PCA
    given = table.targets[rows].argmax(1)
    spread = spread_labels(embeddings, np.where(labelled, given, -1), settings)
    xy = PCA(2, random_state=0).fit_transform(unit(embeddings))
    classes = np.array(table.classes)
    return pd.DataFrame({"fold": k, "row": rows, "fname": [table.names[i] for i in rows],
                         "role": np.where(labelled, "labelled", "unlabelled"), "given": classes[given],
                         "spread": classes[spread], "x": xy[:, 0], "y": xy[:, 1]})


def spread_clips(table: ClipTable, spread: pd.DataFrame, settings: SpreadConfig) -> ClipTable:
    """The verified clips, then the unverified ones that agree in some fold
    (origin selected, training in those folds) and, with `disagree: weight`,
    those that disagree (origin noisy, training in those folds)."""
    unlabelled = spread[spread.role == "unlabelled"]
    parts = [table.select(table.origin == "curated")]
    for agree, origin in ((True, "selected"), (False, "noisy")):
        if not agree and settings.disagree == "drop":
            continue
        part = unlabelled[(unlabelled.given == unlabelled.spread) == agree]
        folds = part.groupby("row")["fold"].apply(lambda f: tuple(sorted(int(k) for k in f)))
        picked = table.select(folds.index.to_numpy(np.int64))
        parts.append(dataclasses.replace(picked, origin=np.full(len(picked), origin, picked.origin.dtype),
                                         train_folds=list(folds)))
    out = parts[0]
    for part in parts[1:]:
        out = out.join(part)
    return out


def run_spread(data: Dataset, settings: SpreadConfig, base: TrainConfig, out: str | Path, *,
               force: bool = False, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Train `base` on the verified clips, spread labels per fold, train
    `final` into `out` (or resume there); returns the folder, whose ensemble is `final`."""
    settings.validate(base)
    if data.multilabel:
        raise DataError(f"{data.root}: label spreading is for single-label sets (FSDKaggle2018 layout)")
    clips = ClipTable.from_dataset(data.subset("train"))
    clips = clips.select(np.isin(clips.origin, ("curated", "unverified")))
    verified = clips.origin == "curated"
    if not verified.any() or verified.all():
        raise DataError(f"{data.root}: label spreading needs verified and unverified training clips; the set "
                        f"has {int(verified.sum())} verified and {int((~verified).sum())} unverified")
    folder = open_recipe(out, "spread", settings, base, data, force)
    table = recipe_clips(folder, clips, base, verified)
    stages = Stages(folder, cache_dir, progress)
    verified_only = stage_config(base, {}, "spread", noisy="include")
    first = stages.run("base", lambda: table.select(table.origin == "curated"), verified_only)
    if stages.trained:
        (folder / SPREAD).unlink(missing_ok=True)

    def spread() -> pd.DataFrame:
        return cached_frame(folder / SPREAD, lambda: pd.concat(
            [spread_fold(first, k, table, settings, cache_dir, progress) for k in first.trained_folds()]))

    final = stages.run("final", lambda: spread_clips(table, spread(), settings), settings.final_config(base))
    write_ensemble(folder, [final.folder])
    given = table.targets[table.origin == "unverified"].sum(0).astype(int)
    usable = {"unverified": pd.DataFrame({"all": given}, index=table.classes),
              "kept": origin_counts(final, "selected")}
    weighted = settings.disagree == "weight"
    if weighted:
        usable["down-weighted"] = origin_counts(final, "noisy")
    about = {"base": "verified clips", "final": "verified + unverified clips whose spread label agrees"
             + (f" (others weighted {settings.disagree_weight:g})" if weighted else "")}
    write_report(folder, "Label spreading", {"base": first, "final": final}, about, usable,
                 "unverified clips usable per class",
                 "Ensemble: final (`ensemble.json`). The first fold's embeddings before and after: spread.png.")
    spread_plot(folder / "spread.png", spread(), first.trained_folds()[0])
    return folder


def spread_plot(path: Path, spread: pd.DataFrame, k: int) -> Path:
    """Fold k's clips on their embeddings' first two principal components:
    coloured by given label (before), and with the disagreeing unverified clips greyed (after)."""
    part = spread[spread.fold == k]
    classes = sorted(set(part.given))
    colour = colormaps["tab20"]
    colours = [colour(classes.index(c) % 20) for c in part.given]
    unlabelled = (part.role == "unlabelled").to_numpy()
    disagree = unlabelled & (part.given != part.spread).to_numpy()
    fig, (before, after) = plots.figure(12, 5.5, 2)
    for ax, grey in ((before, np.zeros(len(part), bool)), (after, disagree)):
        keep = ~grey
        ax.scatter(part.x[keep & ~unlabelled], part.y[keep & ~unlabelled], s=14,
                   c=[c for c, m in zip(colours, keep & ~unlabelled) if m], marker="o", label="verified")
        ax.scatter(part.x[keep & unlabelled], part.y[keep & unlabelled], s=18,
                   c=[c for c, m in zip(colours, keep & unlabelled) if m], marker="^", label="unverified")
        if grey.any():
            ax.scatter(part.x[grey], part.y[grey], s=18, c="lightgrey", marker="x", label="disagrees")
        ax.set(xlabel="PC 1", ylabel="PC 2")
        ax.legend(fontsize=7)
    before.set_title(f"Fold {k}: given labels")
    after.set_title(f"Fold {k}: after spreading ({int(disagree.sum())} of {int(unlabelled.sum())} disagree)")
    return plots.save(fig, path)
