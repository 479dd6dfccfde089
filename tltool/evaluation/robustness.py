"""Accuracy under small perturbations of the pixels: a measurement, not a defence.

An imperceptible change can move an image across a decision boundary. The report states how far: the
accuracy on labelled images after the fast gradient sign method (FGSM, Goodfellow et al., 2015: each pixel
moved by eps in the direction that raises the loss most) at eps = 1/255 and 4/255 of the pixel range, and
after Gaussian noise of the same two sizes as standard deviations. FGSM needs the model's gradients, so
it is measured on Keras models (a run directory or a .keras file), on at most MAX_IMAGES images.
"""

from __future__ import annotations

import numpy as np

FGSM_EPSILONS = (1 / 255, 4 / 255)
NOISE_SIGMAS = (4 / 255, 16 / 255)
MAX_IMAGES = 128


def sample(count: int, seed: int = 0) -> np.ndarray:
    """The indices (sorted) of at most MAX_IMAGES of `count` images, the same for the same seed."""
    if count <= MAX_IMAGES:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, MAX_IMAGES, replace=False))


def perturbed_accuracy(model, pixels: np.ndarray, labels: np.ndarray, seed: int = 0, batch_size: int = 32) -> dict:
    """Accuracy of the Keras `model` (uint8 pixels in, probabilities or {probabilities, ...} out) on `pixels`
    as they are, under FGSM and under Gaussian noise (fractions of the 0-255 range)."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = np.asarray(pixels, np.float32)
    labels = np.asarray(labels, np.int64)

    def probabilities(batch):
        out = model(batch, training=False)
        return out["probabilities"] if isinstance(out, dict) else out

    @tf.function
    def loss_sign(batch, y):
        with tf.GradientTape() as tape:
            tape.watch(batch)
            loss = keras.losses.sparse_categorical_crossentropy(y, probabilities(batch))
        return tf.sign(tape.gradient(loss, batch))

    predict = tf.function(lambda batch: tf.argmax(probabilities(batch), axis=1))

    def accuracy(images: np.ndarray) -> float:
        images = np.clip(images, 0, 255).astype(np.float32)
        hits = [predict(tf.constant(images[i:i + batch_size])).numpy() for i in range(0, len(images), batch_size)]
        return float((np.concatenate(hits) == labels).mean())

    sign = np.concatenate([loss_sign(tf.constant(x[i:i + batch_size]), tf.constant(labels[i:i + batch_size])).numpy()
                           for i in range(0, len(x), batch_size)])
    return {
        "images": int(len(x)),
        "clean": accuracy(x),
        "fgsm": {f"{eps * 255:g}/255": accuracy(x + eps * 255 * sign) for eps in FGSM_EPSILONS},
        "gaussian_noise": {f"{s * 255:g}/255": accuracy(x + rng.normal(0, s * 255, x.shape)) for s in NOISE_SIGMAS},
    }
