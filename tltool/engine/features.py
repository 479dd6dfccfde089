"""The fast frozen stage: backbone features computed once per image, cached on disk, reused.

With the backbone frozen, running every image through it in every epoch repeats identical work. Here
each image (and each of K augmented views, if asked) goes through the feature extractor once; the head
then trains on the stored vectors for all stage-1 epochs.

The cache is a folder per *extractor key* (backbone, weights content, image size, preprocessing, head
mode and pooling, and for stage 2's activations the cut they are taken at: see activations.py). Inside it, each extraction appends one shard: `NAME.npy` (float16 rows) and
`NAME.json` (the file key of each row: path, size, modification time, view). A shard counts only once
its index is written, and both are written atomically, so a crash never leaves an entry later runs trust.
A changed file has a new key, so only it is recomputed. Shards are memory-mapped: reading the rows of one
split never loads the whole cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltool import interrupts
from tltool.data.folders import SkipLog
from tltool.data.pipelines import DecodedImages, decoded_batches
from tltool.files import atomic_save, atomic_write_text

CACHE_FORMAT = 1
#: Touched whenever an entry is opened, so `tltool cache clear --older-than` knows what is still in use.
LAST_USED_FILE = "last_used"
#: Held shared by every run using the entry, exclusively by `cache clear` and `prune` (see outputs.FileLock).
LOCK_FILE = ".lock"


def cache_dir(configured: str | None = None) -> Path:
    """The feature cache folder: the recipe's `train.cache_dir`, else $TLTOOL_CACHE_DIR, else ~/.cache/tltool."""
    chosen = configured or os.environ.get("TLTOOL_CACHE_DIR") or "~/.cache/tltool/features"
    return Path(chosen).expanduser()


