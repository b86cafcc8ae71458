"""The `soundtag` command: parses arguments, calls the library, prints results."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from . import __version__
from .errors import ConfigError, SoundtagError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register `run(args)` as subcommand `name`, its options set by `configure`."""
    def wrap(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (configure, run)
        return run
    return wrap


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one `error:` line and exit status 2, like every other mistake."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def bounded(kind: type[int] | type[float], low: float, high: float,
            above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite `kind` from `low` (excluded when `above`) to `high`."""
    word = "a whole number" if kind is int else "a number"
    span = f"above {low:g} and at most {high:g}" if above else f"from {low:g} to {high:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not ((low < value) if above else (low <= value)) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be {word} {span}, not {text!r}")
        return value
    return parse


SECONDS = bounded(float, 0, 600, above=True)  # crop, tile and window lengths: at most 10 minutes
THREADS = bounded(int, 0, 1024)
WORKERS = bounded(int, 1, 1024)
EPOCHS = bounded(int, 1, 100_000)
TOP_K = bounded(int, 1, 1000)
MAX_FOLDS = 100
ESCAPED_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def printable(text: str) -> str:
    """A file name as it can be printed and written to UTF-8 files: bytes that are
    not UTF-8 (undecodable names) shown as \\xNN escapes."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """`text` with every line break escaped, so that a message stays one line."""
    return text.translate(ESCAPED_BREAKS)


def add_data_options(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("data", type=Path, nargs="?" if optional else None,
                   help="dataset folder, or a CSV file of clips and labels")
    g = p.add_argument_group("dataset layout")
    g.add_argument("--layout", help="kaggle2018, kaggle2019, csv or folders (default: detected)")
    g.add_argument("--file-column", help="CSV column of file names (csv layout)")
    g.add_argument("--label-column", help="CSV column of labels, comma-joined when several (csv layout)")
    g.add_argument("--fold-column", help="CSV column of the dataset's own folds (csv layout)")
    g.add_argument("--split-column", help="CSV column saying train or test (csv layout)")
    g.add_argument("--audio-dir", type=Path, help="folder the CSV's file names are relative to (csv layout)")


def add_feature_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features (each option overrides the preset's front end)")
    g.add_argument("--preset", default="fast",
                   help="front end of this training preset (default: fast, what `train` uses by default)")
    g.add_argument("--sample-rate", type=int)
    g.add_argument("--n-fft", type=int)
    g.add_argument("--hop-length", type=int)
    g.add_argument("--n-mels", type=int)
    g.add_argument("--fmin", type=float)
    g.add_argument("--fmax", type=float)
    g.add_argument("--window")
    g.add_argument("--kind", help="logmel, mfcc or waveform (with --hop-length 1)")
    g.add_argument("--n-mfcc", type=int)
    g.add_argument("--trim-db", type=float, help="silence threshold below the peak, in dB")
    g.add_argument("--no-trim", action="store_true", help="keep leading and trailing silence")
    add_cache_options(p)


def add_cache_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature cache")
    g.add_argument("--cache-dir", type=Path, help="cache root (default: $SOUNDTAG_CACHE or ~/.cache/soundtag)")
    g.add_argument("--workers", type=WORKERS, default=None, help="processes computing features (default: all cores)")
    g.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage type")


def read_dataset(args: argparse.Namespace):
    from . import datasets
    return datasets.read(args.data, args.layout, file_column=args.file_column,
                         label_column=args.label_column, fold_column=args.fold_column,
                         split_column=args.split_column, audio_dir=args.audio_dir)


def feature_config(args: argparse.Namespace):
    """The preset's front end with the feature options given on the command line."""
    from dataclasses import replace

    from .config import resolve
    names = ("sample_rate", "n_fft", "hop_length", "n_mels", "fmin", "fmax", "window", "kind", "n_mfcc", "trim_db")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.no_trim:
        if "trim_db" in given:
            raise ConfigError("--no-trim and --trim-db contradict each other; give one")
        given["trim_db"] = None
    return replace(resolve(args.preset).features, **given)


def print_failures(failures: dict[str, str], limit: int = 20) -> None:
    for path, reason in list(failures.items())[:limit]:
        print(f"  skipped {printable(path)}: {printable(reason)}")
    if len(failures) > limit:
        print(f"  … and {len(failures) - limit} more")


def _inspect_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    p.add_argument("--out", type=Path, help="report folder (default: DATA-report beside the data)")
    p.add_argument("--format", default="md", choices=["md", "html"], help="Markdown or HTML")
    p.add_argument("--workers", type=WORKERS, default=None, help="processes decoding audio")


@command("inspect", _inspect_options)
def inspect(args: argparse.Namespace) -> int:
    """Write a dataset report: class counts, co-occurrence, audio statistics, plots, unreadable files."""
    from .report import write_report
    dataset = read_dataset(args)
    out = args.out or dataset.root.parent / f"{dataset.root.name}-report"
    path = write_report(dataset, out, args.format, args.workers)
    print(f"{len(dataset)} clips, {len(dataset.classes)} classes ({dataset.layout}); report: {path}")
    return 0


def _features_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    add_feature_options(p)


@command("features", _features_options)
def features(args: argparse.Namespace) -> int:
    """Compute and store the features of every clip the store lacks (by default the fast preset's)."""
    from .store import extract
    dataset = read_dataset(args)
    start = time.perf_counter()
    store = extract(dataset.files, feature_config(args), args.cache_dir, args.workers, args.dtype)
    failures = store.failures()
    seconds = store.config.seconds(int(store.frames.sum()))
    print(f"{len(store)} clips ({seconds / 3600:.2f} h of audio) in {time.perf_counter() - start:.1f} s; "
          f"{len(failures)} skipped; cache: {store.folder}")
    print_failures(failures)
    return 0


def _train_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p, optional=True)
    p.add_argument("--out", type=Path, help="run folder to create")
    add_training_options(p)
    p.add_argument("--init", type=Path, help="start from this run's weights (head replaced if classes differ)")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run")
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    add_cache_options(p)


