"""Audio decoding: any supported file to mono float32 at a target rate.

The only module that opens audio files. Every failure is an `AudioError` that
names the file and says what is wrong with it; damage that still leaves audio
to use (a cut-off OGG or MP3, digital silence) is a warning naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import SoundtagError

log = logging.getLogger("soundtag")

# libsndfile's note on a data chunk shorter than its header says
TRUNCATED = re.compile(r"^data\s*:\s*(\d+) \(should be (\d+)\)", re.M)
# libsndfile's notes on an Ogg stream that stops short of its last page
OGG_CUT = re.compile(r"ended unexpectedly|lacks an end-of-stream|Junk after the last page")
# how mpg123 starts the messages it prints on stderr (they name no file)
DECODER_LINE = re.compile(r"^(\[\S+\.c:\S+\] |Note: |Warning: |Error: )")
MPEG_SUFFIXES = {".mp1", ".mp2", ".mp3", ".mpga"}
SHORT_BY = 0.01  # decoded this fraction short of the header's frame count: a cut-off file
_stderr = threading.Lock()  # the stderr descriptor is the process's: one captured decode at a time


class AudioError(SoundtagError):
    """A clip that cannot be used, with its path and the reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class AudioInfo:
    """What the file header says about a clip."""

    duration: float
    sample_rate: int
    channels: int
    format: str
    subtype: str


def info(path: str | Path) -> AudioInfo:
    """Read a clip's header without decoding it."""
    _check_file(path)
    try:
        with _decoder_messages(path):
            i = sf.info(os.fsencode(path))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(path, _reason(e)) from None
    return AudioInfo(i.duration, i.samplerate, i.channels, i.format, i.subtype)


def load(path: str | Path, sample_rate: int = 44100, trim_db: float | None = 60.0) -> np.ndarray:
    """Decode `path` to mono float32 at `sample_rate`, trimming leading and
    trailing silence quieter than `trim_db` below the peak (None keeps it)."""
    _check_file(path)
    try:
        with _decoder_messages(path), sf.SoundFile(os.fsencode(path)) as f:
            data, rate, extra, promised = _read(f), f.samplerate, f.extra_info, f.frames
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(path, _reason(e)) from None
    _check_complete(path, data, rate, extra, promised)
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or infinite samples")
    if not data.any():
        log.warning("%s: digital silence (every sample is zero)", path)
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    if trim_db is not None:
        wave = trim(wave, trim_db)
    return np.ascontiguousarray(wave, dtype=np.float32)


