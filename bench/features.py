"""Feature extraction benchmark on the real-audio dev corpus.

(a) Log-mel throughput (× realtime) of `soundtag.features.compute` against
    `librosa.feature.melspectrogram` + `power_to_db` with the same parameters, on the
    same decoded clips, with 1 and 2 threads (torch.set_num_threads for soundtag; the
    BLAS pool for librosa, whose numpy FFT is single-threaded either way).
(b) Wall time and peak memory of `soundtag features CORPUS` (no options: the fast preset's
    front end) on the whole 2018 layout in a fresh cache folder, page cache warm, then again
    as a cache hit; then whether `extract` with the fast preset's feature config finds every
    clip in the store that command filled.
(c) The per-clip store in-process (`soundtag.store.extract`, fast preset front end): a fresh
    store of the whole 2018 layout, a rerun, half of the cached set, and the set plus one new
    file, each with its seconds and the clips it computed (lines added to the index).

usage: python bench/features.py [--corpus DIR] [--out FILE] [--clips N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import librosa
import numpy as np
import torch
from threadpoolctl import threadpool_limits

from corpus import dev_corpus_path
from soundtag import __version__, audio, config, datasets, features, store
from soundtag.features import FeatureConfig

TARGET_RATIO, TARGET_WALL_S, TARGET_RSS_MB = 2.0, 15.0, 1024.0
TARGET_LOOKUP_S = 1.0  # a rerun, a cached subset, the set plus one file: lookups and the missing clips
PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20


def best_of(run: Callable[[], None], repeats: int = 3) -> float:
    """Fastest of `repeats` timed runs, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def librosa_logmel(wave: np.ndarray, c: FeatureConfig) -> np.ndarray:
    power = librosa.feature.melspectrogram(
        y=wave, sr=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
        window=c.window, center=True, pad_mode="constant", n_mels=c.n_mels, fmin=c.fmin, fmax=c.fmax)
    return librosa.power_to_db(power, top_db=c.top_db)


def throughput(waves: list[np.ndarray], audio_s: float) -> list[dict]:
    """× realtime of both front ends per mel count and thread count, measured side by side."""
    rows = []
    for n_mels in (64, 128):
        config = FeatureConfig(n_mels=n_mels)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with threadpool_limits(threads):
                features.compute(waves[0], config)  # warm-up: front end, FFT plans
                librosa_logmel(waves[0], config)
                ours = best_of(lambda: [features.compute(w, config) for w in waves])
                theirs = best_of(lambda: [librosa_logmel(w, config) for w in waves])
            rows.append({"n_mels": n_mels, "threads": threads, "soundtag_xrt": audio_s / ours,
                         "librosa_xrt": audio_s / theirs, "ratio": theirs / ours})
    return rows


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(RSS sum, PSS sum) in MiB of process `root` and its descendants, read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {root}, True
    while grew:
        grown = tree | {pid for pid, ppid in parents.items() if ppid in tree}
        grew, tree = len(grown) > len(tree), grown
    rss = pss = 0.0
    for pid in tree:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_MB
            pss += sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                       if line.startswith("Pss:")) / 1024
        except (OSError, IndexError):
            continue
    return rss, pss


