"""Offline augmentation copies: pitch-shifted and time-stretched versions of
every training clip, computed once into the feature store.

A config's `copies` lists the variants, each a mapping with `pitch`
(semitones, default 0) and `stretch` (a rate: 1.1 plays 10% faster and so
makes a shorter clip; default 1), e.g. `[{pitch: -2}, {pitch: 2}, {stretch: 0.9}]`.
Every clip of the training table gets one copy per variant: a row with the
source's file, labels, origin, weight, fold and training folds, and
the variant's key (`pitch=2`, `stretch=0.9`, `pitch=-1,stretch=1.1`) in its
`variant` column. The store keys a copy's features by the file's identity, the
front end and the variant, so copies are computed once and shared by every run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import librosa
import numpy as np

from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from .clips import ClipTable

LIMITS = {"pitch": (-12.0, 12.0), "stretch": (0.5, 2.0)}  # an octave either way; half to double speed


@dataclass(frozen=True)
class Variant:
    """One way to remake a clip: shifted by `pitch` semitones, played `stretch` times as fast."""

    pitch: float = 0.0
    stretch: float = 1.0

    def key(self) -> str:
        """The variant as text, e.g. `pitch=-1,stretch=1.1` (parts at their default left out)."""
        parts = [(name, value) for name, value, default in (("pitch", self.pitch, 0), ("stretch", self.stretch, 1))
                 if value != default]
        return ",".join(f"{name}={_number(value)}" for name, value in parts)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """The variant a `key()` names."""
        try:
            pairs = dict(part.split("=") for part in text.split(","))
            return cls(**{name: float(value) for name, value in pairs.items()})
        except (ValueError, TypeError):
            raise DataError(f"clip variant {text!r} is not of the form pitch=SEMITONES,stretch=RATE") from None

    def apply(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """The clip remade: one phase-vocoder time stretch (librosa) by `stretch`
        over the pitch ratio, then resampled (soxr) by the pitch ratio, so that a
        pitch-only variant equals `librosa.effects.pitch_shift` and a stretch-only
        one `librosa.effects.time_stretch`, and both at once cost one stretch.
        Raises ValueError when the clip cannot be remade."""
        ratio = 2.0 ** (self.pitch / 12)
        out = wave
        try:
            if self.stretch != ratio:  # (equal: tape speed, the resample alone)
                out = librosa.effects.time_stretch(out, rate=self.stretch / ratio)
            if self.pitch:
                out = librosa.resample(out, orig_sr=sample_rate * ratio, target_sr=sample_rate, res_type="soxr_hq")
        except librosa.util.exceptions.ParameterError as e:
            raise ValueError(str(e)) from None
        out = librosa.util.fix_length(out, size=round(len(wave) / self.stretch))
        return np.ascontiguousarray(out, dtype=np.float32)


def _number(value: float) -> str:
    """The shortest text that reads back as `value`: 2, -1.5, 0.9."""
    return repr(float(value)).removesuffix(".0")


def variants(spec: Sequence[dict[str, Any]] | None) -> list[Variant]:
    """The variants a config's `copies` asks for (none for null), checked:
    a one-line ConfigError names the entry and option that is wrong."""
    if spec is not None and not isinstance(spec, list):
        raise ConfigError(f"copies must be a list of variants such as [{{pitch: 2}}, {{stretch: 0.9}}], not {spec!r}")
    out: list[Variant] = []
    for i, entry in enumerate(spec or []):
        where = f"copies[{i}]"
        if not isinstance(entry, dict) or not entry:
            raise ConfigError(f"{where} must be a mapping with pitch (semitones) and/or stretch (a rate), "
                              f"e.g. {{pitch: 2}}, not {entry!r}")
        unknown = sorted(map(str, set(entry) - set(LIMITS)))
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(LIMITS)}")
        for name, value in entry.items():
            low, high = LIMITS[name]
            if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
                unit = "semitones" if name == "pitch" else "(a rate: 1.1 plays 10% faster)"
                raise ConfigError(f"{where}.{name} must be a number from {low:g} to {high:g} {unit}, not {value!r}")
        variant = Variant(**{name: float(value) for name, value in entry.items()})
        if not variant.key():
            raise ConfigError(f"{where} is the clip itself (pitch 0, stretch 1); give another pitch or stretch")
        if variant in out:
            raise ConfigError(f"{where} repeats copies[{out.index(variant)}] ({variant.key()})")
        out.append(variant)
    return out


def add(table: ClipTable, made: Sequence[Variant]) -> ClipTable:
    """`table` followed by one copy of each of its clips (copies aside) per
    variant: the source's file, name, labels, origin, weight, fold and training
    folds, so that origin options (weights, losses, batch shares) apply to copies
    as to their sources. Called once the folds are drawn, so each copy follows its source."""
    sources = table.select(~table.is_copy)
    for variant in made:
        table = table.join(replace(sources, variant=[variant.key()] * len(sources)))
    return table


def transforms(table: ClipTable) -> list[Variant | None] | None:
    """Each row's variant for the feature store (None: the clip as it is), or
    None when the table holds no copies."""
    if not any(table.variant):
        return None
    parsed = {text: Variant.parse(text) for text in set(table.variant) if text}
    return [parsed[text] if text else None for text in table.variant]