def trim(wave: np.ndarray, top_db: float = 60.0, frame: int = 2048, hop: int = 512) -> np.ndarray:
    """Cut leading and trailing audio whose centred-frame power is `top_db`
    below the loudest frame: the rule of `librosa.effects.trim`, in plain numpy
    (librosa's version costs seconds of JIT start-up per process). A silent
    clip is kept whole."""
    if len(wave) == 0:
        return wave
    if frame % (2 * hop) == 0:  # a frame is whole hops, its centre padding too: sum each hop's energy once
        power = _frame_energy(wave, frame // hop, hop) / frame
    else:
        padded = np.pad(wave, frame // 2)
        frames = np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop][: 1 + len(wave) // hop]
        power = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / frame
    floor = max(power.max(), 1e-10) * 10.0 ** (-top_db / 10.0)
    loud = np.flatnonzero(np.maximum(power, 1e-10) > floor)
    if len(loud) == 0:
        return wave
    return wave[loud[0] * hop : min(len(wave), (loud[-1] + 1) * hop)]


def _frame_energy(wave: np.ndarray, hops: int, hop: int) -> np.ndarray:
    """Energy of each centred frame of `hops` hops (frame i covers hops
    i - hops/2 … i + hops/2 - 1 of the wave, zero past its ends), without
    copying the wave into a padded one."""
    whole = len(wave) // hop
    body = wave[: whole * hop].reshape(whole, hop)
    tail = wave[whole * hop :]
    energy = np.zeros(whole + hops, np.float64)  # hops/2 zero hops, the wave's hops, its tail, zero hops
    lead = hops // 2
    energy[lead : lead + whole] = (body[:, None, :] @ body[:, :, None]).ravel()  # in float32, as librosa sums
    energy[lead + whole] = np.dot(tail, tail)
    return np.convolve(energy, np.ones(hops), "valid")


def _read(f: sf.SoundFile) -> np.ndarray:
    """All frames as float32 [frames, channels]; 16-bit PCM is scaled in numpy,
    which gives the same values as libsndfile's conversion in half the time."""
    if f.subtype != "PCM_16":
        return f.read(dtype="float32", always_2d=True)
    return np.multiply(f.read(dtype="int16", always_2d=True), np.float32(1 / 32768), dtype=np.float32)


def _check_complete(path: str | Path, data: np.ndarray, rate: int, extra: str, promised: int) -> None:
    """Fail on a cut-off WAV or a file with no samples; warn on a cut-off stream
    that still decodes (OGG, MP3), giving what the header promised."""
    cut = TRUNCATED.search(extra)
    if cut:
        raise AudioError(path, f"truncated: the header promises {cut[1]} bytes of audio, the file holds {cut[2]}")
    ogg_cut = OGG_CUT.search(extra)
    if data.size == 0:
        raise AudioError(path, "truncated: the Ogg stream ends early and none of its audio decodes" if ogg_cut
                         else "no audio samples (empty or truncated file)")
    if ogg_cut:
        log.warning("%s: truncated: the Ogg stream stops without its end-of-stream page; %.2f s decoded",
                    path, len(data) / rate)
    elif len(data) < promised * (1 - SHORT_BY):
        log.warning("%s: truncated: the header promises %.2f s, %.2f s decoded", path, promised / rate,
                    len(data) / rate)


def _check_file(path: str | Path) -> None:
    """Fail on anything but a readable, non-empty regular file, saying what it is."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise AudioError(path, _missing(p, e)) from None
    except ValueError:  # a NUL byte in the name
        raise AudioError(path, "not a valid file name (it holds a NUL byte)") from None
    if stat.S_ISDIR(st.st_mode):
        raise AudioError(path, "is a directory, not an audio file")
    if not stat.S_ISREG(st.st_mode):
        raise AudioError(path, "not a regular file (a pipe, socket or device)")
    if st.st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    if not os.access(p, os.R_OK):
        raise AudioError(path, "permission denied (the file is not readable)")


def _missing(p: Path, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop (the link leads back to itself)"
    if error.errno == errno.EACCES:
        return "permission denied (a folder on its path is not searchable)"
    if p.is_symlink():
        return f"broken symlink (its target {os.readlink(p)} does not exist)"
    return "file not found"


def _reason(error: Exception) -> str:
    """Why libsndfile could not decode a file that exists and is readable."""
    text = str(error).split(":")[-1].strip() or type(error).__name__
    if "does not exist or is not a regular file" in text:  # mpg123 found no MPEG frames
        text = "no decodable MPEG audio frames"
    return f"not readable as audio ({text})"


@contextlib.contextmanager
def _decoder_messages(path: str | Path) -> Iterator[None]:
    """Log what mpg123 prints on stderr while it reads `path`, naming the file
    (its own messages name none); other files pass straight through."""
    if not _is_mpeg(path):
        yield
        return
    with _stderr, tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            _report_decoder(path, sink.read().decode(errors="replace"))


def _report_decoder(path: str | Path, text: str) -> None:
    """Decoder lines become one warning; anything else written meanwhile goes back to stderr."""
    lines = text.splitlines(keepends=True)
    said = [line.strip() for line in lines if DECODER_LINE.match(line.strip())]
    rest = "".join(line for line in lines if not DECODER_LINE.match(line.strip()))
    if rest:
        os.write(2, rest.encode())
    if said:
        more = f" (and {len(said) - 1} more decoder messages)" if len(said) > 1 else ""
        log.warning("%s: MP3 decoder: %s%s", path, said[0], more)


def _is_mpeg(path: str | Path) -> bool:
    """Whether libsndfile hands the file to mpg123: an MPEG suffix, an ID3 tag or a frame sync."""
    if Path(path).suffix.lower() in MPEG_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(3)
    except OSError:
        return False
    return head == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)
