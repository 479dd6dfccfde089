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
    """Drop the rows of images changed or deleted since they were cached: {"stale_rows", "freed_bytes",
    "in_use"}. Rows of images whose folder cannot be reached (a drive not mounted) are kept, and so are the
    entries a running tltool is using (`in_use` counts them)."""
    _, entries = cache_info(folder)
    freed = {id(e): cache_upkeep.prune(e) for e in entries}
    done = [e for e in entries if freed[id(e)] is not None]
    return {"stale_rows": sum(e.stale_rows for e in done), "freed_bytes": sum(freed[id(e)] for e in done),
            "in_use": len(entries) - len(done)}


def clear_cache(folder=None, older_than: float | None = None, dry_run: bool = False) -> dict:
    """Remove cache entries, all or those unused for more than `older_than` days (only list them if
    `dry_run`): {"entries", "size_bytes", "removed", "in_use"}. An entry a running tltool is using is kept
    (counted in `in_use`), never pulled from under it."""
    _, entries = cache_info(folder)
    chosen = cache_upkeep.older_than(entries, older_than)
    in_use = [] if dry_run else [e for e in chosen if not cache_upkeep.remove(e)]
    gone = [e for e in chosen if e not in in_use]
    return {"entries": len(gone), "size_bytes": sum(e.size_bytes for e in gone), "removed": not dry_run,
            "in_use": len(in_use)}
