"""Recipes of several runs, a run a stage: the staged warm-up pipeline
(FSDKaggle2019's 12th place) here; pseudo-labels and label spreading, on the
same machinery, in `semi.py`.

A recipe folder holds `recipe.yaml` (the recipe, its settings, the base
training config, the data source), `clips.csv` (the recipe's clips with their
folds, drawn once, so that every stage is validated on the same held-out
clips), one run folder a stage, `report.md` + `report.png`, and
`ensemble.json`, so that `soundtag predict/evaluate/tag/serve FOLDER` score
with what the recipe made. Rerunning a recipe into its folder resumes it: a
finished stage is kept, an interrupted one resumed (`train.resume`), and every
stage after one that trained again is trained afresh. The clips a stage adds
for fold k are chosen by fold k's models alone, so that fold k's held-out clips
never decide what fold k trains on and the out-of-fold figures stay honest.

The warm-up pipeline, for a dataset of curated and noisy clips:

    stage1  the noisy clips; the curated clips only validate (no fold trains on them)
    stage2  the curated clips, from stage1's weights
    stage3  curated + the noisy clips that fold k of stage1 and of stage2 both fit:
            geometric mean of their per-clip lwlrap ≥ threshold, at most
            per_class a class (a clip counts for each of its labels); from stage2
    stage4  curated + the noisy clips both fit perfectly (per-clip lwlrap 1), capped alike; from stage3
    ensemble.json  stages 2–4, weighted
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import yaml

from . import corrections, metrics, plots, train
from .checkpoint import atomic_write
from .clips import ClipTable
from .config import TrainConfig, build_dataclass, check_choice, load_yaml, merge
from .datasets import Dataset
from .errors import ConfigError, DataError
from .models import folded
from .run import Run, RunError
from .scorer import RunScorer, Scorer, check_weights, torch_network, write_ensemble
from .splits import assign_folds
from .store import extract
from .tta import MEANS

S = TypeVar("S")
RECIPE, CLIPS, REPORT = "recipe.yaml", "clips.csv", "report.md"
NO_FOLD = (-1,)  # train_folds of a clip that only validates: no fold trains on it
STAGES = ("stage1", "stage2", "stage3", "stage4")
DECIDED = ("folds", "train_folds", "noisy", "noisy_weight", "corrections")  # set by the pipeline, not per stage
SELECTION = "selection.csv"


@dataclass
class PipelineConfig:
    """The warm-up pipeline's settings; `stages` holds training options per
    stage over the base config (e.g. `stage2: {epochs: 20, optim: {lr: 0.001}}`)."""

    threshold: float = 0.5
    per_class: int = 150  # the seed's 50 held back two thirds of the agreeing clips of the dev multi-label set
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # ensemble weights of stages 2, 3, 4
    mean: str = "arithmetic"
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, base: TrainConfig) -> None:
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"threshold is a per-clip lwlrap, between 0 and 1, not {self.threshold}")
        if self.per_class < 1:
            raise ConfigError(f"per_class must be at least 1, not {self.per_class}")
        if len(self.weights) != 3:
            raise ConfigError(f"weights: one for each of stage2, stage3 and stage4, not {len(self.weights)}")
        check_weights(self.weights)
        check_choice("mean", self.mean, MEANS)
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")
        for name, options in self.stages.items():
            decided = sorted(set(options) & set(DECIDED))
            if decided:
                raise ConfigError(f"stages.{name}: {', '.join(decided)} are set by the pipeline, not per stage")
        for name in STAGES:
            self.stage_config(base, name)

    def stage_config(self, base: TrainConfig, name: str) -> TrainConfig:
        """A stage's training config: the base, its options, the pipeline's folds and noisy clips."""
        forced = {"noisy": "include"} | ({"noisy_weight": 1.0} if name == "stage1" else {})
        return stage_config(base, self.stages.get(name, {}), f"stages.{name}", **forced)


# --- selectors: pure functions on score arrays ---------------------------------------------------
def agreement(lwlraps: np.ndarray) -> np.ndarray:
    """Geometric mean over the stages (axis 0) of per-clip lwlrap [stages, clips]; NaN stays NaN."""
    return np.prod(lwlraps, axis=0) ** (1 / len(lwlraps))


def above(score: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of the clips whose score is at least `threshold` (never a NaN)."""
    return np.nan_to_num(score, nan=-np.inf) >= threshold


