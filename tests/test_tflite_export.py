"""int8 weight schemes: the mixed model takes its depthwise filters from the per-channel conversion."""

import numpy as np
import pytest

from tltool.exporting import tflite as tflite_export
from tltool.exporting.metadata import read_tflite_metadata as tflite_metadata
from tltool.exporting.tflite_metadata import ModelInfo

META = {"labels": ["a", "b", "c"], "image_size": 16}
INFO = ModelInfo(name="small", description="A test model.")


def pixels(n: int = 32, seed: int = 1):
    """Images of one random colour each, with noise: their features differ from image to image."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(colours + rng.integers(-30, 31, (n, 16, 16, 3)), 0, 255).astype(np.uint8)


def small_model(spatial: str | None = "depthwise"):
    """Conv, per-channel spatial conv (depthwise, grouped as in ConvNeXt, or none), pointwise, pooling, head."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu")(keras.layers.Rescaling(1 / 255.0)(inputs))
    if spatial == "depthwise":
        x = keras.layers.DepthwiseConv2D(3, activation="relu")(x)
    elif spatial == "grouped":
        x = keras.layers.Conv2D(8, 3, groups=8, activation="relu")(x)
    x = keras.layers.Conv2D(16, 1, activation="relu")(x)
    features = keras.layers.GlobalAveragePooling2D()(x)
    head = keras.layers.Dense(3, activation="softmax")
    model = keras.Model(inputs, head(features))
    # A head whose logits spread by a few units, so the probabilities depend on the image.
    f = np.asarray(keras.Model(inputs, features)(pixels(64, seed=2).astype(np.float32)))
    kernel = np.random.default_rng(0).normal(size=(16, 3)) * 3 / f.std(0).max()
    head.set_weights([kernel.astype(np.float32), (-f.mean(0) @ kernel).astype(np.float32)])
    return model


def weight_scales(data: bytes) -> dict:
    """Number of weight scales of each op's filter, by op name: {"CONV_2D": [1, 1], ...}."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    graph = tree.subgraphs[0]
    scales: dict = {}
    for op in graph.operators:
        name = names[tflite_export._builtin_code(tree.operatorCodes[op.opcodeIndex])]
        if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            scales.setdefault(name, []).append(len(graph.tensors[op.inputs[1]].quantization.scale))
    return scales


def run(data: bytes, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=data)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    scale, zero = out["quantization"]
    return (interpreter.get_tensor(out["index"]).astype(np.float32) - zero) * scale


@pytest.fixture(scope="module")
def candidates():
    model = small_model()
    converted, float32_size = tflite_export.convert(model, 16, "int8", pixels(), META, INFO)
    return model, converted, float32_size


def test_mixed_scheme_is_per_channel_only_for_depthwise(candidates, tmp_path):
    _, (mixed, per_channel), _ = candidates
    assert (mixed.int8_weights, per_channel.int8_weights) == ("mixed", "per-channel")
    assert weight_scales(mixed.data) == {"CONV_2D": [1, 1], "DEPTHWISE_CONV_2D": [8], "FULLY_CONNECTED": [1]}
    assert weight_scales(per_channel.data) == {"CONV_2D": [8, 16], "DEPTHWISE_CONV_2D": [8], "FULLY_CONNECTED": [3]}
    assert len(mixed.data) < len(per_channel.data)  # 12 bytes less per conv channel, for weights and bias
    (tmp_path / "model.tflite").write_bytes(mixed.data)
    assert tflite_metadata(tmp_path / "model.tflite") == {**META, "int8_weights": "mixed"}


def test_mixed_model_computes_what_the_keras_model_does(candidates):
    model, (mixed, per_channel), _ = candidates
    images = pixels(64)
    expected = np.asarray(model(images.astype(np.float32), training=False))
    assert expected.max(1).mean() > 0.6 and len(set(expected.argmax(1))) >= 2  # so the check can fail
    for candidate in (mixed, per_channel):
        probs = run(candidate.data, images)
        # uint8 outputs step by 1/256; the rest is int8 rounding through four layers.
        assert np.abs(probs - expected).max() < 0.1, candidate.int8_weights
        assert (probs.argmax(1) == expected.argmax(1)).mean() >= 0.9, candidate.int8_weights


def test_mixed_depthwise_filter_is_the_keras_kernel_per_channel(candidates):
    import keras
    from tensorflow.lite.tools import flatbuffer_utils

    model, (mixed, _), _ = candidates
    kernel = next(l for l in model.layers if isinstance(l, keras.layers.DepthwiseConv2D)).get_weights()[0]
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(mixed.data))
    graph = tree.subgraphs[0]
    depthwise = next(op for op in graph.operators
                     if tflite_export._builtin_code(tree.operatorCodes[op.opcodeIndex]) == 4)  # DEPTHWISE_CONV_2D
    weights = graph.tensors[depthwise.inputs[1]]
    q = tree.buffers[weights.buffer].data.view(np.int8).reshape(weights.shape)  # (1, 3, 3, channels)
    scales = np.asarray(weights.quantization.scale)
    error = np.abs(q * scales - kernel[..., 0][None]).max(axis=(0, 1, 2))
    assert (error <= scales / 2 + 1e-7).all()  # each channel within half a step of its own scale
    assert np.abs(q).max(axis=(0, 1, 2)).min() >= 126  # every channel uses the whole int8 range


def test_grouped_convolution_counts_as_depthwise():
    converted, _ = tflite_export.convert(small_model("grouped"), 16, "int8", pixels(), META, INFO)
    assert [c.int8_weights for c in converted] == ["mixed", "per-channel"]
    assert weight_scales(converted[0].data) == {"CONV_2D": [1, 8, 1], "FULLY_CONNECTED": [1]}


def test_model_without_depthwise_is_per_tensor():
    converted, _ = tflite_export.convert(small_model(None), 16, "int8", pixels(), META, INFO)
    assert [c.int8_weights for c in converted] == ["per-tensor", "per-channel"]
    assert weight_scales(converted[0].data)["CONV_2D"] == [1, 1]


def test_conversions_that_do_not_line_up_are_not_mixed(candidates):
    _, (mixed, _), _ = candidates
    other, _ = tflite_export.convert(small_model(None), 16, "int8", pixels(), META, INFO)
    assert tflite_export._with_depthwise_from(other[0].data, mixed.data) is None


def test_the_ood_score_goes_last_whichever_order_the_converter_gives():
    """MediaPipe names heads in the graph's output order: probabilities must be first, and the signature
    names each output, even from a function that returns the [N, 1] score first."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32, name="pixels")])
    def serve(images):
        colour = tf.reduce_mean(images, axis=[1, 2]) / 255.0  # [N, 3]
        return [tf.reduce_mean(colour, axis=1, keepdims=True), tf.nn.softmax(colour)]  # the score first

    data = tflite_export.finish(tflite_export._convert(serve.get_concrete_function(), "none", None), META, INFO)
    interpreter = tf.lite.Interpreter(model_content=data)
    assert [list(d["shape"]) for d in interpreter.get_output_details()] == [[1, 3], [1, 1]]
    images = pixels(4).astype(np.float32)
    named = interpreter.get_signature_runner("serving_default")(pixels=images)
    np.testing.assert_allclose(named["probabilities"], tf.nn.softmax(images.mean(axis=(1, 2)) / 255.0), rtol=1e-5)
    assert named["ood_score"].shape == (4, 1)
