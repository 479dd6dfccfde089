"""Image folders: scanning class folders, seeded stratified splits, class weights.

An image folder has one sub-folder per class. Hidden files and non-image files are ignored; files that
look like images but cannot be read are skipped and recorded with their reason in a `SkipLog`, both at
scan time (header) and at decode time, so one broken file never stops a run.
"""

from __future__ import annotations

import re
import threading
import unicodedata
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltool.data.images import ImageReadError, io_workers, is_image_name, probe
from tltool.errors import DataError


class SkipLog:
    """Thread-safe record of skipped files and why; `tf.data` workers add to it while decoding."""

    def __init__(self):
        self._lock = threading.Lock()
        self._reasons: dict[str, tuple[str, str]] = {}

    def add(self, path: str | Path, reason: str, kind: str) -> None:
        """Record `path` as skipped (the first reason given for a file is kept)."""
        with self._lock:
            self._reasons.setdefault(str(path), (reason, kind))

    def __contains__(self, path) -> bool:
        return str(path) in self._reasons

    def __len__(self) -> int:
        return len(self._reasons)

    def as_list(self) -> list[dict]:
        with self._lock:
            return [{"path": p, "reason": r, "kind": k} for p, (r, k) in sorted(self._reasons.items())]


@dataclass
class ImageFolder:
    """The readable images of a folder: paths and integer labels in the order of `classes`."""

    root: Path
    classes: list[str]
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counter = Counter(self.labels)
        return {name: counter.get(i, 0) for i, name in enumerate(self.classes)}

    def subset(self, indices) -> "ImageFolder":
        return ImageFolder(self.root, self.classes, [self.paths[i] for i in indices],
                           [self.labels[i] for i in indices], self.empty_classes)

    def __len__(self) -> int:
        return len(self.paths)

    def without(self, skips: "SkipLog") -> "ImageFolder":
        """The images not in `skips` (files found broken while decoding are in it after a pass over them)."""
        return self.subset([i for i, p in enumerate(self.paths) if p not in skips])


