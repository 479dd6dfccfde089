"""`data.json` in a run directory: exactly which images a run trained, validated and tested on.

Written when a run starts: the classes, and for each split every file with its label, size and
modification time, plus the files skipped while scanning. A resumed run checks the folders against it and
refuses, in one line naming what changed, to go on with other data (re-splitting a changed folder would
move images the head trained on into validation, and a renamed or added class would not match the
model). `export` takes its check images from it instead of re-splitting the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tltool.data.folders import ImageFolder, SkipLog
from tltool.errors import DataError
from tltool.files import atomic_write_json

MANIFEST_FILE = "data.json"
_SPLITS = ("train", "val", "test")


def write_manifest(run_dir: Path, split) -> None:
    """Record `split` (a SplitData) in RUN/data.json."""
    files = {}
    for name in _SPLITS:
        folder = getattr(split, name)
        files[name] = None if folder is None else [[p, y, *_stat(p)] for p, y in zip(folder.paths, folder.labels)]
    roots = {name: (str(getattr(split, name).root) if getattr(split, name) is not None else None) for name in _SPLITS}
    atomic_write_json(Path(run_dir) / MANIFEST_FILE, {"format": 1, "classes": split.train.classes,
                                                      "roots": roots, "files": files,
                                                      "skipped": split.skips.as_list()})


def read_manifest(run_dir: Path) -> dict | None:
    """The manifest of a run, or None for runs made before tltool wrote one."""
    path = Path(run_dir) / MANIFEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def manifest_split(manifest: dict):
    """The SplitData a manifest records (its skipped files in a new SkipLog)."""
    from tltool.engine.setup import SplitData

    skips = SkipLog()
    for entry in manifest["skipped"]:
        skips.add(entry["path"], entry["reason"], entry["kind"])
    folders = {}
    for name in _SPLITS:
        rows = manifest["files"][name]
        folders[name] = None if rows is None else ImageFolder(
            Path(manifest["roots"][name]), list(manifest["classes"]), [r[0] for r in rows], [r[1] for r in rows])
    return SplitData(folders["train"], folders["val"], folders["test"], skips)


def check_same_data(manifest: dict, current) -> None:
    """Raise a one-line DataError when `current` (the folders scanned now, a SplitData) differs from what
    the manifest recorded: classes, files added, removed or changed."""
    if current.train.classes != manifest["classes"]:
        before, now = manifest["classes"], current.train.classes
        gone, new = [c for c in before if c not in now], [c for c in now if c not in before]
        what = "; ".join(filter(None, [f"classes gone: {', '.join(gone)}" if gone else "",
                                       f"classes added: {', '.join(new)}" if new else ""])) or "class order changed"
        raise DataError(f"The data changed since this run started ({what}). Resuming needs the same images: "
                        f"restore them, or start a new run without --resume.")
    recorded = {row[0]: row for name in _SPLITS for row in (manifest["files"][name] or [])}
    now = {p for name in _SPLITS if getattr(current, name) is not None for p in getattr(current, name).paths}
    added = sorted(now - recorded.keys())
    removed = sorted(p for p in recorded if p not in now)
    changed = sorted(p for p, row in recorded.items() if p in now and list(_stat(p)) != row[2:])
    if added or removed or changed:
        parts = [f"{len(paths)} image(s) {verb} (e.g. {paths[0]})"
                 for verb, paths in (("added", added), ("removed", removed), ("changed", changed)) if paths]
        raise DataError(f"The data changed since this run started: {'; '.join(parts)}. Resuming needs the same "
                        f"images (a re-split would move training images into validation): restore them, or "
                        f"start a new run without --resume.")


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)
