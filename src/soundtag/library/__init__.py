"""The sound library: a collection's tags, scores and embeddings in SQLite
(`soundtag index`), searched by label (`soundtag search`) and by similarity
(`soundtag similar`). See `Library`."""

from .db import Hit, LibraryError, Row
from .engine import Report
from .library import Library

__all__ = ["Hit", "Library", "LibraryError", "Report", "Row"]
