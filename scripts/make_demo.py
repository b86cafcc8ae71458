#!/usr/bin/env python3
"""Build the small bundled demo set (data/demo) from the soundtag DEV corpus.

The corpus is made by `python3 ../shared/corpus/build_dev.py OUT`. This script
keeps the corpus's own train/test splits, picks a few clips per class at random
(seeded) among those of at most MAX_SECONDS, and re-encodes them as OGG Vorbis,
44.1 kHz mono. Counts and MAX_SECONDS keep data/demo under 10 MB (`du -sh`).

usage: python3 scripts/make_demo.py [--corpus DIR] [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import soundfile as sf

SAMPLE_RATE = 44100
MAX_SECONDS = 2.5
TRAIN_PER_CLASS = 12
TEST_PER_CLASS = 4
# multi-label subset: (csv stem and folder, clips to keep)
MULTILABEL = (("train_curated", 80), ("train_noisy", 80), ("test", 40))
# single-label subset: (csv, audio folder, clips per class)
SINGLE = (("train.csv", "audio_train", TRAIN_PER_CLASS), ("test.csv", "audio_test", TEST_PER_CLASS))

Row = dict[str, str]
OGG_SERIAL = 1  # libsndfile picks a random stream serial; a fixed one makes runs byte-identical


def read_csv(path: Path) -> tuple[list[str], list[Row]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path: Path, columns: list[str], rows: list[Row]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def duration(path: Path) -> float:
    return sf.info(str(path)).duration


def candidates(rows: list[Row], folder: Path, rng: random.Random) -> list[Row]:
    """The rows whose clips last at most MAX_SECONDS, in a seeded random order.
    Longer clips are left out rather than cropped: a crop could cut out one of
    the labelled sounds of a multi-label mix."""
    rows = sorted((r for r in rows if duration(folder / r["fname"]) <= MAX_SECONDS),
                  key=lambda r: r["fname"])
    rng.shuffle(rows)
    return rows


def pick(rows: list[Row], total: int, labels: Callable[[Row], list[str]]) -> list[Row]:
    """Take `total` rows round-robin over the classes: each turn, the first unused
    row that has the class. Gives equal counts per class for single-label rows and
    covers every class for multi-label ones."""
    classes = sorted({c for r in rows for c in labels(r)})
    chosen: list[Row] = []
    used: set[str] = set()
    while len(chosen) < total:
        before = len(chosen)
        for c in classes:
            row = next((r for r in rows if r["fname"] not in used and c in labels(r)), None)
            if row is not None and len(chosen) < total:
                chosen.append(row)
                used.add(row["fname"])
        if len(chosen) == before:  # every class used up
            break
    return sorted(chosen, key=lambda r: r["fname"])


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7 if r & 0x80000000 else r << 1) & 0xFFFFFFFF
        table.append(r)
    return table


OGG_CRC = _ogg_crc_table()


def ogg_crc(page: bytes) -> int:
    crc = 0
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ OGG_CRC[(crc >> 24) ^ byte]
    return crc


def fix_serial(ogg: bytes) -> bytes:
    """The Ogg stream with OGG_SERIAL as serial number and page checksums redone."""
    pages, pos = [], 0
    while pos < len(ogg):
        n_segments = ogg[pos + 26]
        end = pos + 27 + n_segments + sum(ogg[pos + 27: pos + 27 + n_segments])
        page = bytearray(ogg[pos:end])
        page[14:18] = struct.pack("<I", OGG_SERIAL)
        page[22:26] = bytes(4)  # the checksum is taken with its own field zeroed
        page[22:26] = struct.pack("<I", ogg_crc(page))
        pages.append(bytes(page))
        pos = end
    return b"".join(pages)


def encode(src: Path, dst: Path) -> None:
    data, rate = sf.read(str(src), dtype="float32")
    if rate != SAMPLE_RATE or data.ndim != 1:
        raise ValueError(f"{src}: expected mono {SAMPLE_RATE} Hz, got {data.shape} at {rate} Hz")
    buffer = io.BytesIO()
    sf.write(buffer, data, SAMPLE_RATE, format="OGG", subtype="VORBIS")
    dst.write_bytes(fix_serial(buffer.getvalue()))


def copy_subset(rows: list[Row], src: Path, dst: Path) -> list[Row]:
    """Encode the rows' clips from `src` into `dst`; the rows with .ogg names."""
    dst.mkdir(parents=True)
    out = []
    for r in rows:
        name = Path(r["fname"]).with_suffix(".ogg").name
        encode(src / r["fname"], dst / name)
        out.append({**r, "fname": name})
    return out


def make_single(corpus: Path, out: Path, rng: random.Random) -> None:
    for csv_name, folder, per_class in SINGLE:
        columns, rows = read_csv(corpus / csv_name)
        ordered = candidates(rows, corpus / folder, rng)
        n_classes = len({r["label"] for r in rows})
        chosen = pick(ordered, per_class * n_classes, lambda r: [r["label"]])
        write_csv(out / csv_name, columns, copy_subset(chosen, corpus / folder, out / folder))


def make_multilabel(corpus: Path, out: Path, rng: random.Random) -> None:
    for stem, total in MULTILABEL:
        columns, rows = read_csv(corpus / f"{stem}.csv")
        ordered = candidates(rows, corpus / stem, rng)
        chosen = pick(ordered, total, lambda r: r["labels"].split(","))
        write_csv(out / f"{stem}.csv", columns, copy_subset(chosen, corpus / stem, out / stem))


def clear(out: Path) -> None:
    """Remove what a previous run wrote; keep hand-written files (README, CREDITS)."""
    for name in ("audio_train", "audio_test", "multilabel"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("train.csv", "test.csv"):
        (out / name).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path,
                        default=Path(os.environ.get("SOUNDTAG_DEV_CORPUS", "/tmp/corpus")),
                        help="DEV corpus root (default: $SOUNDTAG_DEV_CORPUS or /tmp/corpus)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "demo",
                        help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=2018, help="selection seed (default: 2018)")
    args = parser.parse_args()
    if not (args.corpus / "train.csv").is_file():
        parser.error(f"{args.corpus}: no DEV corpus here; build one with "
                     "python3 ../shared/corpus/build_dev.py DIR")
    args.out.mkdir(parents=True, exist_ok=True)
    clear(args.out)
    make_single(args.corpus, args.out, random.Random(args.seed))
    make_multilabel(args.corpus / "multilabel", args.out / "multilabel", random.Random(args.seed))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
