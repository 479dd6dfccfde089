"""`cache info|prune|clear`: what the feature cache holds, dropping stale rows, removing old entries."""

from __future__ import annotations

from pathlib import Path

from tltool.engine import cache_upkeep
from tltool.engine.features import cache_dir


def cache_info(folder=None) -> tuple[Path, list]:
    """The cache folder (`folder`, else $TLTOOL_CACHE_DIR or ~/.cache/tltool/features) and its entries,
    most recently used first; each has `path`, `rows`, `stale_rows`, `size_bytes` and `last_used`."""
    root = Path(folder) if folder else cache_dir()
    return root, cache_upkeep.cache_entries(root)


def prune_cache(folder=None) -> dict:
    """Drop the rows of images changed or deleted since they were cached: {"stale_rows", "freed_bytes"}."""
    _, entries = cache_info(folder)
    freed = sum(cache_upkeep.prune(e) for e in entries)
    return {"stale_rows": sum(e.stale_rows for e in entries), "freed_bytes": freed}


def clear_cache(folder=None, older_than: float | None = None, dry_run: bool = False) -> dict:
    """Remove cache entries, all or those unused for more than `older_than` days (only list them if
    `dry_run`): {"entries", "size_bytes", "removed"}."""
    _, entries = cache_info(folder)
    chosen = cache_upkeep.older_than(entries, older_than)
    if not dry_run:
        for entry in chosen:
            cache_upkeep.remove(entry)
    return {"entries": len(chosen), "size_bytes": sum(e.size_bytes for e in chosen), "removed": not dry_run}
