"""Private APIs of dependencies that tltool relies on: each fails here, loudly, on a release that changes it.

pyproject.toml bounds these packages' versions; these tests are what tells whether a new release inside the
bounds still works (and what to fix when one does not).
"""

import inspect

import keras
import numpy as np
import tensorflow as tf


def test_backup_and_restore_sets_the_initial_epoch_that_fit_stage_clears(tmp_path):
    """engine/fitting.fit_stage resets `model._initial_epoch` and ResumableEarlyStopping reads it."""
    seen = {}

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["initial_epoch"] = getattr(self.model, "_initial_epoch", "missing")

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = np.zeros((4, 2), np.float32), np.zeros((4,), np.int32)
    backup = lambda: keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)  # noqa: E731
    model.fit(x, y, epochs=2, verbose=0, callbacks=[backup()])
    model.fit(x, y, epochs=3, verbose=0, callbacks=[backup(), Record()])
    assert seen["initial_epoch"] == 2


def test_tflite_converter_still_has_the_per_channel_switch():
    """exporting/tflite._convert sets `_experimental_disable_per_channel` for the per-tensor int8 scheme."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    assert hasattr(converter, "_experimental_disable_per_channel")


def test_gradient_registry_is_the_dict_that_trials_prune():
    """tuning/search._forget_trial_gradients drops entries from TensorFlow's gradient registry."""
    from tensorflow.python.framework import ops

    assert isinstance(ops._gradient_registry._registry, dict)


def test_keras_tuner_internals_of_the_distributed_search():
    """tuning/distributed.serve_oracle and commands/tune use these parts of `keras_tuner.src`."""
    import keras_tuner as kt
    from keras_tuner.src import config, protos
    from keras_tuner.src.distribute import oracle_chief

    assert hasattr(config, "DEBUG")
    assert callable(protos.get_service_grpc().add_OracleServicer_to_server)
    assert callable(oracle_chief.exit_chief)
    servicer_init = inspect.signature(oracle_chief.OracleServicer.__init__)
    assert list(servicer_init.parameters)[:2] == ["self", "oracle"]
    assert "stop_triggered" in inspect.getsource(oracle_chief.OracleServicer)
    # RecipeTuner overrides this private hook to declare the space without building a model.
    assert callable(getattr(kt.Tuner, "_populate_initial_space", None))
