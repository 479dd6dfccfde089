"""Input pipelines: decoded batches for a model's forward pass, `tf.data` streams for training, augmentation.

Every pipeline decodes with Pillow (`data.images.load_image`), so training, feature extraction,
evaluation and export checks see the same pixels for the same file. A file that fails to decode is
recorded in the `SkipLog` and left out, so one broken file never stops an epoch.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from tltool.data.folders import SkipLog
from tltool.data.images import ImageReadError, load_image


def _load_or_blank(path: str, image_size: int, skips: SkipLog) -> tuple[np.ndarray, bool]:
    """(pixels, True), or black pixels and False for a file that cannot be decoded (recorded in `skips`)."""
    try:
        return load_image(path, image_size), True
    except ImageReadError as exc:
        skips.add(path, str(exc), exc.kind)
        return np.zeros((image_size, image_size, 3), np.uint8), False


#: The most memory `DecodedImages` holds. Images are kept only while several passes over the same files run
#: (at most about a thousand images, since views are drawn only for small training sets: 150 MB at 224 px).
DECODED_BUDGET_MB = 256


class DecodedImages:
    """Decoded images kept between passes over the same files: a small training set goes through the backbone
    several times (the plain images, their mirror images, each augmented view), and decoding a photo costs
    as much as a third to a half of its forward pass through a small backbone on a CPU (more for large
    JPEGs and for PNGs, which Pillow cannot decode at reduced scale). Holds at most `budget_mb`; images past
    it are decoded again in each pass. Only the thread that iterates `decoded_batches` touches it."""

    def __init__(self, budget_mb: float = DECODED_BUDGET_MB):
        self._pixels: dict = {}
        self._budget = int(budget_mb * 1e6)
        self._free = self._budget

    def get(self, path: str, image_size: int) -> np.ndarray | None:
        return self._pixels.get((path, image_size))

    def keep(self, path: str, image_size: int, pixels: np.ndarray) -> None:
        if (path, image_size) not in self._pixels and pixels.nbytes <= self._free:
            self._pixels[(path, image_size)] = pixels
            self._free -= pixels.nbytes

    def clear(self) -> None:
        self._pixels.clear()
        self._free = self._budget


def decoded_batches(paths: list[str], image_size: int, batch_size: int, skips: SkipLog, ahead: int = 2,
                    decoded: DecodedImages | None = None):
    """Yield (uint8 pixels [B, S, S, 3], ok [B]) batches, decoded by a thread pool while the model runs.

    Plain threads beat a `tf.data` map here: Pillow releases the GIL while decoding, and the pool stays off
    TensorFlow's own thread pools, which the forward pass needs. At most `ahead` batches wait decoded,
    so memory does not grow with the number of images. With `decoded`, images it holds are not decoded
    again, and the images decoded here are added to it (within its budget).
    """
    def load(path):
        return _load_or_blank(path, image_size, skips)

    def submit(chunk):
        held = [decoded.get(p, image_size) if decoded is not None else None for p in chunk]
        return [(pixels, True) if pixels is not None else pool.submit(load, p) for p, pixels in zip(chunk, held)]

    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tltool-decode") as pool:
        pending = collections.deque((chunk, submit(chunk)) for chunk in chunks[:ahead + 1])
        next_chunk = ahead + 1
        while pending:
            chunk, handles = pending.popleft()
            results = [r.result() if isinstance(r, Future) else r for r in handles]
            if next_chunk < len(chunks):
                pending.append((chunks[next_chunk], submit(chunks[next_chunk])))
                next_chunk += 1
            if decoded is not None:
                for path, (pixels, ok) in zip(chunk, results):
                    if ok:
                        decoded.keep(path, image_size, pixels)
            yield np.stack([r[0] for r in results]), np.array([r[1] for r in results], bool)


def _decoder(image_size: int, skips: SkipLog):
    """A `tf.data` map function: path -> (uint8 pixels, ok). Failures give black pixels and ok=False."""
    import tensorflow as tf

    def _decode(path_bytes):
        return _load_or_blank(path_bytes.decode("utf-8"), image_size, skips)

    def decode(path):
        pixels, ok = tf.numpy_function(_decode, [path], [tf.uint8, tf.bool], stateful=False)
        pixels.set_shape((image_size, image_size, 3))
        ok.set_shape(())
        return pixels, ok

    return decode


def _is_ok(pixels, label, ok):
    return ok


def _drop_ok(pixels, label, ok):
    return pixels, label


def image_dataset(paths, labels, image_size: int, batch_size: int, skips: SkipLog, num_classes: int,
                  shuffle: bool = False, seed: int | None = None, augment=None):
    """A batched, prefetched `tf.data.Dataset` of (float32 pixels 0..255, one-hot label), streamed from disk.

    Files that fail to decode are recorded in `skips` and dropped from the stream, so a broken file never
    stops an epoch. `augment` is a Keras layer (or None) applied per batch.
    """
    import tensorflow as tf

    decode = _decoder(image_size, skips)

    def load(path, label):
        pixels, ok = decode(path)
        return tf.cast(pixels, tf.float32), tf.one_hot(label, num_classes), ok

    ds = tf.data.Dataset.from_tensor_slices(([str(p) for p in paths], np.asarray(labels, dtype=np.int32)))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(_is_ok).map(_drop_ok)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def augmentation_layer(cfg, seed: int | None = None):
    """A Keras `Sequential` of random layers for the recipe's `augment` section, or None if all are off."""
    import keras

    layers = []
    if cfg.flip != "none":  # `auto` not yet measured (images streamed): the usual horizontal flip
        layers.append(keras.layers.RandomFlip("horizontal" if cfg.flip == "auto" else cfg.flip, seed=seed))
    if cfg.rotation > 0:
        layers.append(keras.layers.RandomRotation(cfg.rotation, fill_mode="reflect", seed=seed))
    if cfg.zoom > 0:
        layers.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="reflect", seed=seed))
    if cfg.translation > 0:
        layers.append(keras.layers.RandomTranslation(cfg.translation, cfg.translation, fill_mode="reflect",
                                                     seed=seed))
    if cfg.contrast > 0:
        layers.append(keras.layers.RandomContrast(cfg.contrast, seed=seed))
    if not layers:
        return None
    return keras.Sequential(layers, name="augment")