def strict(lwlraps: np.ndarray) -> np.ndarray:
    """Mask of the clips that every stage fits perfectly: per-clip lwlrap 1 [stages, clips]."""
    return (lwlraps == 1).all(axis=0)


def cap_per_class(targets: np.ndarray, score: np.ndarray, eligible: np.ndarray, limit: int) -> np.ndarray:
    """The best-scored `eligible` clips, at most `limit` a class: a clip is
    taken, best first (ties in order), while every one of its classes has room."""
    room = np.full(targets.shape[1], limit)
    out = np.zeros(len(targets), bool)
    candidates = np.flatnonzero(eligible)
    for i in candidates[np.argsort(-score[candidates], kind="stable")]:
        classes = targets[i] > 0
        if classes.any() and (room[classes] > 0).all():
            out[i] = True
            room[classes] -= 1
    return out


def select_noisy(lwlraps: np.ndarray, targets: np.ndarray, threshold: float | None, per_class: int) -> np.ndarray:
    """Stage 3's rule (agreement ≥ `threshold`) or, with `threshold` None,
    stage 4's (strict), capped at `per_class` clips a class by agreement."""
    score = agreement(lwlraps)
    eligible = strict(lwlraps) if threshold is None else above(score, threshold)
    return cap_per_class(targets, score, eligible, per_class)


# --- recipes: settings, folder, clips, stages -----------------------------------------------------
def load_settings(kind: type[S], path: str | Path | None) -> S:
    """A recipe's settings from a YAML file (the defaults without one), types checked."""
    return build_dataclass(kind, load_yaml(path) if path else {}, f"{path}: settings" if path else "settings")


def stage_config(base: TrainConfig, options: dict[str, Any], where: str, **forced: Any) -> TrainConfig:
    """A stage's config: `options` over the base, then what the recipe decides
    (its folds; label corrections applied once, to the recipe's clips); validated."""
    data = merge(base.to_dict(), options) | {"folds": "own", "corrections": None} | forced
    try:
        config = TrainConfig.from_dict(data)
        config.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


def open_recipe(out: str | Path, recipe: str, settings: Any, base: TrainConfig, data: Dataset,
                force: bool = False) -> Path:
    """The recipe's folder: created (replaced with `force`), or kept to resume
    when it holds the same recipe with the same settings, config and data."""
    folder = Path(out)
    saved = yaml.safe_load(yaml.safe_dump({"recipe": recipe, "settings": dataclasses.asdict(settings),
                                           "train": base.to_dict(), "data": data.source}, sort_keys=False))
    if folder.exists() and any(folder.iterdir()) and not force:
        if not (folder / RECIPE).is_file():
            raise RunError(f"{folder} already exists and is not a recipe folder; pass --force to replace it")
        old = yaml.safe_load((folder / RECIPE).read_text()) or {}
        old |= {"settings": _with_defaults(old.get("settings"), lambda d: dataclasses.asdict(
                    build_dataclass(type(settings), d, "settings"))),
                "train": _with_defaults(old.get("train"), lambda d: TrainConfig.from_dict(d).to_dict())}
        changed = [key for key in saved if old.get(key) != saved[key]]
        if changed:
            raise RunError(f"{folder} holds a {old.get('recipe')} with other {' and '.join(changed)}; rerun it as "
                           "it was to resume it, or pass --force to start again")
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / RECIPE).write_text(yaml.safe_dump(saved, sort_keys=False))
    return folder


def _with_defaults(section: Any, rebuild: Callable[[Any], dict]) -> Any:
    """A saved section with the options added since it was saved at their defaults
    (as saved), so that a recipe folder resumes across versions; as it is if it no longer loads."""
    try:
        return yaml.safe_load(yaml.safe_dump(rebuild(section), sort_keys=False))
    except (ConfigError, TypeError, yaml.YAMLError):
        return section


