"""soundtag: train audio taggers on labelled sound collections and tag new audio."""

__version__ = "0.1.0"