def add_training_options(p: argparse.ArgumentParser, config: str = "--config") -> None:
    """The preset, a YAML file over it (the `config` flag) and the options `train_overrides` reads."""
    from .config import presets
    p.add_argument("--preset", default="fast", help=f"starting recipe: {', '.join(presets())}")
    p.add_argument(config, type=Path, help="YAML file of training options over the preset")
    p.add_argument("--folds", help="K for stratified K-fold (all folds trained), or 'own' for the dataset's folds")
    p.add_argument("--fold", type=bounded(int, 0, MAX_FOLDS - 1), action="append",
                   help="train only this fold (repeatable)")
    p.add_argument("--epochs", type=EPOCHS)
    p.add_argument("--batch-size", type=bounded(int, 1, 4096))
    p.add_argument("--model", help="network name (see the README for the list)")
    p.add_argument("--threads", type=THREADS, help="torch threads (default: up to 2)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast")
    p.add_argument("--corrections", help="label corrections file (from `soundtag review`, edited) to train with")


def train_overrides(args: argparse.Namespace) -> dict:
    """Config options given on the command line."""
    out: dict = {}
    if args.folds:
        out["folds"] = args.folds if args.folds == "own" else _whole(args.folds, "--folds")
        out["train_folds"] = None
    if args.fold is not None:
        out["train_folds"] = args.fold
    for key in ("epochs", "batch_size", "threads", "bf16", "corrections"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.model:
        out["model"] = {"name": args.model, "params": {}}
    return out


def _whole(text: str, option: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 3 else 0
    if not 2 <= value <= MAX_FOLDS:
        raise ConfigError(f"{option} takes a whole number or 'own' (K from 2 to {MAX_FOLDS}), not {text!r}")
    return value


@command("train", _train_options)
def train(args: argparse.Namespace) -> int:
    """Train a tagger on the cached features of a dataset (or --resume a run)."""
    from . import train as training
    from .config import resolve
    if args.resume:
        run = training.resume(args.resume, args.cache_dir)
    else:
        if args.data is None or args.out is None:
            raise ConfigError("train needs DATA and --out RUN (or --resume RUN)")
        config = resolve(args.preset, args.config, train_overrides(args))
        run = training.train(read_dataset(args), config, args.out, force=args.force, init=args.init,
                             cache_dir=args.cache_dir)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(training.summary_table(run.summary()))
    print(f"run: {run.folder} (curves: {run.curves_path})")
    return 0


def add_tagger_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tagging")
    g.add_argument("--runs", type=Path, nargs="+", default=[], help="more runs to ensemble with RUN")
    g.add_argument("--weights", type=bounded(float, 0, 1e6), nargs="+", help="one weight per run (RUN first)")
    g.add_argument("--mean", default="arithmetic", help="ensemble mean: arithmetic or geometric")
    g.add_argument("--tta", help="full (whole clip), crops (lengths × offsets) or tiles (default: the run's "
                                 "own, as its config's tta says; whole clips unless it says otherwise)")
    g.add_argument("--tta-lengths", type=SECONDS, nargs="+",
                   help="crop lengths in seconds (crops; default 1 1.5 2 3 4 5)")
    g.add_argument("--tta-offsets", type=bounded(int, 1, 100), help="crops per length (crops; default 5)")
    g.add_argument("--tile", type=SECONDS, help="tile length in seconds (tiles; default 2)")
    g.add_argument("--tile-hop", type=SECONDS, help="seconds between tiles (tiles; default 1)")
    g.add_argument("--backend", default="torch",
                   help="torch, onnx or onnx-int8 (after `soundtag export`, with --int8 for onnx-int8)")
    g.add_argument("--threads", type=THREADS, default=0,
                   help="batches scored (and, by default, clips decoded) at once, each on one thread "
                        "(default: all cores)")


VIEW_OPTIONS = {"tta_lengths": "lengths", "tta_offsets": "offsets", "tile": "tile", "tile_hop": "hop"}


def views_from(args: argparse.Namespace):
    """The views `--tta` and its options name (checked before any audio is read), or
    None: each run scores with its own."""
    import dataclasses

    from .tta import TTA
    given = {field: getattr(args, option) for option, field in VIEW_OPTIONS.items()
             if getattr(args, option) is not None}
    if args.tta:
        return dataclasses.replace(TTA(), mode=args.tta, mean=args.mean, **given)
    if given:
        flags = ", ".join("--" + option.replace("_", "-") for option, field in VIEW_OPTIONS.items() if field in given)
        raise ConfigError(f"{flags} shape the views of --tta; give --tta crops or tiles too (without it each run "
                          "scores with its own views)")
    return None


def load_tagger(args: argparse.Namespace):
    import torch

    from .predict import Tagger
    tta = views_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)  # also caps torch outside the tagger (timeline features)
    return Tagger.load([args.run, *args.runs], args.weights, args.backend, tta, args.mean, args.threads,
                       getattr(args, "processes", 0))


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder")
    add_data_options(p)
    p.add_argument("--split", default="test", help="test (default), train, curated, noisy or all")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--out", type=Path, help="folder for metrics.json and plots (default: RUN/eval-SPLIT)")
    p.add_argument("--cache-dir", type=Path)
    add_tagger_options(p)


@command("evaluate", _evaluate_options)
def evaluate(args: argparse.Namespace) -> int:
    """Score a labelled split: lwlrap, MAP@3, accuracy, per-class figures and plots."""
    from .evaluation import evaluate as run_evaluation
    from .run import eval_folder
    out = args.out or eval_folder(args.run, args.split)
    result = run_evaluation(load_tagger(args), read_dataset(args), args.split, out, args.cache_dir,
                            progress=not args.json)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['split']}: {result['clips']} clips, lwlrap {result['lwlrap']:.4f}, "
          f"map@3 {result['map@3']:.4f}, accuracy {result['accuracy']:.4f}")
    print("| class | positives | lwlrap | AP |\n|---|---|---|---|")
    for c, v in result["per_class"].items():
        print(f"| {c} | {v['positives']} | {_fmt(v['lwlrap'])} | {_fmt(v['ap'])} |")
    print_failures(result["skipped"])
    print(f"plots and metrics.json: {out}")
    return 0


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def audio_inputs(target: Path) -> tuple[list[Path], list[str]]:
    """Files to tag from a folder (recursively) or a CSV with an fname column, and
    their names as written to the output (undecodable bytes escaped); a source
    with no audio to tag is a `ConfigError`."""
    from .datasets.folders import AUDIO_SUFFIXES
    from .datasets.table import Table
    if not target.exists():
        raise ConfigError(f"{target}: no such file or folder")
    if target.is_dir():
        files = sorted(f for f in target.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise ConfigError(f"{target}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) in this folder "
                              "or below")
        return files, [printable(str(f.relative_to(target))) for f in files]
    if target.suffix.lower() == ".csv":
        table = Table(target, [])
        column = table.pick(("fname", "filename", "file", "path"), "file")
        names = [row[column] for _, row in table.rows]
        files = [target.parent / n for n in names]
        if not any(f.exists() for f in files):
            raise ConfigError(f"{target}: none of its {len(files)} files exist under {target.parent}")
        return files, names
    raise ConfigError(f"{target}: expected a folder of audio files or a CSV with an fname column")


def _predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("audio", type=Path, help="folder of audio files, or a CSV of file names")
    p.add_argument("--out", type=Path, required=True, help="file to write")
    p.add_argument("--format", default="csv", help="kaggle2018, kaggle2019, csv, json or tags (thresholded)")
    p.add_argument("--top-k", type=TOP_K, default=3, help="tags per file (csv, json)")
    p.add_argument("--workers", type=WORKERS, default=None,
                   help="threads computing features ahead of the networks; given, the files are tagged in "
                        "this one process (default: --threads, in worker processes for a large folder)")
    p.add_argument("--processes", type=THREADS, default=0,
                   help="worker processes sharing a folder of at least 32 files a process, each on one thread "
                        "(default: --threads; 1: tag in one process)")
    add_tagger_options(p)


@command("predict", _predict_options)
def predict(args: argparse.Namespace) -> int:
    """Tag a folder (or CSV) of clips and write a submission or tag table."""
    from . import outputs
    if args.format not in outputs.FORMATS:
        raise ConfigError(f"unknown output format {args.format!r}; valid: {', '.join(outputs.FORMATS)}")
    files, names = audio_inputs(args.audio)
    with load_tagger(args) as tagger:
        scores, errors = tagger.tag_files(files, args.workers)
    thresholds = tagger.thresholds() if args.format == "tags" else None
    path = outputs.write(args.out, args.format, names, scores, tagger.classes, errors, args.top_k, thresholds)
    print(f"{len(files)} files tagged, {len(errors)} unreadable; written: {path}")
    print_failures({str(files[i]): reason for i, reason in errors.items()})
    return 0


def _tag_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("files", type=Path, nargs="+", help="audio files")
    p.add_argument("--top-k", type=TOP_K, default=3)
    p.add_argument("--long", type=bounded(float, 0, 1e9), default=30.0,
                   help="files longer than this (s) get a timeline")
    p.add_argument("--window", type=SECONDS, default=2.0, help="timeline window (s)")
    p.add_argument("--hop", type=SECONDS, default=1.0, help="timeline hop (s)")
    p.add_argument("--out", type=Path, default=Path("timelines"), help="folder for timelines")
    add_tagger_options(p)


@command("tag", _tag_options)
def tag(args: argparse.Namespace) -> int:
    """Print each file's top tags; long recordings get a timeline (CSV, events, plot)."""
    from .audio import AudioError
    from .timeline import check_window
    check_window(args.window, args.hop)
    tagger = load_tagger(args)
    thresholds = None
    for path in args.files:
        try:
            result = tagger.tag(path, args.long, args.window, args.hop)
        except AudioError as e:
            print(f"{path}: {e.reason}")
            continue
        print(f"{path}: " + ", ".join(f"{label} {score:.2f}" for label, score in result.top(args.top_k)))
        if result.timeline is not None:
            thresholds = _thresholds(tagger) if thresholds is None else thresholds
            write_timeline(result.timeline, args.out / path.stem, thresholds)
    return 0


def write_timeline(line, stem: Path, thresholds) -> None:
    """A long recording's timeline as CSV, its events as CSV, and the plot."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    line.table().to_csv(f"{stem}.timeline.csv", index=False, float_format="%.4f")
    events = line.events(thresholds)
    events.to_csv(f"{stem}.events.csv", index=False, float_format="%.3f")
    line.plot(f"{stem}.timeline.png")
    print(f"  timeline: {len(line.starts)} windows, {len(events)} events → {stem}.timeline.csv, "
          f"{stem}.events.csv, {stem}.timeline.png")


def _thresholds(tagger) -> float | object:
    """The runs' tuned thresholds, or 0.5 where they have none."""
    try:
        return tagger.thresholds()
    except SoundtagError:
        return 0.5


def _stack_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", type=Path, nargs="+", help="runs trained on the same clips")
    p.add_argument("--out", type=Path, required=True, help="stack folder to write")
    p.add_argument("--hidden", type=bounded(int, 1, 65536), default=256, help="hidden units of the MLP")
    p.add_argument("--epochs", type=EPOCHS, default=300)


@command("stack", _stack_options)
def stack(args: argparse.Namespace) -> int:
    """Fit a second-level MLP on several runs' out-of-fold scores (use the folder as a RUN)."""
    from .stack import fit_stack
    figures = fit_stack(args.runs, args.out, args.hidden, args.epochs)
    print(f"{figures['clips']} out-of-fold clips; {figures['metric']}: stack (5-fold CV) "
          f"{figures['stack_cv']:.4f}, mean of runs {figures['mean_of_runs']:.4f}; written: {args.out}")
    return 0


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder")
    p.add_argument("--format", default="onnx", help="onnx")
    p.add_argument("--int8", action="store_true",
                   help="also write int8-quantised networks (calibrated on the run's training clips)")


@command("export", _export_options)
def export(args: argparse.Namespace) -> int:
    """Write the run's networks as ONNX (front end parameters saved beside them)."""
    from .export import export as run_export
    paths = run_export(args.run, args.format, int8=args.int8)
    print("\n".join(str(p) for p in paths))
    return 0


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-run"), help="folder for the run and plots")
    p.add_argument("--data", type=Path, help="demo data (default: the bundled set)")
    p.add_argument("--epochs", type=EPOCHS, help="override the fast preset's epochs")
    add_cache_options(p)


@command("demo", _demo_options)
def demo(args: argparse.Namespace) -> int:
    """Train the fast preset on the bundled demo set, evaluate it and tag held-out clips."""
    from .demo import run_demo
    run_demo(args.out, args.data, args.cache_dir, args.epochs)
    return 0


def _index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run (or stack) folder that tags the files")
    p.add_argument("folder", type=Path, help="folder of audio files, searched recursively")
    p.add_argument("--db", type=Path, required=True, help="library file (SQLite; created if missing)")
    p.add_argument("--runs", type=Path, nargs="+", default=[], help="more runs to ensemble with RUN")
    p.add_argument("--backend", default="auto", help="auto (onnx when exported, else torch), torch, onnx, onnx-int8")
    p.add_argument("--threads", type=THREADS, default=0, help="files decoded and batches scored at once")
    p.add_argument("--processes", type=THREADS, default=0,
                   help="worker processes sharing at least 32 files each to read (default: --threads; 1: one process)")
    p.add_argument("--engine", default="local", choices=["local", "ray"], help="this machine, or a Ray cluster")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")


@command("index", _index_options)
def index(args: argparse.Namespace) -> int:
    """Tag every audio file under FOLDER into a library: new and changed files scored, removed ones pruned."""
    from .library import Library
    report = Library.index(args.db, [args.run, *args.runs], args.folder, args.backend, args.threads,
                           args.engine, args.address, processes=args.processes)
    print(f"{args.db}: {report.summary()}")
    print_failures(report.failed)
    return 0


def _search_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("label", help="a label of the library's model")
    p.add_argument("--db", type=Path, required=True, help="library file")
    p.add_argument("--min-score", type=bounded(float, 0, 1), default=0.0, help="lowest score listed")
    p.add_argument("--limit", type=TOP_K, default=20, help="files listed")
    p.add_argument("--json", action="store_true", help="one JSON object")


@command("search", _search_options)
def search(args: argparse.Namespace) -> int:
    """List the library's files tagged LABEL, best score first."""
    from .library import Library
    with Library(args.db) as library:
        hits = library.search(args.label, args.min_score, args.limit)
    print_hits(hits, args.json, {"label": args.label})
    return 0


def _similar_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="a library id, or an audio file (embedded on the fly if not in the library)")
    p.add_argument("--db", type=Path, required=True, help="library file")
    p.add_argument("-k", type=TOP_K, default=10, help="files listed")
    p.add_argument("--approx", action="store_true", help="approximate (HNSW) index, for millions of files")
    p.add_argument("--json", action="store_true", help="one JSON object")


