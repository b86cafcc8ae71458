"""Training benchmark: speed of every model, and quality of the `fast` preset.

    python bench/train.py [--corpus DIR] [--out FILE] [--skip-speed] [--skip-quality]
                          [--models LABEL ...] [--variants fp32 fp32+cl bf16+cl] [--threads 1 2] [--seconds S]

Speed: parameters, and training and inference clips/s at 64 mels × 2-s crops (172
frames; the waveform model: 2 s at 16 kHz), fp32, fp32 + channels_last and bf16 +
channels_last, on 1 and 2 threads, each model in its own process so its peak RSS is
its own; a training step includes the losses of a model's extra heads. Quality: the `fast` preset on the dev corpus
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
          "vgg": ("vgg", {}), "vgg16-bn": ("vgg", {"convs": [2, 2, 3, 3, 3], "pool": "max"}),
          "vgg ntu": ("vgg", {"act": "leaky_relu", "dense_act": "selu"}),
          "mobilenetv2": ("mobilenetv2", {}), "resnet": ("resnet", {}),
          "xresnet18": ("xresnet", {}), "xresnet34": ("xresnet", {"depth": 34}), "xresnet50": ("xresnet", {"depth": 50}),
          "xresnet18 mish+sa+blur": ("xresnet", {"act": "mish", "attention": [3], "pool": "maxblur"}),
          "auxcnn": ("auxcnn", {}), "wavecnn": ("wavecnn", {})}
VARIANTS = {"fp32": (False, False), "fp32+cl": (False, True), "bf16+cl": (True, True)}
BATCH, FRAMES, MELS, CLASSES, WAVE_RATE = 32, 172, 64, 41, 16000


def takes_waveform(name: str) -> bool:
    from soundtag.models import MODELS as REGISTRY
    return getattr(REGISTRY.get(name), "INPUT", "spectrogram") == "waveform"


def model_input(name: str, memory: torch.memory_format) -> torch.Tensor:
    """A batch of 2-s inputs: log-mels in dB, or 16-kHz samples for a waveform model."""
    if takes_waveform(name):
        return torch.rand(BATCH, 1, 1, 2 * WAVE_RATE).contiguous(memory_format=memory) * 2 - 1
    return torch.randn(BATCH, 1, MELS, FRAMES).contiguous(memory_format=memory) * 20 - 40


def speed_of_model(label: str, seconds: float, variants: list[str], thread_counts: list[int]) -> dict:
    """clips/s of one model for the variants and thread counts asked (run in a child process)."""
    from soundtag.models import create_model
    name, params = MODELS[label]
    rows = 1 if takes_waveform(name) else MELS
    out = {"params": sum(p.numel() for p in create_model(name, CLASSES, n_mels=rows, **params).parameters())}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for variant in variants:
            bf16, channels_last = VARIANTS[variant]
            torch.manual_seed(0)
            model = create_model(name, CLASSES, n_mels=rows, **params)
            memory = torch.channels_last if channels_last else torch.contiguous_format
            model.to(memory_format=memory)
            x = model_input(name, memory)
            y = torch.randint(0, CLASSES, (BATCH,))
            opt = torch.optim.AdamW(model.parameters(), 1e-3)
            cast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

            def train_step() -> None:
                with cast():
                    logits, _, *extra = model(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                for weight, aux in (extra[0] if extra else []):
                    loss = loss + weight * torch.nn.functional.cross_entropy(aux.float(), y)
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


def speed(seconds: float, labels: list[str], variants: list[str], thread_counts: list[int]) -> dict:
    results = {}
    for label in labels:
        child = subprocess.run([sys.executable, __file__, "--one", label, "--seconds", str(seconds),
                                "--variants", *variants, "--threads", *map(str, thread_counts)],
                               capture_output=True, text=True, check=True)
        results[label] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  measured {label}", file=sys.stderr)
    return results


def print_speed(results: dict, variants: list[str], thread_counts: list[int]) -> None:
    columns = [f"{v} {t}t" for t in thread_counts for v in variants]
    print("\nTraining / inference clips/s (64 mels × 2 s, batch 32)\n")
    print("| model | params | " + " | ".join(columns) + " | peak RSS MB |")
    print("|---|---|" + "---|" * (len(columns) + 1))
    for label, r in results.items():
        cells = [f"{r[c]['train']:.0f} / {r[c]['infer']:.0f}" for c in columns]
        print(f"| {label} | {r['params'] / 1e6:.2f} M | " + " | ".join(cells) + f" | {r['peak_rss_mb']:.0f} |")


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
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), metavar="LABEL",
                   help="speed: which models (default: all)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="speed: which precisions and memory formats")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="speed: torch thread counts")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(speed_of_model(args.one, args.seconds, args.variants, args.threads)))
        return
    figures = {"cpu_threads_available": torch.get_num_threads()}
    if not args.skip_speed:
        figures["speed"] = speed(args.seconds, args.models, args.variants, args.threads)
        print_speed(figures["speed"], args.variants, args.threads)
    if not args.skip_quality:
        figures["quality"] = quality(args.corpus or dev_corpus_path(), args.work, args.sets)
        print_quality(figures["quality"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"\nfigures written to {args.out}")


if __name__ == "__main__":
    main()
