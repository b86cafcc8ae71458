"""Shared fixtures: the real-audio dev corpus, a few real clips, and a private cache."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BUILDER = Path(__file__).parents[1].parent / "shared" / "corpus" / "build_dev.py"
# A few demo training clips, tonal and noisy, of 0.3 to 2.2 s.
CLIP_NAMES = ("d000000.ogg", "d000004.ogg", "d000013.ogg", "d000029.ogg", "d000091.ogg", "d000108.ogg")


def _is_corpus(path: Path) -> bool:
    return all((path / name).is_file() for name in ("SUMMARY.md", "train.csv", "multilabel/train_curated.csv"))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point SOUNDTAG_CACHE at a temporary folder so no test writes to the user's cache."""
    root = tmp_path_factory.mktemp("soundtag-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOUNDTAG_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def dev_corpus() -> Path:
    """The dev corpus: $SOUNDTAG_DEV_CORPUS, else built once into the temp folder."""
    given = os.environ.get("SOUNDTAG_DEV_CORPUS")
    if given and _is_corpus(Path(given)):
        return Path(given)
    out = Path(tempfile.gettempdir()) / "soundtag-dev-corpus"
    if _is_corpus(out):
        return out
    if not BUILDER.is_file():
        pytest.skip(f"dev corpus builder {BUILDER} not found and SOUNDTAG_DEV_CORPUS not set")
    subprocess.run([sys.executable, str(BUILDER), str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="session")
def real_clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of a few real clips, the demo's decoded into 16-bit WAVs (read-only by convention)."""
    import soundfile as sf
    from helpers import DEMO

    folder = tmp_path_factory.mktemp("real-clips")
    for name in CLIP_NAMES:
        wave, rate = sf.read(DEMO / "audio_train" / name, dtype="float32")
        sf.write(folder / f"{Path(name).stem}.wav", wave, rate, subtype="PCM_16")
    return folder


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty feature-cache root of the test's own."""
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for a module's tests: two threads on a busy 2-core
    machine can run a hundred times slower."""
    from helpers import one_torch_thread
    with one_torch_thread():
        yield