def recipe_clips(folder: Path, table: ClipTable, base: TrainConfig, held: np.ndarray) -> ClipTable:
    """The recipe's clips, label corrections applied, with folds drawn once
    among `held` (the clips whose labels validate; the others -1), saved; read
    back when the recipe resumes."""
    path = folder / CLIPS
    if path.is_file():
        return ClipTable.load(path, table.classes, table.multilabel)
    if base.corrections:
        table, _ = corrections.apply(table, base.corrections)
    fold = np.full(len(table), -1, np.int64)
    fold[held] = assign_folds(table.select(held), base.folds, base.seed)
    table = dataclasses.replace(table, fold=fold)
    atomic_write(path, table.save)
    return table


def finished(folder: Path) -> bool:
    """Whether a stage's run wrote its summary, thresholds and curves (its last files)."""
    return all((folder / name).is_file() for name in ("summary.json", "thresholds.json", "curves.png"))


class Stages:
    """A recipe's runs, trained in order into its folder: a finished stage is
    opened, an interrupted one resumed, and once one has trained, every later
    one trains afresh (its clips or initial weights may have changed)."""

    def __init__(self, folder: Path, cache_dir: str | Path | None = None, progress: bool = True):
        self.folder, self.cache_dir, self.progress = folder, cache_dir, progress
        self.trained: list[str] = []  # stages trained (or resumed) by this call

    def run(self, name: str, clips: Callable[[], ClipTable], config: TrainConfig, init: Run | None = None) -> Run:
        folder = self.folder / name
        if not self.trained and finished(folder):
            return Run.open(folder)
        resume = not self.trained and (folder / CLIPS).is_file()
        self.trained.append(name)
        if resume:
            return train.resume(folder, self.cache_dir, self.progress)
        return train.train(clips(), config, folder, force=True, init=init.folder if init else None,
                           cache_dir=self.cache_dir, progress=self.progress)


# --- scoring with one fold's network ------------------------------------------------------------------
def fold_scorer(run: Run, k: int) -> RunScorer:
    """Fold k's network of a run as a scorer (with the run's test-time views)."""
    return RunScorer(run, [torch_network(folded(run.load_model(k)))], threads=run.config.num_threads())