@command("similar", _similar_options)
def similar(args: argparse.Namespace) -> int:
    """List the library's files that sound most like QUERY (cosine similarity of embeddings)."""
    from .library import Library
    with Library(args.db) as library:
        hits = library.similar(args.query, args.k, args.approx)
    print_hits(hits, args.json, {"query": args.query})
    return 0


def print_hits(hits, as_json: bool, about: dict) -> None:
    if as_json:
        print(json.dumps({**about, "results": [h.to_dict() for h in hits]}))
        return
    for h in hits:
        print(f"{h.score:.3f}  [{h.id}] {printable(h.name)}")
    if not hits:
        print("no matching files")


def _serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run (or stack) folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=bounded(int, 0, 65535), default=8000)
    p.add_argument("--api-key", default=os.environ.get("SOUNDTAG_API_KEY"),
                   help="key every /v1 request must send (X-API-Key); default $SOUNDTAG_API_KEY, else none")
    p.add_argument("--db", type=Path, help="a library to browse and search (soundtag index)")
    p.add_argument("--backend", default="auto", help="auto (onnx when exported, else torch), torch, onnx, onnx-int8")
    p.add_argument("--threads", type=THREADS, default=0, help="decoding threads and batches scored at once")
    p.add_argument("--max-batch", type=bounded(int, 1, 1024), default=16, help="requests scored together (1: off)")
    p.add_argument("--max-wait-ms", type=bounded(float, 0, 1000), default=5.0,
                   help="how long a request waits for others to share its batch")
    p.add_argument("--max-upload-mb", type=bounded(float, 0, 4096, above=True), default=50.0)
    p.add_argument("--max-duration", type=SECONDS, default=600.0, help="longest audio accepted (s)")
    p.add_argument("--timeout", type=bounded(float, 0, 3600, above=True), default=30.0, help="per request (s)")
    p.add_argument("--max-concurrency", type=bounded(int, 1, 10_000), default=64,
                   help="requests in progress at once; more get 503")
    p.add_argument("--long", type=bounded(float, 0, 1e9), default=30.0, help="longer audio gets segments (s)")
    p.add_argument("--window", type=SECONDS, default=2.0, help="segment window (s)")
    p.add_argument("--hop", type=SECONDS, default=1.0, help="segment hop (s)")


