"""Keras helpers of the two stages: optimizers, compiling, a stage's callbacks, datasets of cached features, fit.

The stages themselves (what trains, on what) are in stages.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tltool.engine.callbacks import HistoryCSV, ResumableEarlyStopping, StopOnSignal

_OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}


def make_optimizer(name: str, learning_rate: float):
    import keras

    cls = getattr(keras.optimizers, _OPTIMIZERS[name])
    if name == "sgd":
        return cls(learning_rate=learning_rate, momentum=0.9)
    return cls(learning_rate=learning_rate)


def learning_rate_callback(learning_rate: float, schedule: str, epochs: int):
    """A callback setting each epoch's learning rate for `schedule`, or None for a constant rate.

    Per epoch rather than per step: Keras counts an extra optimizer step at the end of every epoch of a
    dataset of unknown length (ours, since unreadable files are filtered out), which would skew a
    step-based decay; and a resumed run gets the right rate from the epoch number alone.
    """
    import math

    import keras

    if schedule == "cosine":
        return keras.callbacks.LearningRateScheduler(
            lambda epoch: learning_rate * 0.5 * (1 + math.cos(math.pi * epoch / max(1, epochs))))
    return None


def compile_model(model, optimizer: str, learning_rate: float, label_smoothing: float, jit_compile=False):
    import keras

    model.compile(
        optimizer=make_optimizer(optimizer, learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


def stage_callbacks(history_path: Path | None, stage: int, patience: int, backup_dir: Path | None = None,
                    extra=()) -> list:
    """SIGTERM and NaN guards, the weights backup of a resumable run, early stopping that restores the best
    weights, history rows, plus any `extra`."""
    import keras

    callbacks = [StopOnSignal(), keras.callbacks.TerminateOnNaN()]
    if backup_dir is not None:
        # Keeps weights, optimizer state and the epoch after every epoch; a resumed fit continues from there.
        # Two copies, so a crash while writing one leaves the other.
        callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True,
                                                          delete_checkpoint=False))
    if patience > 0:
        settings = dict(monitor="val_loss", patience=patience, restore_best_weights=True, verbose=0)
        callbacks.append(ResumableEarlyStopping(backup_dir, **settings) if backup_dir is not None
                         else keras.callbacks.EarlyStopping(**settings))
    if history_path is not None:
        callbacks.append(HistoryCSV(history_path, stage))
    callbacks.extend(extra)
    return callbacks


def features_dataset(features: np.ndarray, labels: np.ndarray, num_classes: int, batch_size: int,
                     shuffle: bool, seed: int | None):
    """(float32 features, one-hot labels) batches from in-memory float16 features.

    `features` is [N, D], or [N, V, D] for V views of each image (the plain image and its augmented
    views): then every pass over the data takes one view of each image, drawn anew each epoch, as
    augmentation on the fly would.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((features, labels.astype(np.int32)))
    if shuffle:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if features.ndim == 3:
        views = features.shape[1]
        draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, draws).map(lambda xy, r: (xy[0][r % views], xy[1]))
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes)))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fit_stage(model, train_ds, val_ds, epochs: int, callbacks: list, class_weight=None, verbose: int = 1):
    """`model.fit` for one stage; returns the Keras History."""
    # BackupAndRestore sets the private `_initial_epoch` when it resumes a fit and Keras never clears it:
    # without this, stage 2 on the same model would start at the epoch stage 1 was resumed from.
    # tests/test_dependency_apis.py fails if a Keras release stops using that attribute.
    model._initial_epoch = None
    return model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks,
                     class_weight=class_weight, verbose=verbose)