def run_measured(argv: list[str], log: Path) -> dict:
    """Run `argv` with stdout and stderr to `log`: wall time; the largest single process's peak
    RSS (ru_maxrss from wait4, the per-child form of getrusage(RUSAGE_CHILDREN): the max over
    the child and its reaped descendants, not their sum); and the peak RSS and PSS sums of the
    whole process tree, sampled from /proc every 20 ms."""
    actions = [(os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
               (os.POSIX_SPAWN_DUP2, 1, 2)]
    start = time.perf_counter()
    pid = os.posix_spawn(sys.executable, [sys.executable, *argv], os.environ, file_actions=actions)
    peak_rss = peak_pss = 0.0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        rss, pss = tree_memory_mb(pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "max_process_rss_mb": usage.ru_maxrss / 1024,
            "tree_rss_sum_mb": peak_rss, "tree_pss_sum_mb": peak_pss}


def corpus_files(corpus: Path) -> list[Path]:
    return sorted((corpus / "audio_train").glob("*.wav")) + sorted((corpus / "audio_test").glob("*.wav"))


def indexed(folder: Path) -> int:
    """Lines in a store's index: one a computed clip."""
    index = folder / store.INDEX
    return index.read_bytes().count(b"\n") if index.is_file() else 0


def timed_extract(files: list[Path], cfg: FeatureConfig, cache: Path) -> dict:
    """Seconds of one `store.extract` and the clips it computed."""
    folder = store.store_folder(cfg, "float16", cache)
    before = indexed(folder)
    start = time.perf_counter()
    result = store.extract(files, cfg, cache, progress=False)
    return {"clips": len(files), "computed": indexed(folder) - before, "seconds": time.perf_counter() - start,
            "stored": int(result.ok.sum())}


def whole_corpus(corpus: Path) -> dict:
    """`soundtag features CORPUS` in a fresh cache (page cache warmed first), then a cache hit,
    then a lookup of every clip under the fast preset's feature config."""
    files = corpus_files(corpus)
    for f in files:
        f.read_bytes()
    with tempfile.TemporaryDirectory(prefix="soundtag-bench-") as tmp:
        argv = ["-m", "soundtag.cli", "features", str(corpus), "--cache-dir", tmp]
        first = run_measured(argv, Path(tmp) / "first.log")
        summary = (Path(tmp) / "first.log").read_text().strip().splitlines()[-1]
        second = run_measured(argv, Path(tmp) / "second.log")
        fast = timed_extract(datasets.read(corpus).files, config.resolve("fast").features, Path(tmp))
    return {"clips": len(files), "workers": os.cpu_count(), "summary": summary, "fresh": first,
            "cached_wall_s": second["wall_s"], "fast_preset_lookup": fast}


def store_steps(corpus: Path) -> list[dict]:
    """In-process `store.extract` on the fast preset's front end: a fresh store, a rerun, half
    of the cached set, and the set plus one new file (a copy of a clip under a new name)."""
    files, cfg = corpus_files(corpus), config.resolve("fast").features
    with tempfile.TemporaryDirectory(prefix="soundtag-bench-") as tmp:
        new = Path(shutil.copy(files[0], Path(tmp) / "new-clip.wav"))
        cache = Path(tmp) / "cache"
        steps = {"fresh, whole corpus": files, "rerun": files, "half of the cached set": files[::2],
                 "cached set + one new file": [*files, new]}
        return [{"step": step, **timed_extract(asked, cfg, cache)} for step, asked in steps.items()]


def print_table(result: dict) -> None:
    a, b = result["throughput"], result["whole_corpus"]
    print(f"{result['cpus']} CPUs, 1-minute load average {result['load_average_before']:.2f} before the run "
          "(other work on the machine slows every figure, the 2-thread ones most)\n")
    print(f"(a) log-mel throughput, {a['clips']} clips, {a['audio_s']:.0f} s of audio "
          f"(× realtime; librosa's FFT is single-threaded, its BLAS limited to the same threads)")
    print(f"{'n_mels':>6} {'threads':>7} {'soundtag':>10} {'librosa':>9} {'ratio':>6}")
    for r in a["rows"]:
        print(f"{r['n_mels']:>6} {r['threads']:>7} {r['soundtag_xrt']:>9.0f}× {r['librosa_xrt']:>8.0f}× "
              f"{r['ratio']:>5.2f}×")
    f = b["fresh"]
    print(f"\n(b) soundtag features on {b['clips']} clips, {b['workers']} workers: {b['summary']}")
    print(f"  fresh cache wall time     {f['wall_s']:7.1f} s")
    print(f"  cache hit wall time       {b['cached_wall_s']:7.1f} s")
    print(f"  peak RSS, largest process {f['max_process_rss_mb']:7.0f} MiB")
    print(f"  peak RSS, tree sum        {f['tree_rss_sum_mb']:7.0f} MiB (shared pages counted per process)")
    print(f"  peak PSS, tree sum        {f['tree_pss_sum_mb']:7.0f} MiB")
    fast = b["fast_preset_lookup"]
    print(f"  then the fast preset's feature config: {fast['stored']}/{fast['clips']} clips stored, "
          f"{fast['computed']} computed, {fast['seconds']:.2f} s")
    print(f"\n(c) per-clip store, in-process store.extract (fast preset front end, {b['workers']} workers)")
    print(f"  {'step':<27} {'clips':>6} {'computed':>9} {'seconds':>8}")
    for r in result["store"]:
        print(f"  {r['step']:<27} {r['clips']:>6} {r['computed']:>9} {r['seconds']:>8.2f}")
    print("\ntargets:")
    for name, ok in result["targets"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="dev corpus (default: $SOUNDTAG_DEV_CORPUS or built)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "features.json")
    parser.add_argument("--clips", type=int, default=300, help="clips for the throughput part")
    args = parser.parse_args()
    corpus = args.corpus or dev_corpus_path()
    load_before = os.getloadavg()[0]

    files = sorted((corpus / "audio_train").glob("*.wav"))[: args.clips]
    waves = [audio.load(f) for f in files]
    audio_s = sum(map(len, waves)) / FeatureConfig().sample_rate
    rows = throughput(waves, audio_s)
    corpus_run = whole_corpus(corpus)
    steps = store_steps(corpus)
    one_thread = [r["ratio"] for r in rows if r["threads"] == 1]
    fresh = corpus_run["fresh"]
    fast = corpus_run["fast_preset_lookup"]
    result = {
        "soundtag": __version__, "torch": torch.__version__, "librosa": librosa.__version__,
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "corpus": str(corpus),
        "load_average_before": load_before,
        "throughput": {"clips": len(files), "audio_s": audio_s, "rows": rows},
        "whole_corpus": corpus_run,
        "store": steps,
        "targets": {
            f">= {TARGET_RATIO:g}x librosa on 1 thread": min(one_thread) >= TARGET_RATIO,
            f"whole corpus <= {TARGET_WALL_S:g} s on {os.cpu_count()} cores": fresh["wall_s"] <= TARGET_WALL_S,
            f"peak RSS (largest process) <= {TARGET_RSS_MB:g} MiB": fresh["max_process_rss_mb"] <= TARGET_RSS_MB,
            f"peak PSS (tree sum) <= {TARGET_RSS_MB:g} MiB": fresh["tree_pss_sum_mb"] <= TARGET_RSS_MB,
            "`features` without options fills the fast preset's store (nothing left to compute)":
                fast["computed"] == 0,
            f"store: fresh whole corpus <= {TARGET_WALL_S:g} s": steps[0]["seconds"] <= TARGET_WALL_S,
            f"store: rerun, half subset, set + 1 each <= {TARGET_LOOKUP_S:g} s, computing 0, 0, 1 clips":
                all(r["seconds"] <= TARGET_LOOKUP_S for r in steps[1:])
                and [r["computed"] for r in steps[1:]] == [0, 0, 1],
        },
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
