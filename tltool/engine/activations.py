"""Stage 2 on cached activations: the frozen part of the backbone runs once per image and view, not every epoch.

When stage 2 unfreezes only the top blocks, everything below the cut (the end of the last frozen block)
is a fixed function: frozen, its BatchNorm in inference mode. Its output for each training image and
each augmented view is cached (an entry of the feature cache, keyed also by the cut), and stage 2 trains
the top blocks and the head on it: the same training as on those views, minus the repeated forward pass
through the frozen part. Stage 1's pooled features come from the same activations (the top blocks at
their pretrained weights), so each view costs one pass through the bottom of the backbone in all.

Stage 2 streams images instead, with a one-line reason, when the activations would not fit the recipe's
`fine_tune.activation_budget_mb` (0 turns caching off, for fresh augmentation on every step).
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass

import numpy as np


@dataclass
class CutModels:
    """The backbone split at `cut`, as Keras models sharing the layers (and weights) of the full model."""

    cut: str
    extractor: object   # pixels -> flattened activations at the cut
    features: object    # flattened activations -> pooled features (the top blocks)
    trainable: object   # flattened activations -> probabilities (the top blocks and the head)
    shape: tuple        # (H, W, C) of the activations

    @property
    def width(self) -> int:
        return int(np.prod(self.shape))


def split_at_cut(tm, cut: str) -> CutModels:
    """`tm`'s backbone split at the layer `cut` (a graph cut: see `backbones.graph_cuts`)."""
    import keras

    backbone = tm.backbone
    at_cut = backbone.get_layer(cut).output
    bottom = keras.Model(backbone.input, at_cut, name="below_cut")
    top = keras.Model(at_cut, backbone.output, name="above_cut")
    shape = tuple(int(d) for d in at_cut.shape[1:])
    pixels = keras.Input(tm.model.input_shape[1:], name="pixels")
    x = tm.preprocess(pixels) if tm.preprocess is not None else pixels
    extractor = keras.Model(pixels, keras.layers.Flatten()(bottom(x, training=False)), name="cut_extractor")
    flat = keras.Input((int(np.prod(shape)),), name="activations")
    activations = keras.layers.Reshape(shape)(flat)
    # As in the full model: a pretrained backbone in inference mode, a random one training its BatchNorm.
    pooled = top(activations, training=False) if tm.pretrained else top(activations)
    features = keras.Model(flat, pooled, name="above_cut_features")
    trainable = keras.Model(flat, tm.head(pooled), name="above_cut_and_head")
    return CutModels(cut, extractor, features, trainable, shape)


def activation_megabytes(width: int, train_images: int, views: int, val_images: int) -> float:
    """Float16 activations of every training view and validation image, in MB (disk and memory alike)."""
    return width * 2 * (train_images * (1 + views) + val_images) / 1e6


_TRACED_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_outputs(model, rows: np.ndarray, batch_size: int = 256, dtype=np.float32) -> np.ndarray:
    """`model` in inference mode on `rows` [N, width], each batch's outputs as `dtype` (float16 for cached
    rows: no float32 copy of them all). One traced function per model, reused by every call: eager calls
    run the model op by op (0.24 s for the validation rows of a MobileNetV2 trial, against 0.05 s traced),
    and a search's kept models are called once per trial."""
    import tensorflow as tf

    if model not in _TRACED_CALLS:
        held = weakref.ref(model)  # a strong reference would keep the key alive for ever
        _TRACED_CALLS[model] = tf.function(lambda batch: held()(tf.cast(batch, tf.float32), training=False),
                                           reduce_retracing=True)
    run = _TRACED_CALLS[model]
    out = [np.asarray(run(rows[i:i + batch_size]), dtype) for i in range(0, len(rows), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, int(np.prod(model.output_shape[1:]))), dtype)


def pooled_features(features_model, activations: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Stage 1's features from cached activations [..., width]: the top blocks at their current weights."""
    pooled = model_outputs(features_model, activations.reshape(-1, activations.shape[-1]), batch_size, np.float16)
    return pooled.reshape(*activations.shape[:-1], -1)


class PooledRows:
    """`pooled_features` through one features model, each distinct row computed once: the measured decisions
    pool the plain and mirrored rows, then every view (the plain and mirrored rows again), and stage 1 all of
    them once more. On 245 images with 4 views that repetition cost 0.7 s of a default finetune (MobileNetV2's
    top 2 blocks) and 1.8 s of a search (its top 6). Rows are known by a hash of their bytes, since each pass
    reads them from the cache anew."""

    def __init__(self, features_model):
        self.model = features_model
        self._pooled: dict[bytes, np.ndarray] = {}

    def __call__(self, activations: np.ndarray) -> np.ndarray:
        rows = activations.reshape(-1, activations.shape[-1])
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]
        new = {key: i for i, key in enumerate(keys) if key not in self._pooled}
        if new:
            found = pooled_features(self.model, rows[list(new.values())])
            self._pooled.update(zip(new, found))
        width = int(np.prod(self.model.output_shape[1:]))
        pooled = np.stack([self._pooled[key] for key in keys]) if keys else np.zeros((0, width), np.float16)
        return pooled.reshape(*activations.shape[:-1], width)


class ActivationsAt:
    """Activations at each of `cuts` from cached ones at a deeper cut `deep_cut`: the frozen blocks in between
    run once per row for all the cuts together. One cache at the deepest cut then serves every shallower one
    (as in `tune`), and three shallower cuts cost one pass down to the shallowest, not three."""

    def __init__(self, backbone, deep_cut: str, cuts: list[str]):
        import keras

        source = backbone.get_layer(deep_cut).output
        targets = [backbone.get_layer(cut).output for cut in cuts]
        middle = keras.Model(source, targets, name="between_cuts")
        flat = keras.Input((int(np.prod(source.shape[1:])),))
        outputs = middle(keras.layers.Reshape(tuple(int(d) for d in source.shape[1:]))(flat), training=False)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        outputs = [keras.layers.Flatten()(out) for out in outputs]
        self.bridge = keras.Model(flat, keras.layers.Concatenate()(outputs) if len(outputs) > 1 else outputs[0])
        self.widths = [int(np.prod(target.shape[1:])) for target in targets]

    def __call__(self, activations: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
        """For rows [..., width at the deep cut], the rows at each cut [..., width there], as float16: views
        into one array (a copy of each would hold them all twice for a moment)."""
        rows = model_outputs(self.bridge, activations.reshape(-1, activations.shape[-1]), batch_size, np.float16)
        parts = np.split(rows, np.cumsum(self.widths)[:-1], axis=1)
        return [part.reshape(*activations.shape[:-1], width) for part, width in zip(parts, self.widths)]
