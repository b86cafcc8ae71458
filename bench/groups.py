"""Source groups of the dev corpus's single-label training clips, and folds that keep each
group whole: the rule the corpus's own test split follows (no soundfont key region, sample
file or recording in both), so that an out-of-fold figure on them measures what a test on
new sources would, as folds drawn clip by clip do not.

The corpus files name no source, so the groups are recovered by replaying its deterministic
builder up to the train/test split (about 12 s; nothing is written but the groups):

    python bench/groups.py OUT.csv     # fname,label,group of every training clip
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from corpus import BUILDER  # this folder is on the path when a benchmark runs


class _Split(Exception):
    """Raised in place of writing the single-label set: the groups are all the replay needs."""


def _replay(out: Path) -> None:
    """Run the builder until it writes its single-label set, writing each training clip's
    name (as the builder numbers them), label and source group to `out` instead."""
    sys.path.insert(0, str(BUILDER.parent))
    import build_dev
    import corpuslib

    def write_groups(_root, train, _test, rng, prefix):
        order = rng.permutation(len(train))  # the draw the builder numbers its files by
        with open(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["fname", "label", "group"])
            for i, j in enumerate(order):
                label, group, _ = train[j]
                w.writerow([f"{prefix}{i:06d}.wav", label, f"{label}|{group}"])
        raise _Split

    corpuslib.write_single = write_groups
    sys.argv = [str(BUILDER), str(out.parent / "corpus")]  # a folder the replay never creates
    try:
        build_dev.main()
    except _Split:
        return
    sys.exit("the corpus builder finished without writing its single-label set: groups unknown")


def source_groups(corpus: Path) -> dict[str, str]:
    """Each training clip's source group, checked against the corpus's train.csv."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "groups.csv"
        subprocess.run([sys.executable, __file__, str(out)], check=True, stdout=subprocess.DEVNULL)
        rows = list(csv.DictReader(out.open()))
    labels = {r["fname"]: r["label"] for r in csv.DictReader((corpus / "train.csv").open())}
    if {r["fname"]: r["label"] for r in rows} != labels:
        sys.exit(f"{corpus}: its training clips are not the ones the builder replays; rebuild the corpus")
    return {r["fname"]: r["group"] for r in rows}


def source_folds(corpus: Path, names: list[str], labels: np.ndarray, folds: int = 4, seed: int = 0) -> np.ndarray:
    """A fold per clip (`names`, with class indices `labels`), stratified by class, each
    source group in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold
    groups = source_groups(corpus)
    out = np.full(len(names), -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(names)), labels, [groups[n] for n in names])):
        out[held] = k
    return out


if __name__ == "__main__":
    _replay(Path(sys.argv[1]))
