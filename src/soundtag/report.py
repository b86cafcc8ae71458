"""`soundtag inspect`: a dataset report with class counts, label co-occurrence,
audio statistics, plots and the files that could not be read."""

from __future__ import annotations

import html
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import audio
from .datasets import Dataset
from .plots import figure, save

FORMATS = ("md", "html")


@dataclass
class Probe:
    """A decoded clip's statistics, or why it could not be decoded."""

    duration: float = 0.0
    sample_rate: int = 0
    channels: int = 0
    error: str = ""


def probe(path: str | Path) -> Probe:
    """Decode a whole clip (a header alone hides truncation and NaNs)."""
    try:
        i = audio.info(path)
        audio.load(path, sample_rate=i.sample_rate, trim_db=None)
    except audio.AudioError as e:
        return Probe(error=e.reason)
    return Probe(i.duration, i.sample_rate, i.channels)


def probe_all(files: list[Path], workers: int | None = None, progress: bool = True) -> list[Probe]:
    workers = min(workers or os.cpu_count() or 1, max(1, len(files) // 16))
    bar = dict(total=len(files), unit="clip", desc="inspect", disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        return [probe(f) for f in tqdm(files, **bar)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(probe, files, chunksize=16), **bar))


def subsets(dataset: Dataset) -> dict[str, np.ndarray]:
    """Masks of the dataset's parts that hold clips: train (or curated/noisy) and test."""
    train = dataset.split == "train"
    parts = ({"curated": train & ~dataset.noisy, "noisy": train & dataset.noisy}
             if dataset.noisy.any() else {"train": train})
    parts["test"] = dataset.split == "test"
    return {k: m for k, m in parts.items() if m.any()}


def write_report(dataset: Dataset, out: str | Path, fmt: str = "md", workers: int | None = None,
                 progress: bool = True) -> Path:
    """Write the report (Markdown or HTML) and its plots into folder `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    probes = probe_all(dataset.files, workers, progress)
    parts = subsets(dataset)
    sections = [_overview(dataset, parts, probes), _class_table(dataset, parts),
                _audio_table(parts, probes)]
    if dataset.multilabel:
        sections.append(_cooccurrence(dataset, out))
    sections += [_plots(dataset, parts, probes, out), _failures(dataset, probes)]
    path = out / f"report.{fmt}"
    text = "\n\n".join(sections) + "\n"
    path.write_text(_to_html(text) if fmt == "html" else text)
    return path


def _overview(dataset: Dataset, parts: dict[str, np.ndarray], probes: list[Probe]) -> str:
    bad = sum(bool(p.error) for p in probes)
    counts = ", ".join(f"{k} {int(m.sum())}" for k, m in parts.items())
    kind = "multi-label" if dataset.multilabel else "single-label"
    return (f"# Dataset report: {dataset.root.name}\n\n"
            f"- layout: {dataset.layout}\n- clips: {len(dataset)} ({counts})\n"
            f"- classes: {len(dataset.classes)}, {kind}\n"
            f"- labels per clip (labelled clips): {dataset.targets[dataset.labelled].sum(1).mean():.2f}\n"
            f"- unreadable files: {bad}")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _class_table(dataset: Dataset, parts: dict[str, np.ndarray]) -> str:
    counts = {k: dataset.targets[m].sum(0).astype(int) for k, m in parts.items()}
    rows = [[c] + [int(counts[k][j]) for k in parts] for j, c in enumerate(dataset.classes)]
    return "## Clips per class\n\n" + _table(["class", *parts], rows)


def _audio_table(parts: dict[str, np.ndarray], probes: list[Probe]) -> str:
    rows = []
    for name, mask in parts.items():
        good = [p for p, m in zip(probes, mask) if m and not p.error]
        if not good:
            continue
        d = np.array([p.duration for p in good])
        rates = _tally(p.sample_rate for p in good)
        channels = _tally(p.channels for p in good)
        rows.append([name, len(good), f"{d.sum() / 3600:.2f}", f"{d.min():.2f}", f"{np.median(d):.2f}",
                     f"{d.mean():.2f}", f"{d.max():.2f}", rates, channels])
    header = ["part", "clips", "hours", "min s", "median s", "mean s", "max s", "sample rates", "channels"]
    return "## Audio\n\n" + _table(header, rows)


def _tally(values) -> str:
    keys, counts = np.unique(list(values), return_counts=True)
    return ", ".join(f"{k}: {c}" for k, c in zip(keys.tolist(), counts.tolist()))


def _cooccurrence(dataset: Dataset, out: Path) -> str:
    t = dataset.targets[dataset.labelled]
    co = t.T @ t
    np.fill_diagonal(co, 0)
    i, j = np.triu_indices(len(dataset.classes), 1)
    order = np.argsort(-co[i, j])[:15]
    rows = [[dataset.classes[i[k]], dataset.classes[j[k]], int(co[i[k], j[k]])] for k in order if co[i[k], j[k]]]
    fig, ax = figure(0.3 * len(dataset.classes) + 3, 0.3 * len(dataset.classes) + 2)
    im = ax.imshow(co, cmap="viridis")
    ax.set_xticks(range(len(dataset.classes)), dataset.classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(dataset.classes)), dataset.classes, fontsize=7)
    fig.colorbar(im, ax=ax, label="clips with both labels")
    ax.set_title("Label co-occurrence")
    save(fig, out / "cooccurrence.png")
    return ("## Label co-occurrence\n\nMost frequent pairs:\n\n" + _table(["class", "class", "clips"], rows)
            + "\n\n![label co-occurrence](cooccurrence.png)")


def _plots(dataset: Dataset, parts: dict[str, np.ndarray], probes: list[Probe], out: Path) -> str:
    fig, ax = figure(7, 4)
    for name, mask in parts.items():
        d = [p.duration for p, m in zip(probes, mask) if m and not p.error]
        ax.hist(d, bins=40, alpha=0.5, label=name)
    ax.set(xlabel="duration (s)", ylabel="clips", title="Clip durations")
    ax.legend()
    save(fig, out / "durations.png")
    fig, ax = figure(8, 0.22 * len(dataset.classes) + 1.5)
    left = np.zeros(len(dataset.classes))
    for name, mask in parts.items():
        counts = dataset.targets[mask].sum(0)
        ax.barh(dataset.classes, counts, left=left, label=name)
        left += counts
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set(xlabel="clips", title="Clips per class")
    ax.legend()
    save(fig, out / "class_counts.png")
    return "## Plots\n\n![durations](durations.png)\n\n![clips per class](class_counts.png)"


def _failures(dataset: Dataset, probes: list[Probe]) -> str:
    rows = [[str(f), p.error] for f, p in zip(dataset.files, probes) if p.error]
    if not rows:
        return "## Unreadable files\n\nNone."
    return f"## Unreadable files ({len(rows)})\n\n" + _table(["file", "reason"], rows)


def _to_html(markdown: str) -> str:
    """A plain HTML rendering of the report's own small Markdown subset."""
    body, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:-1].split("](")
            body.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html><meta charset=utf-8><style>{style}</style>\n" + "\n".join(body)