def image_files(folder: Path) -> list[Path]:
    """The image-named files under a class folder (sub-folders included), hidden files and folders left out.

    A dangling link is listed too: it fails its header check and is reported as skipped with the reason,
    instead of vanishing from the data without a word (`data check` counts it broken as well).
    """
    return sorted(p for p in folder.rglob("*") if (p.is_file() or _dangling(p)) and is_image_name(p)
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def check_folder(root: Path, role: str = "training") -> None:
    """Raise a one-line DataError unless `root` is an existing folder."""
    if root.is_file():
        raise DataError(f"The {role} folder {root} is a file. Pass a folder with one sub-folder per class.")
    if not root.is_dir():
        raise DataError(f"The {role} folder {root} does not exist. Pass a folder with one sub-folder per class.")


def bad_class_name(name: str) -> str | None:
    """Why a class folder name cannot be a class (it would corrupt labels.txt or a file name), else None."""
    if any(ord(c) < 32 or ord(c) == 127 or unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return "contains a control character or a line separator (e.g. a line break, U+0085, U+2028)"
    if name != name.strip():
        return "starts or ends with white space"
    return None


def case_clashes(names) -> list[list[str]]:
    """Sets of class names that differ only in letter case (e.g. `Ants`, `ants`), each sorted.

    They are two classes on a case-sensitive file system, but almost always one class split by mistake, and
    on macOS's and Windows's usual file systems the folders cannot coexist (a copy there merges or fails).
    """
    by_folded: dict[str, list[str]] = {}
    for name in names:
        by_folded.setdefault(name.casefold(), []).append(name)
    return [sorted(same) for same in by_folded.values() if len(same) > 1]


def class_folders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _header_ok(path: Path) -> ImageReadError | None:
    """None if the file opens as an image (header only, cheap), else why it does not."""
    try:
        probe(path)
        return None
    except ImageReadError as exc:
        return exc


def scan_folder(root: str | Path, skips: SkipLog | None = None, classes: list[str] | None = None,
                role: str = "training") -> ImageFolder:
    """List the images of a class-per-sub-folder tree.

    Args:
        root: the folder.
        skips: where unreadable files are recorded (a new log if None).
        classes: the class list to use (e.g. the training classes, for a validation folder); sub-folders
            outside it are an error. None: the sub-folders with at least one readable image.
        role: how the folder is named in messages ("training", "validation", "test").

    Raises:
        DataError: missing folder, no class folders, fewer than two classes with images, unknown classes.
    """
    root = Path(root).expanduser()
    skips = skips if skips is not None else SkipLog()
    check_folder(root, role)
    folders = class_folders(root)
    if not folders:
        raise DataError(f"The {role} folder {root} has no class sub-folders. Put each class's images in a "
                        f"sub-folder named after the class.")
    for folder in folders:
        why = bad_class_name(folder.name)
        if why:
            raise DataError(f"Class folder {folder.name!r} in {root} {why}; rename it (class names end up in "
                            f"labels.txt, one per line).")
    for same in case_clashes(folder.name for folder in folders):
        warnings.warn(f"Class folders {', '.join(same)} in {root} differ only in letter case: they are trained as "
                      f"separate classes, but are probably one (and cannot coexist on macOS or Windows). Merge "
                      f"them into one folder.", UserWarning, stacklevel=2)
    found: dict[str, list[str]] = {}
    candidates = {folder.name: image_files(folder) for folder in folders}
    # Header checks are I/O bound: threads overlap the disk reads of large folders.
    with ThreadPoolExecutor(max_workers=io_workers()) as pool:
        for name, files in candidates.items():
            found[name] = []
            for path, reason in zip(files, pool.map(_header_ok, files)):
                if reason is not None:
                    skips.add(path, str(reason), reason.kind)
                else:
                    found[name].append(str(path))
    empty = [name for name, files in found.items() if not files]
    for name in empty:
        warnings.warn(f"Class folder `{name}` in {root} has no readable images: it is left out.", UserWarning,
                      stacklevel=2)
    if classes is None:
        classes = [name for name, files in found.items() if files]
        if len(classes) < 2:
            raise DataError(f"The {role} folder {root} has {len(classes)} class(es) with readable images; "
                            f"at least 2 are needed to train a classifier.")
    else:
        unknown = [name for name, files in found.items() if files and name not in classes]
        if unknown:
            raise DataError(f"The {role} folder {root} has classes the training data does not: "
                            f"{', '.join(unknown)}. Its sub-folders must be among: {', '.join(classes)}.")
    index = {name: i for i, name in enumerate(classes)}
    out = ImageFolder(root, list(classes), empty_classes=empty)
    for name in classes:
        for path in found.get(name, []):
            out.paths.append(path)
            out.labels.append(index[name])
    if not out.paths:
        raise DataError(f"The {role} folder {root} has no readable images.")
    return out


def group_key(path: str, pattern: str | None) -> str:
    """The split group of a file: the regex match on its name (group 1 if the regex has one)."""
    if pattern is None:
        return path
    name = Path(path).name
    match = re.search(pattern, name)
    if not match:
        return path
    return match.group(1) if match.groups() else match.group(0)


def stratified_split(folder: ImageFolder, val_fraction: float, seed: int,
                     group_by: str | None = None) -> tuple[ImageFolder, ImageFolder]:
    """Seeded split that keeps each class's share and never separates files of one group.

    The result depends only on the file list, the seed and the fraction (not on scan order or the
    machine). Every class with at least two groups gets at least one in each part.
    """
    rng = np.random.default_rng(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label in range(len(folder.classes)):
        groups: dict[str, list[int]] = {}
        for i, (path, y) in enumerate(zip(folder.paths, folder.labels)):
            if y == label:
                groups.setdefault(group_key(path, group_by), []).append(i)
        keys = sorted(groups)
        rng.shuffle(keys)
        n_val = int(round(len(keys) * val_fraction))
        if len(keys) >= 2:
            n_val = min(max(n_val, 1), len(keys) - 1)
        else:
            n_val = 0
        for k in keys[:n_val]:
            val_idx.extend(groups[k])
        for k in keys[n_val:]:
            train_idx.extend(groups[k])
    return folder.subset(sorted(train_idx)), folder.subset(sorted(val_idx))


def balanced_class_weights(labels, num_classes: int) -> dict[int, float]:
    """n_samples / (n_classes * n_class_samples), as scikit-learn's "balanced"; absent classes get 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    total = counts.sum()
    return {i: (float(total) / (num_classes * c) if c else 1.0) for i, c in enumerate(counts)}
