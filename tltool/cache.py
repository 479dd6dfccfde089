"""Looking after the feature cache: what it holds, dropping rows of changed files, clearing old entries.

The cache (see features.py) only grows: a changed or deleted image leaves its old rows behind, and a
backbone, size or weights file no longer used leaves a whole entry. `tltool cache info|prune|clear`
works on these summaries.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tltool.features import LAST_USED_FILE, FeatureCache


@dataclass
class CacheEntry:
    """One extractor's folder: backbone-size-hash."""

    path: Path
    rows: int          # feature rows stored
    stale_rows: int    # rows of files that changed or are gone
    size_bytes: int
    last_used: float   # seconds since the epoch


def cache_entries(root: Path) -> list[CacheEntry]:
    """The entries under the cache folder `root`, most recently used first."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        keys = _stored_keys(folder)
        stale = sum(1 for key in keys if not _is_current(key))
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        marker = folder / LAST_USED_FILE
        last_used = (marker if marker.is_file() else folder).stat().st_mtime
        entries.append(CacheEntry(folder, len(keys), stale, size, last_used))
    return sorted(entries, key=lambda e: -e.last_used)


def prune(entry: CacheEntry) -> int:
    """Rewrite `entry` without the rows of changed or deleted files (or remove it if nothing is left).

    Returns the bytes freed.
    """
    if entry.stale_rows == 0:
        return 0
    if entry.stale_rows == entry.rows:
        remove(entry)
        return entry.size_bytes
    old_shards = sorted(entry.path.glob("*.json"))
    cache = FeatureCache(entry.path, touch=False)
    live = [key for key in cache.keys() if _is_current(key)]
    cache.add(live, cache.get(live))  # the new shard is complete before any old one goes
    for index in old_shards:  # index first: a shard without one is never read
        index.unlink(missing_ok=True)
        index.with_suffix(".npy").unlink(missing_ok=True)
    return entry.size_bytes - sum(p.stat().st_size for p in entry.path.iterdir() if p.is_file())


def remove(entry: CacheEntry) -> None:
    shutil.rmtree(entry.path)


def older_than(entries: list[CacheEntry], days: float | None) -> list[CacheEntry]:
    """The entries not used for more than `days` (all of them when `days` is None)."""
    if days is None:
        return list(entries)
    cutoff = time.time() - days * 86400
    return [e for e in entries if e.last_used < cutoff]


def _stored_keys(folder: Path) -> list[str]:
    keys: dict[str, None] = {}
    for index in sorted(folder.glob("*.json")):
        if not index.with_suffix(".npy").is_file():
            continue
        try:
            keys.update(dict.fromkeys(json.loads(index.read_text())))
        except (OSError, ValueError):
            continue
    return list(keys)


def _is_current(key: str) -> bool:
    """Whether the file a key names still has the size and modification time it had (see `file_key`)."""
    path, size, mtime_ns, _view = key.rsplit("|", 3)
    try:
        st = os.stat(path)
    except OSError:
        return False
    return str(st.st_size) == size and str(st.st_mtime_ns) == mtime_ns
