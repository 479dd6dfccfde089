"""Durable writes: every file tltool writes goes through here.

A file is written under a temporary name in its own folder, flushed and fsynced, renamed over the old
name, and then the folder is fsynced too, so that the rename itself survives a power cut. Readers see the
old file or the whole new one, never a part; and a state file written after another file can only be
found once that file is on disk (the order of durable writes is the order of the calls).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def fsync_dir(folder: Path) -> None:
    """Make the entries of `folder` (names created, renamed or removed in it) durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform or file system without directory handles: nothing more can be done
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (a folder a third-party writer filled), deepest first."""
    root = Path(root)
    if root.is_file():
        _fsync_file(root)
        return
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            _fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save(path: Path, write: Callable[[Path], Any]) -> None:
    """Have `write(tmp)` write a file (e.g. `model.save`, `np.save`), then publish it durably at `path`.

    The temporary name keeps the suffix of `path`: Keras and NumPy choose the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".weights.h5" if path.name.endswith(".weights.h5") else path.suffix  # what Keras insists on
    fd, name = tempfile.mkstemp(prefix=f".{path.name[:len(path.name) - len(suffix)]}.", suffix=f".tmp{suffix}",
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes files private (0600); outputs get the usual umask mode
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished folder `new` in place of `target` (which may exist), durably, without a moment
    where neither is on disk: the old one is renamed aside first and removed only once the new one is in."""
    new, target = Path(new), Path(target)
    fsync_tree(new)
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        aside.rmdir()
        os.replace(target, aside)
    os.replace(new, target)
    fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