@command("serve", _serve_options)
def serve(args: argparse.Namespace) -> int:
    """Serve the tagger over HTTP (JSON API, OpenAPI docs at /docs) with a web page at /."""
    from .server import Settings, serve as run_server
    settings = Settings(max_upload_bytes=int(args.max_upload_mb * 2**20), max_duration=args.max_duration,
                        timeout=args.timeout, max_concurrency=args.max_concurrency, api_key=args.api_key,
                        max_batch=args.max_batch, max_wait=args.max_wait_ms / 1000, long=args.long,
                        window=args.window, hop=args.hop, threads=args.threads)
    run_server(args.run, settings, args.host, args.port, args.backend, args.db)
    return 0


def _review_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a trained run folder")
    add_data_options(p)
    p.add_argument("--out", type=Path, default=Path("corrections.csv"), help="corrections file to write")
    p.add_argument("--top", type=bounded(int, 1, 10**7), default=100, help="clips listed, worst first")
    p.add_argument("--force", action="store_true", help="replace an existing corrections file")


@command("review", _review_options)
def review(args: argparse.Namespace) -> int:
    """List the clips whose labels the run's out-of-fold scores disagree with most; write a corrections file."""
    from .corrections import review_run
    frame = review_run(args.run, read_dataset(args), args.out, args.top, args.force)
    print("| rank | fname | labels | disagreement | predicted |\n|---|---|---|---|---|")
    for rank, row in enumerate(frame.itertuples(), start=1):
        print(f"| {rank} | {printable(row.fname)} | {row.old_labels} | {row.disagreement:.3f} | {row.predicted} |")
    print(f"{len(frame)} clips written to {args.out}: edit new_labels, then train with `corrections: {args.out}`")
    return 0


