"""Training benchmark: speed of every model, and quality of the `fast` preset.

    python bench/train.py [--corpus DIR] [--out FILE] [--skip-speed] [--skip-quality]

Speed: training and inference clips/s at 64 mels × 2-s crops (172 frames), fp32,
fp32 + channels_last and bf16 + channels_last, on 1 and 2 threads, each model in its
own process so its peak RSS is its own. Quality: the `fast` preset on the dev corpus
(single-label MAP@3 on its test split; multi-label lwlrap on its test split after
training on curated + noisy) against a classical baseline (mean and std of 40 MFCCs
and 64 log-mel bands into logistic regression) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from corpus import dev_corpus_path  # this folder is on the path when a benchmark runs

MODELS = {"cnn6@0.5 (fast)": ("cnn6", {"width": 0.5, "dropout": 0.2}), "cnn6": ("cnn6", {}), "cnn10": ("cnn10", {}),
          "vgg": ("vgg", {}), "mobilenetv2": ("mobilenetv2", {}), "resnet": ("resnet", {})}
VARIANTS = {"fp32": (False, False), "fp32+cl": (False, True), "bf16+cl": (True, True)}
BATCH, FRAMES, MELS, CLASSES = 32, 172, 64, 41


def speed_of_model(label: str, seconds: float) -> dict:
    """clips/s of one model for every variant and thread count (run in a child process)."""
    from soundtag.models import create_model
    name, params = MODELS[label]
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for variant, (bf16, channels_last) in VARIANTS.items():
            torch.manual_seed(0)
            model = create_model(name, CLASSES, n_mels=MELS, **params)
            memory = torch.channels_last if channels_last else torch.contiguous_format
            model.to(memory_format=memory)
            x = torch.randn(BATCH, 1, MELS, FRAMES).contiguous(memory_format=memory) * 20 - 40
            y = torch.randint(0, CLASSES, (BATCH,))
            opt = torch.optim.AdamW(model.parameters(), 1e-3)
            cast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

            def train_step() -> None:
                with cast():
                    logits, _ = model(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

            def infer_step() -> None:
                with torch.inference_mode(), cast():
                    model(x)

            model.train()
            train_rate = _rate(train_step, seconds)
            model.eval()
            out[f"{variant} {threads}t"] = {"train": train_rate, "infer": _rate(infer_step, seconds)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _rate(step, seconds: float) -> float:
    step()  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 2:
        step()
        n += 1
    return BATCH * n / (time.perf_counter() - start)


def speed(seconds: float) -> dict:
    results = {}
    for label in MODELS:
        child = subprocess.run([sys.executable, __file__, "--one", label, "--seconds", str(seconds)],
                               capture_output=True, text=True, check=True)
        results[label] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  measured {label}", file=sys.stderr)
    return results


def print_speed(results: dict) -> None:
    columns = [f"{v} {t}t" for t in (1, 2) for v in VARIANTS]
    print("\nTraining / inference clips/s (64 mels × 2 s, batch 32)\n")
    print("| model | " + " | ".join(columns) + " | peak RSS MB |")
    print("|---|" + "---|" * (len(columns) + 1))
    for label, r in results.items():
        cells = [f"{r[c]['train']:.0f} / {r[c]['infer']:.0f}" for c in columns]
        print(f"| {label} | " + " | ".join(cells) + f" | {r['peak_rss_mb']:.0f} |")


def baseline(data, store_mfcc, store_mel) -> np.ndarray:
    """Mean and std of MFCCs and log-mels into logistic regression; test-split scores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def stats(i: int) -> np.ndarray:
        parts = [s[i].astype(np.float32) for s in (store_mfcc, store_mel)]
        return np.concatenate([np.r_[p.mean(1), p.std(1)] for p in parts])

    x = np.stack([stats(i) for i in range(len(data))])
    train = data.split == "train"
    model = LogisticRegression(max_iter=2000, C=0.5)
    if data.multilabel:
        classifier = make_pipeline(StandardScaler(), OneVsRestClassifier(model))
        classifier.fit(x[train], data.targets[train])
    else:
        classifier = make_pipeline(StandardScaler(), model)
        classifier.fit(x[train], data.targets[train].argmax(1))
    return classifier.predict_proba(x[~train])


def quality(corpus: Path, work: Path, sets: list[str]) -> dict:
    from soundtag import config, datasets, metrics, train
    from soundtag.features import FeatureConfig
    from soundtag.predict import Tagger
    from soundtag.store import extract
    results = {}
    for name, path in (("single-label", corpus), ("multi-label", corpus / "multilabel")):
        if name not in sets:
            continue
        data = datasets.read(path)
        preset = config.resolve("fast")
        mfcc = FeatureConfig(**{**preset.features.to_dict(), "kind": "mfcc", "n_mfcc": 40})
        start = time.perf_counter()
        store_mel = extract(data.files, preset.features, work / "cache", progress=False)
        store_mfcc = extract(data.files, mfcc, work / "cache", progress=False)
        feature_seconds = time.perf_counter() - start
        test = data.subset("test")
        truth = test.targets
        start = time.perf_counter()
        base = baseline(data, store_mfcc, store_mel)
        base_seconds = time.perf_counter() - start
        start = time.perf_counter()
        run = train.train(data, preset, work / f"run-{name}", force=True, cache_dir=work / "cache", progress=False)
        train_seconds = time.perf_counter() - start
        scores, _ = Tagger.load([run.folder]).tag_dataset(test, work / "cache", progress=False)
        results[name] = {
            "clips_train": int((data.split == "train").sum()), "clips_test": len(test),
            "feature_seconds": feature_seconds, "train_seconds": train_seconds,
            "fast": {"map@3": metrics.map_at_k(truth, scores), "lwlrap": metrics.lwlrap(truth, scores)},
            "baseline": {"map@3": metrics.map_at_k(truth, base), "lwlrap": metrics.lwlrap(truth, base),
                         "seconds": base_seconds},
        }
        print(f"  trained {name}", file=sys.stderr)
    return results


def print_quality(results: dict) -> None:
    print("\nfast preset vs baseline on the dev corpus (test splits)\n")
    print("| set | train clips | fast: train min | fast MAP@3 | fast lwlrap | baseline MAP@3 | baseline lwlrap | target |")
    print("|---|---|---|---|---|---|---|---|")
    targets = {"single-label": "MAP@3 ≥ 0.95, ≤ 10 min", "multi-label": "lwlrap ≥ 0.80, ≤ 10 min"}
    for name, r in results.items():
        f, b = r["fast"], r["baseline"]
        print(f"| {name} | {r['clips_train']} | {r['train_seconds'] / 60:.1f} | {f['map@3']:.4f} | "
              f"{f['lwlrap']:.4f} | {b['map@3']:.4f} | {b['lwlrap']:.4f} | {targets[name]} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    p.add_argument("--work", type=Path, default=Path("/tmp/soundtag-bench-train"))
    p.add_argument("--seconds", type=float, default=3.0, help="time per speed measurement")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--sets", nargs="+", default=["single-label", "multi-label"], help="quality: which sets")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(speed_of_model(args.one, args.seconds)))
        return
    figures = {"cpu_threads_available": torch.get_num_threads()}
    if not args.skip_speed:
        figures["speed"] = speed(args.seconds)
        print_speed(figures["speed"])
    if not args.skip_quality:
        figures["quality"] = quality(args.corpus or dev_corpus_path(), args.work, args.sets)
        print_quality(figures["quality"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
