"""The `soundtag` command: parses arguments, calls the library, prints results."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .errors import SoundtagError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register `run(args)` as subcommand `name`, its options set by `configure`."""
    def wrap(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (configure, run)
        return run
    return wrap


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="dataset folder, or a CSV file of clips and labels")
    g = p.add_argument_group("dataset layout")
    g.add_argument("--layout", help="kaggle2018, kaggle2019, csv or folders (default: detected)")
    g.add_argument("--file-column", help="CSV column of file names (csv layout)")
    g.add_argument("--label-column", help="CSV column of labels, comma-joined when several (csv layout)")
    g.add_argument("--fold-column", help="CSV column of the dataset's own folds (csv layout)")
    g.add_argument("--split-column", help="CSV column saying train or test (csv layout)")
    g.add_argument("--audio-dir", type=Path, help="folder the CSV's file names are relative to (csv layout)")


def add_feature_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("features")
    g.add_argument("--sample-rate", type=int, default=44100)
    g.add_argument("--n-fft", type=int, default=1024)
    g.add_argument("--hop-length", type=int, default=512)
    g.add_argument("--n-mels", type=int, default=64)
    g.add_argument("--fmin", type=float, default=20.0)
    g.add_argument("--fmax", type=float, default=None)
    g.add_argument("--window", default="hann")
    g.add_argument("--kind", default="logmel", help="logmel or mfcc")
    g.add_argument("--n-mfcc", type=int, default=40)
    g.add_argument("--trim-db", type=float, default=60.0, help="silence threshold below the peak, in dB")
    g.add_argument("--no-trim", action="store_true", help="keep leading and trailing silence")
    add_cache_options(p)


def add_cache_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("feature cache")
    g.add_argument("--cache-dir", type=Path, help="cache root (default: $SOUNDTAG_CACHE or ~/.cache/soundtag)")
    g.add_argument("--workers", type=int, default=None, help="processes computing features (default: all cores)")
    g.add_argument("--dtype", default="float16", help="storage type: float16 or float32")


def read_dataset(args: argparse.Namespace):
    from . import datasets
    return datasets.read(args.data, args.layout, file_column=args.file_column,
                         label_column=args.label_column, fold_column=args.fold_column,
                         split_column=args.split_column, audio_dir=args.audio_dir)


def feature_config(args: argparse.Namespace):
    from .features import FeatureConfig
    return FeatureConfig(sample_rate=args.sample_rate, n_fft=args.n_fft, hop_length=args.hop_length,
                         n_mels=args.n_mels, fmin=args.fmin, fmax=args.fmax, window=args.window,
                         kind=args.kind, n_mfcc=args.n_mfcc, trim_db=None if args.no_trim else args.trim_db)


def print_failures(failures: dict[str, str], limit: int = 20) -> None:
    for path, reason in list(failures.items())[:limit]:
        print(f"  skipped {path}: {reason}")
    if len(failures) > limit:
        print(f"  … and {len(failures) - limit} more")


def _inspect_options(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    p.add_argument("--out", type=Path, help="report folder (default: DATA-report beside the data)")
    p.add_argument("--format", default="md", choices=["md", "html"], help="Markdown or HTML")
    p.add_argument("--workers", type=int, default=None, help="processes decoding audio")


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
    """Compute and cache the features of every clip (resumes an interrupted run)."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soundtag", description="Train audio taggers and tag audio.")
    parser.add_argument("--version", action="version", version=f"soundtag {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors, no warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=run.__doc__, description=run.__doc__)
        configure(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="warning: %(message)s")
    try:
        return args.run(args)
    except SoundtagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a new run resumes it", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