def _recipe_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    p.add_argument("--out", type=Path, required=True, help="folder of the recipe's runs and report (rerun to resume)")
    p.add_argument("--config", type=Path, help="YAML file of the recipe's settings (default: its defaults)")
    add_training_options(p, "--train-config")
    p.add_argument("--force", action="store_true", help="replace the folder instead of resuming it")
    add_cache_options(p)


def _recipe(args: argparse.Namespace, settings_type: type, run: Callable) -> int:
    """Settings and training config checked, then the recipe run (or resumed) and its report printed."""
    from .config import resolve
    from .pipeline import REPORT, load_settings
    settings = load_settings(settings_type, args.config)
    base = resolve(args.preset, args.train_config, train_overrides(args))
    settings.validate(base)
    folder = run(read_dataset(args), settings, base, args.out, force=args.force, cache_dir=args.cache_dir)
    print((folder / REPORT).read_text().split("\n## ")[0].strip())
    print(f"report: {folder / REPORT}; tag with the folder as a RUN (its ensemble.json)")
    return 0


@command("pipeline", _recipe_options)
def pipeline(args: argparse.Namespace) -> int:
    """Staged warm-up: noisy clips, curated, + selected noisy, + strictly selected noisy; ensemble of stages 2-4."""
    from .pipeline import PipelineConfig, run_pipeline
    return _recipe(args, PipelineConfig, run_pipeline)


@command("pseudo", _recipe_options)
def pseudo(args: argparse.Namespace) -> int:
    """Pseudo-label a pool (unverified, noisy or test clips) over iterations with a scheduled threshold."""
    from .semi import PseudoConfig, run_pseudo
    return _recipe(args, PseudoConfig, run_pseudo)


@command("spread", _recipe_options)
def spread(args: argparse.Namespace) -> int:
    """Keep the unverified clips whose label spreading over embeddings agrees with their given label."""
    from .semi import SpreadConfig, run_spread
    return _recipe(args, SpreadConfig, run_spread)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="soundtag", description="Train audio taggers and tag audio.")
    parser.add_argument("--version", action="version", version=f"soundtag {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors, no warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=run.__doc__, description=run.__doc__)
        configure(p)
        p.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="warning: %(message)s")
    if isinstance(sys.stdout, io.TextIOWrapper):  # a file name that is not UTF-8 prints escaped
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return args.handler(args)
    except SoundtagError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a new run resumes it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
