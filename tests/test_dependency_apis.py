"""Private APIs of dependencies that tltool relies on: each fails here, loudly, on a release that changes it.

pyproject.toml bounds these packages' versions; these tests are what tells whether a new release inside the
bounds still works (and what to fix when one does not).
"""

import inspect

import keras
import numpy as np
import tensorflow as tf


def test_fit_starts_at_the_initial_epoch_a_callback_sets_on_train_begin():
    """engine/callbacks.EpochCheckpoint resumes a fit by setting the private `model._initial_epoch` in
    `on_train_begin` (as Keras's BackupAndRestore does), and engine/fitting.fit_stage clears it."""
    epochs_run = []

    class Resume(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.model._initial_epoch = 2

        def on_epoch_begin(self, epoch, logs=None):
            epochs_run.append(epoch)

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = np.zeros((4, 2), np.float32), np.zeros((4,), np.int32)
    model.fit(x, y, epochs=4, verbose=0, callbacks=[Resume()])
    assert epochs_run == [2, 3]


def test_tflite_converter_still_has_the_per_channel_switch():
    """exporting/tflite._convert sets `_experimental_disable_per_channel` for the per-tensor int8 scheme."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    assert hasattr(converter, "_experimental_disable_per_channel")


def test_gradient_registry_is_the_dict_that_trials_prune():
    """tuning/search._forget_trial_gradients drops entries from TensorFlow's gradient registry."""
    from tensorflow.python.framework import ops

    assert isinstance(ops._gradient_registry._registry, dict)


def test_a_layer_call_is_recorded_in_the_node_lists_that_tune_trims():
    """tuning/search._KeptBackbone.reset trims `_inbound_nodes` / `_outbound_nodes` of a shared backbone."""
    import keras

    inputs = keras.Input((4,))
    first = keras.layers.Dense(3)
    x = first(inputs)
    inbound, outbound = len(first._inbound_nodes), len(first._outbound_nodes)
    keras.layers.Dense(2)(x)
    first(keras.Input((4,)))
    assert len(first._outbound_nodes) == outbound + 1 and len(first._inbound_nodes) == inbound + 1


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


def test_keras_tuner_writes_its_json_through_the_durable_writer(tmp_path):
    """tuning/search.py replaces `keras_tuner.src.utils.save_json` (oracle.json, trial.json) with an atomic
    writer: Keras Tuner must still look it up on the module at call time."""
    import keras_tuner as kt

    from tltool.tuning import search

    assert kt.src.utils.save_json is search._durable_save_json
    trial = kt.engine.trial.Trial(kt.HyperParameters(), trial_id="00")
    seen = []
    original = search.atomic_write_text
    try:
        search.atomic_write_text = lambda path, text: seen.append(path) or original(path, text)
        trial.save(str(tmp_path / "trial.json"))
    finally:
        search.atomic_write_text = original
    assert seen == [str(tmp_path / "trial.json")] and (tmp_path / "trial.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_mediapipe_metadata_builders_that_the_tflite_export_uses():
    """tltool builds the standard TFLite metadata with MediaPipe's schema code and `metadata_info` builders,
    and places it itself (its MetadataPopulator does not import from the pip wheels: tflite_metadata.py)."""
    import inspect

    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info as md

    for name in ("ModelMetadataT", "SubGraphMetadataT", "NormalizationOptions", "ImageProperties"):
        assert hasattr(fb, name), name
    assert {"norm_mean", "norm_std", "color_space_type", "tensor_type"} <= set(
        inspect.signature(md.InputImageTensorMd).parameters)
    assert {"label_files", "tensor_type"} <= set(inspect.signature(md.ClassificationTensorMd).parameters)
    assert {"content_type", "associated_files"} <= set(inspect.signature(md.TensorMd).parameters)
    assert {"name", "version", "description", "author", "licenses"} <= set(
        inspect.signature(md.GeneralMd).parameters)


def _counting_traces(traces: list):
    """A small classifier (8 inputs, 3 classes) that appends to `traces` each time its train step is traced."""
    class Counting(keras.Model):
        def train_step(self, data):
            traces.append(1)  # Python runs only while the step is traced
            return super().train_step(data)

    inputs = keras.Input((8,))
    return Counting(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(4)(inputs)))


def test_a_stage_traces_its_train_step_once():
    """engine/fitting.build_before_fit builds the loss's, metrics' and optimizer's variables with the private
    `Model._symbolic_build` before `fit`; otherwise Keras creates them inside the first trace of the train
    step, and TensorFlow traces the step a second time (a second or more of every short stage or trial)."""
    from tltool.engine.fitting import compile_model, fit_stage

    traces = []
    model = _counting_traces(traces)
    compile_model(model, "adam", 1e-3, 0.1)
    data = tf.data.Dataset.from_tensor_slices((np.zeros((40, 8), np.float32),
                                               tf.one_hot(np.arange(40) % 3, 3))).batch(16)
    fit_stage(model, data, data, 3, [], verbose=0)
    assert len(traces) == 1


def test_a_second_fit_of_a_compiled_model_reuses_its_traced_train_step():
    """tuning/reuse.py keeps the models of tune's cut trials so that Keras traces their steps once: a model
    fitted again (on a new dataset, without compiling it again) must reuse the train step it traced."""
    from tltool.engine.fitting import compile_model, fit_stage

    traces = []
    model = _counting_traces(traces)
    compile_model(model, "adam", 1e-3, 0.0)
    for rows in (40, 24):
        data = tf.data.Dataset.from_tensor_slices((np.zeros((rows, 8), np.float32),
                                                   tf.one_hot(np.arange(rows) % 3, 3))).batch(16)
        fit_stage(model, data, data, 2, [], verbose=0)
    assert len(traces) == 1
