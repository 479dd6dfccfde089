"""The out-of-distribution score as part of the model: a second output, `ood_score`, next to the probabilities.

The score is the cosine distance from an image's backbone features to the nearest of a bank of training
features (L2-normalised rows; centroids for large training sets), divided by the threshold that keeps
`trust.keep_rate` of the validation images: above 1.0 the image is unlike anything the model was trained
on. Dividing by the threshold inside the model lets every export carry the whole decision with no extra
file: `is_unknown = ood_score > 1`.

Images with nothing in them (a blank frame, an empty scan, a white page, sensor noise) are what distances
miss: a small backbone can map a flat field near the middle of its features, nearer to the training images
than many real photos are (MobileNetV2 at 96 px on ants vs bees: blank frames at a quarter of the
threshold). The model therefore also holds the features of a few flat and noise fields (`blanks`, chosen
in `engine/trust.py`), and an image nearer to one of them than to any bank row scores above 1 too:
`max(distance / threshold, clip(1 + BLANK_GATE * (blank_similarity - nearest_similarity), 0, BLANK_CAP))`.
The gate is below 0 for images clearly nearer the training images, whose scores stay as they were.

The branch is made of built-in layers only (unit normalisation, a frozen Dense holding the bank, a max),
so `model.keras` still loads in plain Keras and the converters (TFLite, ONNX) see ordinary ops; its values
stay in [0, max(2 / threshold, BLANK_CAP)], which int8 quantization represents well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROBABILITIES = "probabilities"
OOD_SCORE = "ood_score"
#: The name of the OOD scorer inside the inference model (features -> ood_score)
OOD_LAYER = "ood"
#: `ood_score` above this means out of distribution (the threshold is folded into the score)
UNKNOWN_ABOVE = 1.0
#: What `predict` calls an image out of distribution (or below --threshold)
UNKNOWN_LABEL = "unknown"


#: How steeply the blank gate rises once an image is nearer a blank image than any training image: at a
#: similarity margin of 0.05 towards the training images (real photos' 5th percentile: 0.05 at 96 px,
#: 0.19 at 160 px on ants vs bees) it is below 0.
BLANK_GATE = 20.0
#: The most the gate adds (an int8 export represents the score on a fixed range).
BLANK_CAP = 2.0


def build_ood_scorer(bank: np.ndarray, threshold: float, blanks: np.ndarray | None = None):
    """features [N, D] -> ood_score [N, 1]: (1 - the largest cosine similarity to a bank row) / threshold,
    raised above 1 for features nearer a row of `blanks` (unit features of flat and noise fields) than any bank
    row."""
    import keras

    scale = 1.0 / max(float(threshold), 1e-6)
    features = keras.Input((np.shape(bank)[1],), name="features")
    # float32 throughout, under mixed precision too: cosines near 1 need more than float16's 3 digits.
    unit = keras.layers.UnitNormalization(name="ood_unit_features", dtype="float32")(features)
    nearest = _largest_similarity(unit, bank, "ood_bank", "ood_nearest")
    distance = keras.layers.Dense(1, trainable=False, dtype="float32", name="ood_distance")
    score = distance(nearest)
    distance.set_weights([np.full((1, 1), -scale, np.float32), np.full((1,), scale, np.float32)])
    if blanks is not None and len(blanks):
        blank = _largest_similarity(unit, blanks, "ood_blanks", "ood_nearest_blank")
        gate = keras.layers.Dense(1, trainable=False, dtype="float32", name="ood_blank_gate")
        margin = gate(keras.layers.Concatenate(dtype="float32")([blank, nearest]))
        gate.set_weights([np.array([[BLANK_GATE], [-BLANK_GATE]], np.float32), np.ones((1,), np.float32)])
        clipped = keras.layers.ReLU(max_value=BLANK_CAP, dtype="float32")(margin)
        score = keras.layers.Maximum(dtype="float32", name="ood_score_with_blanks")([score, clipped])
    return keras.Model(features, score, name=OOD_LAYER)


def _largest_similarity(unit, rows: np.ndarray, name: str, pooled_name: str):
    """The largest cosine similarity of unit features to `rows` (unit vectors [N, D]): a frozen Dense, a max."""
    import keras

    rows = np.asarray(rows, np.float32)
    layer = keras.layers.Dense(len(rows), use_bias=False, trainable=False, dtype="float32", name=name)
    column = keras.layers.Reshape((len(rows), 1), dtype="float32")(layer(unit))
    # Set as weights, not given as Constant initializers: an initializer's value is also written into the
    # model's config.json, where a bank of 2048 x 1280 features took 58 MB of JSON to write and to parse on
    # every load of model.keras.
    layer.set_weights([rows.T])
    return keras.layers.GlobalMaxPooling1D(name=pooled_name, dtype="float32")(column)


def with_ood_output(tm, scorer):
    """The inference model of `tm` (a TransferModel): pixels -> {probabilities, ood_score}, sharing its layers.

    Its three parts stay nested models (`feature_extractor`, `head`, `ood`), so that converters can take
    them apart again (see `tflite_friendly_score`)."""
    import keras

    pixels = keras.Input(tm.model.input_shape[1:], name="pixels")
    features = tm.feature_extractor(pixels)
    return keras.Model(pixels, {PROBABILITIES: tm.head(features), OOD_SCORE: scorer(features)},
                       name=tm.model.name)


def ood_parts(model):
    """(feature_extractor, head, bank [D, rows], scale = 1 / threshold, blanks [D, rows] or None) of a model
    `with_ood_output` built (models saved before the blanks existed have none)."""
    scorer = model.get_layer(OOD_LAYER)
    bank = scorer.get_layer("ood_bank").get_weights()[0]
    scale = float(scorer.get_layer("ood_distance").get_weights()[1][0])  # the bias is +1/threshold
    has_blanks = any(layer.name == "ood_blanks" for layer in scorer.layers)
    blanks = scorer.get_layer("ood_blanks").get_weights()[0] if has_blanks else None
    return model.get_layer("feature_extractor"), model.get_layer("head"), bank, scale, blanks


def tflite_friendly_score(features, bank: np.ndarray, scale: float, blanks: np.ndarray | None = None):
    """The same ood_score in TensorFlow ops that the TFLite converter maps to int8-capable kernels that
    XNNPACK (LiteRT's default CPU delegate) runs: L2_NORMALIZATION, one FULLY_CONNECTED holding the scaled
    bank, REDUCE_MIN. Keras's own unit normalisation becomes SQUARE (no int8 kernel) and RSQRT, and a
    separate 1x1 layer for the scale failed XNNPACK's preparation in int8 models."""
    import tensorflow as tf

    unit = tf.math.l2_normalize(tf.cast(features, tf.float32), axis=1, epsilon=1e-12)
    distances = tf.matmul(unit, tf.constant(-scale * bank, tf.float32)) + scale  # (1 - cos) / threshold
    score = tf.reduce_min(distances, axis=1, keepdims=True)
    if blanks is None:
        return score
    # The blank gate, 1 + G * (blank_similarity - nearest_similarity), with nearest_similarity =
    # 1 - score / scale: one more FULLY_CONNECTED and REDUCE_MAX, then elementwise ops.
    blank = tf.reduce_max(tf.matmul(unit, tf.constant(blanks, tf.float32)), axis=1, keepdims=True)
    gate = BLANK_GATE * blank + (BLANK_GATE / scale) * score + (1.0 - BLANK_GATE)
    return tf.maximum(score, tf.clip_by_value(gate, 0.0, BLANK_CAP))


def split_outputs(outputs) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, ood_score [N] or None) from whatever a model returned: one array (models without the
    score, as every model exported before it existed), or a dict of both."""
    if isinstance(outputs, dict):
        score = outputs.get(OOD_SCORE)
        return np.asarray(outputs[PROBABILITIES]), None if score is None else np.asarray(score).reshape(-1)
    return np.asarray(outputs), None


@dataclass
class Scores:
    """A model's answer for a batch of images: probabilities, and the OOD score where the model has one."""

    probabilities: np.ndarray      # [N, classes]
    ood_score: np.ndarray | None   # [N]; above UNKNOWN_ABOVE the image is out of distribution; None: no score

    def out_of_distribution(self, limit: float = UNKNOWN_ABOVE) -> np.ndarray:
        """[N] bool: the images whose score is above `limit` (all False for a model without the score)."""
        if self.ood_score is None:
            return np.zeros(len(self.probabilities), bool)
        return self.ood_score > limit


def scores_of(predictor, pixels: np.ndarray) -> Scores:
    """`predictor.scores(pixels)`, or for a predictor-like object with only `predict`, its probabilities."""
    if hasattr(predictor, "scores"):
        return predictor.scores(pixels)
    return Scores(np.asarray(predictor.predict(pixels)), None)
