"""Keras helpers of the two stages: optimizers, compiling, a stage's callbacks, datasets of cached features, fit.

The stages themselves (what trains, on what) are in stages.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tltool.engine.callbacks import EpochCheckpoint, HistoryCSV, StopOnSignal, read_checkpoint
from tltool.engine.cluster_fit import cluster_fit
from tltool.errors import TrainingError

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
    """SIGTERM and NaN guards, early stopping that restores the best weights, history rows, any `extra`,
    and last the epoch checkpoint of a resumable run (see EpochCheckpoint for why last)."""
    import keras

    callbacks = [StopOnSignal(), keras.callbacks.TerminateOnNaN()]
    early_stopping = None
    if patience > 0:
        early_stopping = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience,
                                                       restore_best_weights=True, verbose=0)
        callbacks.append(early_stopping)
    if history_path is not None:
        callbacks.append(HistoryCSV(history_path, stage))
    callbacks.extend(extra)
    if backup_dir is not None:
        callbacks.append(EpochCheckpoint(backup_dir, early_stopping))
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
    return without_autotune(ds.batch(batch_size).prefetch(2))


def without_autotune(ds):
    """`ds` without tf.data's autotuning thread. In-memory batches have nothing to tune, and with the thread
    a `fit` on them returned 0.3 to 2.5 s after its last epoch had ended (measured from a callback's
    `on_train_end`: the fits then lasted whole multiples of about 1.28 s, as if waiting for the thread)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def fit_stage(model, train_ds, val_ds, epochs: int, callbacks: list, class_weight=None, verbose: int = 1,
              cluster=None, batches: tuple[int, int] = (0, 0)):
    """`model.fit` for one stage; returns the Keras History (None when a resumed stage had finished its fit).

    A multi-worker run (`cluster`) trains with cluster_fit instead, `batches` being how many batches this
    worker's shards of `train_ds` and `val_ds` hold. Every worker has the chief's checkpoints (see
    finetune's plan), so each takes the same branch and loads the same state.

    Raises:
        TrainingError: the loss stopped being finite (training diverged).
    """
    checkpoint = next((c for c in callbacks if isinstance(c, EpochCheckpoint)), None)
    state = read_checkpoint(checkpoint.folder) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.finished(state, epochs):  # crashed after `fit`, before the stage
        checkpoint.set_model(model)                                    # was recorded: no epoch runs again
        checkpoint.restore_end_of_fit(state)
        return None
    # EpochCheckpoint sets the private `_initial_epoch` when it resumes a fit and Keras never clears it:
    # without this, stage 2 on the same model would start at the epoch stage 1 was resumed from.
    # tests/test_dependency_apis.py fails if a Keras release stops using that attribute.
    model._initial_epoch = None
    if cluster is not None:
        fitted = cluster_fit(cluster, model, train_ds, val_ds, epochs, callbacks, batches, class_weight,
                             getattr(model.loss, "label_smoothing", 0.0), verbose=verbose)
    else:
        build_before_fit(model, train_ds)
        train_ds, val_ds, steps = one_iterator_per_fit(train_ds, val_ds)
        fitted = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks,
                           class_weight=class_weight, verbose=verbose, **steps)
    losses = fitted.history.get("loss", [])
    bad = next((i for i, loss in enumerate(losses) if not np.isfinite(loss)), None)
    if bad is not None:
        lr = float(keras_learning_rate(model))
        raise TrainingError(f"Training diverged: the loss became {losses[bad]} in epoch {bad + 1} (learning rate "
                            f"{lr:g}). Lower the stage's learning rate and start a new run.")
    return fitted


def one_iterator_per_fit(train_ds, val_ds):
    """(train_ds, val_ds, fit's step arguments): datasets of known length repeated, each epoch one pass.

    Keras makes a new iterator of a finite dataset for every epoch, training and validation, and making
    one instantiates the whole pipeline (about 9 ms for the cached-feature datasets, whose epochs take
    tens of milliseconds: 6 s of a default 20-trial `tune`). Repeated, the iterator lives for the whole
    fit. Each pass still reshuffles and draws new views (`features_dataset`). Datasets of unknown length
    (images streamed from files, of which an unreadable one is dropped) are left as they are: a fixed
    number of steps would no longer be one pass.
    """
    import tensorflow as tf

    lengths = [int(ds.cardinality()) if ds is not None else 0 for ds in (train_ds, val_ds)]
    if lengths[0] <= 0 or (val_ds is not None and lengths[1] <= 0):  # unknown, infinite or empty
        return train_ds, val_ds, {}
    steps = {"steps_per_epoch": lengths[0]}
    if val_ds is not None:
        val_ds, steps["validation_steps"] = val_ds.repeat(), lengths[1]
    return train_ds.repeat(), val_ds, steps


def build_before_fit(model, train_ds) -> None:
    """Creates the compiled loss's, metrics' and optimizer's variables before `fit` traces its train step.

    With no distribution strategy, Keras creates them inside the first trace of the train step, and a
    tf.function whose first trace created variables traces a second time: every fit paid two traces of its
    train step, a second or more of a short stage or tune trial on a CPU. Built from the
    dataset's element spec, no batch is read. tests/test_dependency_apis.py fails if a Keras release
    drops the private `_symbolic_build` (this then does nothing, and fit traces twice as before).
    """
    build = getattr(model, "_symbolic_build", None)
    spec = getattr(train_ds, "element_spec", None)
    if build is not None and spec is not None:
        with model.distribute_strategy.scope():  # variables belong to the strategy that trains them
            build(data_batch=spec)


def keras_learning_rate(model) -> float:
    import keras

    try:
        return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    except Exception:  # noqa: BLE001 - a schedule that cannot be read outside a step
        return float("nan")