def extractor_key(backbone: str, weights_fingerprint: str, image_size: int, preprocessing: str,
                  head_mode: str, pooling: str, cut: str = "", reads: str = "") -> str:
    """A short hash of everything that changes what the feature extractor computes (`cut`: the layer whose
    activations are cached instead of the pooled features; `reads`: where the head reads the backbone and on
    which grid, "" for its top read globally, as before `head.layer` existed)."""
    parts = [CACHE_FORMAT, backbone, weights_fingerprint, image_size, preprocessing, head_mode, pooling]
    text = json.dumps(parts + ([cut] if cut else []) + ([reads] if reads else []))
    return f"{backbone}-{image_size}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def augmentation_key(recipe) -> str:
    """A short hash of what decides the augmented views of a run: the augmentation settings and the seed."""
    text = json.dumps([dataclasses.asdict(recipe.augment), recipe.seed], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_key(path: str, view: str = "") -> str:
    """Identity of one image file's content as far as the cache is concerned (and of one view of it):
    `path|size|mtime_ns|view`, read back by `key_is_current`."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{view}"


def key_is_current(key: str) -> bool | None:
    """Whether the file a `file_key` names still has the size and modification time it had: True, False
    (changed, or gone from a folder that is still there), or None when that cannot be told (its folder is
    not reachable: a drive not mounted, a share offline, no permission), which is not proof it is gone."""
    parts = key.rsplit("|", 3)
    if len(parts) != 4:
        return False
    path, size, mtime_ns, _view = parts
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False if _reachable(os.path.dirname(path)) else None
    except OSError:
        return None
    return str(st.st_size) == size and str(st.st_mtime_ns) == mtime_ns


def _reachable(folder: str) -> bool:
    """Whether `folder` can be listed: a class folder that is gone (or a drive that is not mounted) is not."""
    try:
        os.listdir(folder)
        return True
    except OSError:
        return False


class FeatureCache:
    """Shards of float16 feature rows, looked up by file key."""

    def __init__(self, root: Path, touch: bool = True, lock: bool = True):
        """Open (or create) the entry `root`; with `lock`, hold a shared lock on it until `close`, so that
        `tltool cache clear` and `prune` leave it alone while this run reads and adds rows."""
        self.root = Path(root)
        self._lock = open_entry(self.root) if lock else None
        if not lock:
            self.root.mkdir(parents=True, exist_ok=True)
        if touch:
            try:
                (self.root / LAST_USED_FILE).touch()
            except OSError:  # a read-only shared cache is still a cache
                pass
        self._index: dict[str, tuple[str, int]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        for index_file in sorted(self.root.glob("*.json")):
            shard = index_file.stem
            if not (self.root / f"{shard}.npy").is_file():
                continue
            try:
                keys = json.loads(index_file.read_text())
            except (OSError, ValueError):
                continue  # an unreadable index is ignored: its rows are recomputed
            if _shard_rows(self.root / f"{shard}.npy") != len(keys):
                continue  # a damaged array (cut short, overwritten): ignored too
            for row, key in enumerate(keys):
                self._index[key] = (shard, row)

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        return list(self._index)

    def _array(self, shard: str) -> np.ndarray:
        if shard not in self._arrays:
            self._arrays[shard] = np.load(self.root / f"{shard}.npy", mmap_mode="r")
        return self._arrays[shard]

    def get(self, keys: list[str]) -> np.ndarray:
        """Rows for `keys` (all must be present), as one float16 array, read shard by shard."""
        if not keys:
            return np.zeros((0, 0), np.float16)
        first = self._array(self._index[keys[0]][0])
        out = np.empty((len(keys), first.shape[1]), np.float16)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            shard, row = self._index[key]
            by_shard.setdefault(shard, []).append((i, row))
        for shard, pairs in by_shard.items():
            dest, rows = zip(*pairs)
            order = np.argsort(rows)  # ascending reads from the memory map
            out[np.asarray(dest)[order]] = self._array(shard)[np.asarray(rows)[order]]
        return out

    def add(self, keys: list[str], rows: np.ndarray) -> None:
        """Store a new shard: array first, then its index, each atomically."""
        if not keys:
            return
        shard = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        atomic_save(self.root / f"{shard}.npy", lambda tmp: np.save(tmp, rows.astype(np.float16)))
        atomic_write_text(self.root / f"{shard}.json", json.dumps(keys))
        for row, key in enumerate(keys):
            self._index[key] = (shard, row)


    def rewrite_without(self, dropped) -> None:
        """Rewrite the entry as one shard of the rows whose keys are not in `dropped`.

        The new shard is complete before any old one goes, and an old shard's index goes before its array
        (a shard without an index is never read), so a crash at any point leaves a readable entry.
        """
        old_indexes = sorted(self.root.glob("*.json"))
        live = [key for key in self.keys() if key not in dropped]
        rows = self.get(live)  # a copy: the shards it came from are about to go
        self._index, self._arrays = {}, {}
        self.add(live, rows)
        for index in old_indexes:
            index.unlink(missing_ok=True)
            index.with_suffix(".npy").unlink(missing_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self, min_age_s: float = 3600) -> None:
        """Files of crashed writes or rewrites; only old ones, as another run may be writing a shard now."""
        cutoff = time.time() - min_age_s
        for leftover in [*self.root.glob(".*.tmp*"), *self.root.glob("*.npy")]:
            orphan = leftover.name.startswith(".") or not leftover.with_suffix(".json").is_file()
            if orphan and leftover.stat().st_mtime < cutoff:
                leftover.unlink(missing_ok=True)


def _shard_rows(path: Path) -> int | None:
    """How many rows the shard's array holds, from its .npy header, if the file is whole; else None.

    Shards are written atomically, so a damaged one was damaged afterwards (a disk or a copy gone wrong);
    reading it would fail in the middle of a run. Reads the header only.
    """
    try:
        with open(path, "rb") as f:
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
            shape, _, dtype = read_header(f)
            data_start = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, KeyError):  # KeyError: a format version np.save does not write for us
        return None
    if len(shape) != 2 or size != data_start + int(np.prod(shape)) * dtype.itemsize:
        return None
    return int(shape[0])


def open_entry(root: Path):
    """A shared lock on the cache entry `root` (created if missing), or None where it cannot be locked (a
    read-only shared cache). Retries when the entry was removed between opening and locking its lock file."""
    from tltool.outputs import FileLock

    for _ in range(10):
        root.mkdir(parents=True, exist_ok=True)
        try:
            lock = FileLock(root / LOCK_FILE, shared=True, wait=True)
        except FileNotFoundError:  # removed by `cache clear` between mkdir and open
            continue
        except PermissionError:
            return None
        if lock.still_current():
            return lock
        lock.release()
    return None


@dataclass
class FeatureStats:
    computed: int = 0      # images (views included) run through the extractor in this call
    seconds: float = 0.0   # time spent computing (not reading)
    rows_per_view: list = field(default_factory=list)  # rows returned for view 0, 1, ... in that order


_FORWARD_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _forward_fn(extractor, image_size: int, jit_compile: bool):
    """The compiled pixels -> features function of `extractor`, traced once and reused across calls.

    Tracing a backbone costs about a second, as much as extracting a hundred small images; one input
    signature with a free batch size covers the smaller last batch too, and one function serves the plain
    images and every augmented view (the augmentation runs before it).
    """
    import tensorflow as tf

    fns = _FORWARD_FNS.setdefault(extractor, {})
    key = (image_size, jit_compile)
    if key not in fns:
        @tf.function(input_signature=[tf.TensorSpec((None, image_size, image_size, 3), tf.float32)],
                     jit_compile=jit_compile)
        def forward(pixels):
            return extractor(pixels, training=False)

        fns[key] = forward
    return fns[key]


def compute_features(extractor, paths: list[str], image_size: int, batch_size: int, skips: SkipLog,
                     augment=None, jit_compile: bool = False, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Run images through `extractor` in batches, streamed; `progress(images done)` after each batch.

    Returns (features float16 [N, D], ok bool [N]); rows of files that failed to decode are zero and
    `ok` is False for them (they are recorded in `skips`).
    """
    outputs, oks = compute_outputs(extractor, paths, image_size, batch_size, skips, augment, jit_compile, progress)
    return outputs[0], oks


def compute_outputs(extractor, paths: list[str], image_size: int, batch_size: int, skips: SkipLog, augment=None,
                    jit_compile: bool = False, progress=None,
                    decoded: DecodedImages | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """`compute_features` for an extractor with one or several outputs: ([float16 [N, D_i] per output], ok).
    `decoded`: images kept decoded between passes over the same files (see `DecodedImages`)."""
    import tensorflow as tf

    forward = _forward_fn(extractor, image_size, jit_compile)
    outputs = [np.zeros((len(paths), int(out.shape[-1])), np.float16) for out in extractor.outputs]
    oks = np.zeros((len(paths),), bool)
    start = 0
    for pixels, ok in decoded_batches(paths, image_size, batch_size, skips, decoded=decoded):
        interrupts.check()
        n = len(pixels)
        x = tf.cast(pixels, tf.float32)
        # Eagerly: a few ops per batch, where a traced function per augmentation would trace the backbone again.
        results = forward(x if augment is None else augment(x, training=True))
        for out, result in zip(outputs, results if isinstance(results, (list, tuple)) else [results]):
            out[start:start + n] = result.numpy().astype(np.float16)
        oks[start:start + n] = ok
        start += n
        if progress is not None:
            progress(start)
    return outputs, oks


#: Images per cache shard while extracting: each shard is stored as soon as it is computed, so an
#: interrupted extraction keeps what it did (a resumed run computes only the rest).
SHARD_IMAGES = 1024


def compute_in_shards(extractor, cache: FeatureCache | None, paths: list[str], keys: list[str], image_size: int,
                      batch_size: int, skips: SkipLog, augment=None, verbose: int = 1,
                      jit_compile: bool = False,
                      decoded: DecodedImages | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """`compute_outputs` of `paths`, the first output stored in the cache (under `keys`) shard by shard, under
    one progress bar. Returns ([each output's rows, float16], ok)."""
    outputs, oks = [], []
    update = progress_bar(len(paths), verbose)
    for start in range(0, len(paths), SHARD_IMAGES):
        chunk = slice(start, start + SHARD_IMAGES)
        progress = None if update is None else (lambda done, offset=start: update(offset + done))
        out, ok = compute_outputs(extractor, paths[chunk], image_size, batch_size, skips, augment=augment,
                                  jit_compile=jit_compile, progress=progress, decoded=decoded)
        if cache is not None:
            cache.add([k for k, good in zip(keys[chunk], ok) if good], out[0][ok])
        outputs.append(out)
        oks.append(ok)
    return [np.concatenate(rows) for rows in zip(*outputs)], np.concatenate(oks)


def progress_bar(total: int, verbose: int):
    """A Keras progress bar over `total` images, as a callable(images done); None when not verbose."""
    import keras

    return keras.utils.Progbar(total, unit_name="image", verbose=verbose).update if verbose else None


def views_by_image(feats: np.ndarray, index: np.ndarray, rows_per_view: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """`cached_features` rows regrouped as [images, views, D], keeping the images present in every view.

    Returns (features, image index into the paths). A file that failed to decode is missing from every view.
    """
    bounds = np.cumsum([0, *rows_per_view])
    per_view = [dict(zip(index[a:b].tolist(), range(a, b))) for a, b in zip(bounds[:-1], bounds[1:])]
    images = sorted(set(per_view[0]).intersection(*per_view[1:]))
    rows = np.array([[view[i] for view in per_view] for i in images], dtype=np.int64).reshape(len(images), -1)
    return feats[rows], np.asarray(images, dtype=np.int64)


class _Mirror:
    """The horizontal mirror image, as a deterministic "augmentation" of a feature extractor."""

    def __call__(self, pixels, training=True):
        import tensorflow as tf

        return tf.reverse(pixels, axis=[2])


MIRROR = _Mirror()
#: The view name of the mirror images: the flip measurement's mirrored copies, reused as the first view.
MIRROR_VIEW = "aug:mirror-horizontal:1"


def view_plan(views: int, augment, augment_key: str, mirror_first: bool = False) -> list[tuple[str, object]]:
    """(view name in the cache keys, augmentation) of view 0 (the plain image) and views 1..`views`.

    With `mirror_first` (a horizontal flip is on), view 1 is the plain mirror image: one of the images the
    random flip makes, and the very rows `augment.flip: auto` computed to measure the flip, so a run that
    measured it does not extract them again."""
    plan = [("", None)]
    for v in range(1, views + 1):
        plan.append((MIRROR_VIEW, MIRROR) if v == 1 and mirror_first else (f"aug:{augment_key}:{v}", augment))
    return plan


def cached_features(extractor, cache: FeatureCache | None, paths: list[str], image_size: int, batch_size: int,
                    skips: SkipLog, views: int = 0, augment=None, augment_key: str = "", verbose: int = 1,
                    log=print, jit_compile: bool = False, mirror_first: bool = False,
                    decoded: DecodedImages | None = None) -> tuple[np.ndarray, np.ndarray, FeatureStats]:
    """Features of `paths` (view 0 = the plain image, views 1..K augmented: see `view_plan`), from the cache
    where possible; with `decoded`, each image is decoded once for all its views (see `DecodedImages`).

    Returns (features float16 [M, D], row_index int [M] into `paths`, stats). Files that failed to decode
    are left out. Without a cache (None) everything is computed.
    """
    stats = FeatureStats()
    all_feats, all_index = [], []
    for v, (view, view_augment) in enumerate(view_plan(views, augment, augment_key, mirror_first)):
        keys = [file_key(p, view) for p in paths]
        missing = [i for i, k in enumerate(keys) if cache is None or k not in cache]
        if missing:
            what = (f"{len(missing)} images" if v == 0 else f"the mirror images of {len(missing)} images"
                    if view == MIRROR_VIEW else f"augmented view {v}/{views} of {len(missing)} images")
            if verbose:
                log(f"Computing features of {what} ({len(paths) - len(missing)} already cached).")
            t0 = time.perf_counter()
            (feats,), ok = compute_in_shards(extractor, cache, [paths[i] for i in missing],
                                             [keys[i] for i in missing], image_size, batch_size, skips,
                                             view_augment, verbose, jit_compile, decoded)
            stats.seconds += time.perf_counter() - t0
            stats.computed += len(missing)
        else:
            feats, ok = None, None
        if cache is not None:
            present = [i for i, k in enumerate(keys) if k in cache]
            all_feats.append(cache.get([keys[i] for i in present]))
            all_index.append(np.asarray(present, dtype=np.int64))
        else:
            all_feats.append(feats[ok])
            all_index.append(np.asarray(missing, dtype=np.int64)[ok])
        stats.rows_per_view.append(len(all_index[-1]))
    if verbose and stats.computed == 0:
        extra = f" and their {views} augmented view(s) each" if views else ""
        log(f"Features of all {len(paths)} images{extra} found in the cache: extraction skipped.")
    return np.concatenate(all_feats), np.concatenate(all_index), stats