def score_files(scorer: Scorer, files: Sequence[str], cache_dir: str | Path | None = None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scores and embeddings of files, their features from the store (NaN rows for unreadable files)."""
    stores = {c: extract(files, c, cache_dir, progress=progress) for c in scorer.feature_configs}
    rows = np.flatnonzero(np.logical_and.reduce([s.ok for s in stores.values()]))
    s, e = scorer.score([{c: store[i] for c, store in stores.items()} for i in rows], progress)
    scores = np.full((len(files), len(scorer.classes)), np.nan, np.float32)
    embeddings = np.full((len(files), e.shape[1]), np.nan, np.float32)
    scores[rows], embeddings[rows] = s, e
    return scores, embeddings


def cached_frame(path: Path, make: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """A table computed once into `path` (written in one step) and read back after."""
    if not path.is_file():
        frame = make()
        atomic_write(path, lambda p: frame.to_csv(p, index=False, float_format="%.9g", na_rep="nan"))
    return pd.read_csv(path, dtype={"fname": str}, keep_default_na=False, na_values=["nan"])


# --- the warm-up pipeline ------------------------------------------------------------------------------
def warmup_clips(table: ClipTable) -> ClipTable:
    """Stage 1's clips: every noisy clip, in every fold; the curated clips that
    some fold holds out, trained on by none."""
    noisy = table.origin == "noisy"
    part = table.select(noisy | (table.fold >= 0))
    return dataclasses.replace(part, train_folds=[() if o == "noisy" else NO_FOLD for o in part.origin])


def noisy_fit(runs: Sequence[Run], noisy: ClipTable, cache_dir: str | Path | None, progress: bool) -> pd.DataFrame:
    """For every trained fold k, each run's fold-k per-clip lwlrap of the noisy
    clips against their own labels: one row a (fold, clip)."""
    parts = []
    for k in runs[-1].trained_folds():
        fit = {}
        for run in runs:
            scores, _ = score_files(fold_scorer(run, k), noisy.files, cache_dir, progress)
            ok = np.isfinite(scores).all(1)
            fit[f"lwlrap_{run.folder.name}"] = np.full(len(noisy), np.nan)
            fit[f"lwlrap_{run.folder.name}"][ok] = metrics.lwlrap_per_clip(noisy.targets[ok], scores[ok])
        parts.append(pd.DataFrame({"fold": k, "row": np.arange(len(noisy)), "fname": noisy.names, **fit}))
    return pd.concat(parts, ignore_index=True)


def selected_clips(noisy: ClipTable, fit: pd.DataFrame, threshold: float | None, per_class: int) -> ClipTable:
    """The noisy clips some fold selects (`select_noisy`), origin selected, each
    training in the folds that chose it."""
    chosen: dict[int, list[int]] = {}
    columns = [c for c in fit.columns if c.startswith("lwlrap_")]
    for k, part in fit.groupby("fold"):
        rows = part["row"].to_numpy()
        lwlraps = part[columns].to_numpy(np.float64).T
        for r in rows[select_noisy(lwlraps, noisy.targets[rows], threshold, per_class)]:
            chosen.setdefault(int(r), []).append(int(k))
    rows = np.array(sorted(chosen), np.int64)
    picked = noisy.select(rows)
    return dataclasses.replace(picked, origin=np.full(len(rows), "selected", picked.origin.dtype),
                               fold=np.full(len(rows), -1, np.int64), train_folds=[tuple(chosen[r]) for r in rows])


def run_pipeline(data: Dataset, settings: PipelineConfig, base: TrainConfig, out: str | Path, *,
                 force: bool = False, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Train the four stages into `out`, or resume them there; returns the
    folder, an ensemble of stages 2–4 (see the module's notes)."""
    settings.validate(base)
    clips = ClipTable.from_dataset(data.subset("train"))
    noisy = clips.origin == "noisy"
    if not noisy.any() or noisy.all():
        raise DataError(f"{data.root}: the warm-up pipeline needs curated and noisy training clips; "
                        f"the set has {int((~noisy).sum())} curated and {int(noisy.sum())} noisy")
    folder = open_recipe(out, "pipeline", settings, base, data, force)
    table = recipe_clips(folder, clips, base, ~noisy)
    curated, noisy_clips = table.select(table.origin != "noisy"), table.select(table.origin == "noisy")
    stages = Stages(folder, cache_dir, progress)
    s1 = stages.run("stage1", lambda: warmup_clips(table), settings.stage_config(base, "stage1"))
    s2 = stages.run("stage2", lambda: curated, settings.stage_config(base, "stage2"), s1)
    if stages.trained:
        (folder / SELECTION).unlink(missing_ok=True)

    def stage_clips(threshold: float | None) -> Callable[[], ClipTable]:
        def clips() -> ClipTable:
            fit = cached_frame(folder / SELECTION, lambda: noisy_fit([s1, s2], noisy_clips, cache_dir, progress))
            return curated.join(selected_clips(noisy_clips, fit, threshold, settings.per_class))
        return clips

    s3 = stages.run("stage3", stage_clips(settings.threshold), settings.stage_config(base, "stage3"), s2)
    s4 = stages.run("stage4", stage_clips(None), settings.stage_config(base, "stage4"), s3)
    write_ensemble(folder, [s2.folder, s3.folder, s4.folder], settings.weights, settings.mean)
    runs = {"stage1": s1, "stage2": s2, "stage3": s3, "stage4": s4}
    counts = {"stage1 noisy": origin_counts(s1, "noisy"), "stage3 selected": origin_counts(s3, "selected"),
              "stage4 selected": origin_counts(s4, "selected")}
    about = {"stage1": "noisy clips (curated held out only)", "stage2": "curated, from stage1",
             "stage3": f"curated + noisy with agreement ≥ {settings.threshold:g}, from stage2",
             "stage4": "curated + noisy fitted perfectly, from stage3"}
    write_report(folder, "Warm-up pipeline", runs, about, counts, "noisy clips trained on per class",
                 f"Ensemble: stages 2–4, weights {settings.weights}, {settings.mean} mean (`ensemble.json`).")
    return folder


# --- reports ----------------------------------------------------------------------------------------------
def origin_counts(run: Run, origin: str) -> pd.DataFrame:
    """Per class (rows) and trained fold (columns): the clips of `origin` the fold trains on."""
    table = run.read_clips()
    of_origin = table.origin == origin
    return pd.DataFrame({f"fold {k}": table.targets[table.training(k) & of_origin].sum(0).astype(int)
                         for k in run.trained_folds()}, index=table.classes)


def markdown(frame: pd.DataFrame, index: str) -> str:
    """A frame as a Markdown table, its index as the first column."""
    lines = ["| " + " | ".join([index, *map(str, frame.columns)]) + " |", "|---" * (len(frame.columns) + 1) + "|"]
    lines += ["| " + " | ".join([str(i), *map(str, row)]) + " |" for i, row in zip(frame.index, frame.to_numpy())]
    return "\n".join(lines)


def validation(run: Run) -> tuple[dict[int, float], float]:
    """A run's held-out figure per fold and out of fold."""
    summary = run.summary()
    return ({int(k): f[run.metric] for k, f in summary["folds"].items()}, summary["oof"][run.metric])


def stage_table(runs: dict[str, Run], about: dict[str, str]) -> pd.DataFrame:
    """One row a stage: what it trains on, its training clips and held-out figure per fold, out of fold."""
    rows = {}
    for name, run in runs.items():
        table, (per_fold, oof) = run.read_clips(), validation(run)
        rows[name] = {"trains on": about[name],
                      "training clips": ", ".join(f"{k}: {int(table.training(k).sum())}" for k in per_fold),
                      f"held-out {run.metric}": ", ".join(f"{k}: {v:.4f}" for k, v in per_fold.items()),
                      f"out-of-fold {run.metric}": f"{oof:.4f}"}
    return pd.DataFrame.from_dict(rows, orient="index")


def write_report(folder: Path, title: str, runs: dict[str, Run], about: dict[str, str],
                 counts: dict[str, pd.DataFrame], counted: str, note: str = "") -> Path:
    """`report.md` (the stages, then `counts` per class and fold) and `report.png`."""
    metric = next(iter(runs.values())).metric
    per_class = pd.concat(counts, axis=1)
    per_class.columns = [f"{name} {fold}" for name, fold in per_class.columns]
    text = [f"# {title}", "", markdown(stage_table(runs, about), "stage"), "",
            f"Held-out clips: the same trusted clips, folds drawn once, for every stage. {note}".strip(), "",
            f"## {counted[0].upper()}{counted[1:]} and fold", "", markdown(per_class, "class"), "",
            "![validation and clips per class](report.png)", ""]
    (folder / REPORT).write_text("\n".join(text))
    report_plot(folder / "report.png", runs, {n: c.sum(axis=1) for n, c in counts.items()}, metric, counted)
    return folder / REPORT


def report_plot(path: Path, runs: dict[str, Run], counts: dict[str, pd.Series], metric: str, counted: str) -> Path:
    """The held-out figure per stage (out of fold and per fold), and clips per class (all folds) per series."""
    classes = list(next(iter(counts.values())).index)
    fig, (ax_v, ax_c) = plots.figure(12, max(4.0, 0.2 * len(classes) + 1.5), 2)
    names = list(runs)
    figures = [validation(runs[n]) for n in names]
    ax_v.plot(names, [oof for _, oof in figures], "o-", label="out of fold")
    for k in figures[0][0]:
        ax_v.plot(names, [per_fold.get(k, np.nan) for per_fold, _ in figures], "x", label=f"fold {k}")
    ax_v.set(ylabel=metric, title=f"Held-out {metric} per stage")
    ax_v.legend(fontsize=7)
    height = 0.8 / len(counts)
    y = np.arange(len(classes))
    for i, (name, series) in enumerate(counts.items()):
        ax_c.barh(y + i * height, series.reindex(classes).to_numpy(), height, label=name)
    ax_c.set_yticks(y + 0.4 - height / 2, classes, fontsize=7)
    ax_c.invert_yaxis()
    ax_c.set(xlabel="clips", title=f"{counted[0].upper()}{counted[1:]} (all folds)")
    ax_c.legend(fontsize=7)
    return plots.save(fig, path)

