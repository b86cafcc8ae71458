"""Where the dev corpus is: $SOUNDTAG_DEV_CORPUS, else built once into the temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

BUILDER = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "build_dev.py"


def dev_corpus_path() -> Path:
    """The dev corpus folder, building it with ../shared/corpus/build_dev.py when needed."""
    given = os.environ.get("SOUNDTAG_DEV_CORPUS")
    if given and (Path(given) / "SUMMARY.md").is_file():
        return Path(given)
    out = Path(tempfile.gettempdir()) / "soundtag-dev-corpus"
    if not (out / "SUMMARY.md").is_file():
        if not BUILDER.is_file():
            sys.exit(f"no dev corpus: set SOUNDTAG_DEV_CORPUS or provide {BUILDER}")
        subprocess.run([sys.executable, str(BUILDER), str(out)], check=True)
    return out
