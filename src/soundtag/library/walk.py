"""Listing a folder's audio files, recursively, with what is wrong with the
entries that cannot be files: symlink loops, broken links, unreadable folders.
Folder symlinks are followed once each; one that leads back to a folder
already listed is recorded instead of entered again."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from ..datasets.folders import AUDIO_SUFFIXES


@dataclass(frozen=True)
class Listed:
    """An entry found under the folder: an audio file with its `os.stat`, or
    something that cannot be indexed with the reason."""

    path: str
    stat: os.stat_result | None
    reason: str = ""


def walk(folder: str) -> Iterator[Listed]:
    """Every audio file under `folder` (absolute paths, sorted by name within each
    folder), and the entries that stop the walk with their reason."""
    root = os.stat(folder)
    seen = {(root.st_dev, root.st_ino)}
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as found:
                entries = sorted(found, key=lambda e: os.fsencode(e.name))
        except OSError as e:
            yield Listed(current, None, f"folder not readable ({e.strerror})")
            continue
        folders = []
        for entry in entries:
            listed, folder_id = _entry(entry)
            if folder_id is None:
                if listed is not None:
                    yield listed
            elif folder_id in seen:
                yield Listed(entry.path, None, "symlink loop (the link leads to a folder already indexed)")
            else:
                seen.add(folder_id)
                folders.append(entry.path)
        pending.extend(reversed(folders))  # depth first, in name order


def _entry(entry: os.DirEntry) -> tuple[Listed | None, tuple[int, int] | None]:
    """(the file or the broken entry to record, None) or (None, the folder's identity to enter)."""
    try:
        st = entry.stat()  # follows symlinks
    except OSError as e:
        if not _is_audio(entry.name) and not (entry.is_symlink() and e.errno == errno.ELOOP):
            return None, None
        return Listed(entry.path, None, _reason(entry, e)), None
    if stat.S_ISDIR(st.st_mode):
        return None, (st.st_dev, st.st_ino)
    return (Listed(entry.path, st) if _is_audio(entry.name) else None), None


def _is_audio(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in AUDIO_SUFFIXES


def _reason(entry: os.DirEntry, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symlink loop (the link leads back to itself)"
    if entry.is_symlink() and error.errno == errno.ENOENT:
        return f"broken symlink (its target {os.readlink(entry.path)} does not exist)"
    return f"cannot be read ({error.strerror})"
