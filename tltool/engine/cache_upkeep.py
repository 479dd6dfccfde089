"""Looking after the feature cache: what it holds, dropping rows of changed files, clearing old entries.

The cache (see features.py) only grows: a changed or deleted image leaves its old rows behind, and a
backbone, size or weights file no longer used leaves a whole entry. `tltool cache info|prune|clear`
works on these summaries.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tltool.errors import CacheError
from tltool.engine.features import LAST_USED_FILE, LOCK_FILE, FeatureCache, key_is_current
from tltool.outputs import FileLock

#: Folder names `features.extractor_key` makes (backbone-size-hash): nothing else under the root is touched.
ENTRY_NAME = re.compile(r"^[A-Za-z0-9_.]+-\d+-[0-9a-f]{16}$")


@dataclass
class CacheEntry:
    """One extractor's folder: backbone-size-hash."""

    path: Path
    rows: int                 # feature rows stored
    stale_keys: frozenset     # file keys of rows whose files changed or are gone
    size_bytes: int
    last_used: float          # seconds since the epoch

    @property
    def stale_rows(self) -> int:
        return len(self.stale_keys)


def cache_entries(root: Path) -> list[CacheEntry]:
    """The entries under the cache folder `root`, most recently used first."""
    with _os_errors("read"):
        return _cache_entries(Path(root))


def prune(entry: CacheEntry) -> int | None:
    """Rewrite `entry` without the rows of changed or deleted files (or remove it if nothing is left).

    Returns the bytes freed, or None when a run is using the entry (it is left as it is).
    """
    with _os_errors("prune"), _exclusive(entry) as free:
        return _prune(entry) if free else None


def remove(entry: CacheEntry) -> bool:
    """Remove `entry`; False (and nothing removed) when a run is using it."""
    with _os_errors("remove"), _exclusive(entry) as free:
        if free:
            shutil.rmtree(entry.path)
        return free


@contextlib.contextmanager
def _exclusive(entry: CacheEntry):
    """Yields whether the entry could be locked exclusively (no run holds it); holds that lock meanwhile."""
    try:
        lock = FileLock(entry.path / LOCK_FILE)
    except BlockingIOError:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def older_than(entries: list[CacheEntry], days: float | None) -> list[CacheEntry]:
    """The entries not used for more than `days` (all of them when `days` is None)."""
    if days is None:
        return list(entries)
    cutoff = time.time() - days * 86400
    return [e for e in entries if e.last_used < cutoff]


@contextlib.contextmanager
def _os_errors(what: str):
    try:
        yield
    except OSError as exc:
        raise CacheError(f"Could not {what} the feature cache at {exc.filename or 'its folder'}: "
                         f"{exc.strerror or exc}. Check the folder's permissions and free space.") from None


def _cache_entries(root: Path) -> list[CacheEntry]:
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and ENTRY_NAME.match(p.name)):
        keys = FeatureCache(folder, touch=False, lock=False).keys()
        stale = frozenset(key for key in keys if key_is_current(key) is False)
        marker = folder / LAST_USED_FILE
        last_used = (marker if marker.is_file() else folder).stat().st_mtime
        entries.append(CacheEntry(folder, len(keys), stale, _folder_size(folder), last_used))
    return sorted(entries, key=lambda e: -e.last_used)


def _prune(entry: CacheEntry) -> int:
    if entry.stale_rows == 0:
        return 0
    if entry.stale_rows == entry.rows:
        shutil.rmtree(entry.path)
        return entry.size_bytes
    marker = entry.path / LAST_USED_FILE
    if not marker.is_file():  # keep the entry's age: rewriting it must not make it look recently used
        marker.touch()
        os.utime(marker, (entry.last_used, entry.last_used))
    FeatureCache(entry.path, touch=False, lock=False).rewrite_without(entry.stale_keys)
    return entry.size_bytes - _folder_size(entry.path)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != LOCK_FILE)
