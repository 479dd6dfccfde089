"""TFLite conversion for `export`: float32, float16, dynamic-range and full-integer int8.

Full-integer int8 comes in two weight schemes, tried in this order:

    mixed        per-channel weight scales for depthwise (and grouped) convolutions, one scale per tensor
                 for all other weights (per-tensor everywhere when the model has no such convolution)
    per-channel  per-channel weight scales everywhere (the converter's default)

Why mixed first: TFLite stores a float32 scale and an int64 zero point for every output channel of a
per-channel weight tensor and again for its bias, 24 bytes a channel. On a headless MobileNetV2 that is
0.41 MB on top of 2.26 MB of int8 weights, 0.31x the float32 model. Depthwise kernels cannot do without
per-channel scales (9 weights a channel, ranges spread wide by the folded BatchNorm: an all-per-tensor
MobileNetV2 fell from 98% to 50% on cats vs dogs), while regular convolutions, with hundreds of weights a
channel, lose nothing measurable with one scale (mixed: 0.28x, 98% -> 98%). The converter offers only all
or nothing, so we convert twice with the same calibration and give the per-tensor model the depthwise
filters and biases of the per-channel one. `export` keeps the first scheme that passes its accuracy check.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np

from tltool.errors import ExportError
from tltool.exporting.metadata import embed_tflite_metadata
from tltool.exporting.tflite_metadata import METADATA_BUFFER, ModelInfo, append_files, metadata_tables
from tltool.models.ood import ood_parts, tflite_friendly_score


@dataclass(frozen=True)
class Converted:
    """One candidate TFLite model: the flatbuffer and, for int8, its weight scheme."""

    data: bytes
    int8_weights: str | None = None  # "mixed", "per-tensor" or "per-channel"


def convert(model, size: int, quantize: str, representative: np.ndarray | None, metadata: dict, info: ModelInfo):
    """Convert a Keras model taking (N, size, size, 3) float pixels.

    Every candidate carries the standard TFLite Model Metadata (see tflite_metadata.py) and tltool's own
    `metadata` entry; `info` gives the model's name, description, version, author and license.

    Returns:
        (candidates, float32_size): the models to try, best first (one unless `quantize` is int8), and for
        int8 the size of the float32 conversion (the reference of the size check), else None.
    """
    if quantize == "int8" and (representative is None or len(representative) == 0):
        raise ExportError("No readable training images to calibrate int8 quantization with.")
    serve = _float_function(model, size)
    if quantize != "int8":
        return [Converted(finish(_convert(serve, quantize, representative), metadata, info))], None
    per_channel = _convert(serve, "int8", representative)
    try:
        per_tensor = _convert(serve, "int8", representative, per_channel=False)
    except ExportError:  # the smaller scheme is an optimisation: per-channel alone still works
        per_tensor = None
    float32_size = len(finish(_convert(serve, "none", None), metadata, info))
    schemes = []
    mixed = _with_depthwise_from(per_tensor, per_channel) if per_tensor is not None else None
    if mixed is not None:
        schemes.append(mixed)
    schemes.append((per_channel, "per-channel"))
    candidates = [Converted(finish(data, {**metadata, "int8_weights": scheme}, info), scheme)
                  for data, scheme in schemes]
    return candidates, float32_size


def finish(data: bytes, metadata: dict, info: ModelInfo) -> bytes:
    """A converted model made ready for the runtimes users load it in (MediaPipe Tasks, LiteRT):

    - a `serving_default` signature naming the input `pixels` and the outputs `probabilities` and
      `ood_score`, for LiteRT's signature runners (the converter writes none from a concrete function);
    - a uint8 input (int8 models) takes plain pixels: scale 1, zero point 0. Runtimes feed the image's
      bytes as they are, while the converter sets the input scale from the calibration images' range
      (0.988 when no calibration pixel reached 255: every pixel fed raw was read 1.2% too dark). The
      first op requantizes to the calibrated range, so the model computes the same;
    - the standard metadata and tltool's own entry, then the label files appended as a zip archive.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    graph = tree.subgraphs[0]
    _serving_signature(tree, graph, schema)
    _plain_pixel_input(tree, graph, schema)
    types = [graph.tensors[i].type for i in graph.outputs]
    standard, files = metadata_tables(metadata["labels"], metadata["image_size"], info,
                                      graph.tensors[graph.inputs[0]].type, types, has_ood=len(graph.outputs) > 1)
    data = embed_tflite_metadata(bytes(flatbuffer_utils.convert_object_to_bytearray(tree)), metadata,
                                 {METADATA_BUFFER: standard})
    return append_files(data, files)


def _serving_signature(tree, graph, schema) -> None:
    """Name the graph's input and outputs in a `serving_default` signature, probabilities first.

    MediaPipe reports each output as a classification head in the graph's order. The converter keeps the
    order `_float_function` returns them in; should one put the OOD score ([N, 1]) first, it goes last.
    """
    if len(graph.outputs) == 2 and list(graph.tensors[graph.outputs[0]].shape)[-1:] == [1]:
        graph.outputs = np.asarray(graph.outputs[::-1], dtype=np.int32)
    names = ["probabilities", "ood_score"][:len(graph.outputs)]
    signature = schema.SignatureDefT()
    signature.signatureKey = "serving_default"
    signature.subgraphIndex = 0
    signature.inputs = [_tensor_map(schema, "pixels", graph.inputs[0])]
    signature.outputs = [_tensor_map(schema, name, index) for name, index in zip(names, graph.outputs)]
    tree.signatureDefs = [signature]


def _tensor_map(schema, name: str, index) -> object:
    entry = schema.TensorMapT()
    entry.name, entry.tensorIndex = name, int(index)
    return entry


def _plain_pixel_input(tree, graph, schema) -> None:
    """Give a uint8 input scale 1 and zero point 0 when only QUANTIZE ops read it (see `finish`)."""
    tensor = graph.tensors[graph.inputs[0]]
    if tensor.type != schema.TensorType.UINT8 or tensor.quantization is None:
        return
    readers = [op for op in graph.operators if graph.inputs[0] in list(op.inputs)]
    quantize = schema.BuiltinOperator.QUANTIZE
    if readers and all(_builtin_code(tree.operatorCodes[op.opcodeIndex]) == quantize for op in readers):
        tensor.quantization.scale = np.asarray([1.0], dtype=np.float32)
        tensor.quantization.zeroPoint = np.asarray([0], dtype=np.int64)


def _float_function(model, size: int):
    """The model as one traced function of float32 pixels: the converter's input.

    A model with the OOD score gives the score in converter-friendly ops (see `tflite_friendly_score`),
    and its outputs as a list, probabilities first. The converter freezes the function's variables into
    constants; going through a SavedModel instead took 5x as long (a 32 px MobileNetV2: 10.7 s against
    1.9 s for a float32 file), most of it writing and reading back the SavedModel.
    """
    import tensorflow as tf

    if isinstance(model.output, dict):
        extractor, head, bank, scale, blanks = ood_parts(model)

        def serve(pixels):
            features = extractor(pixels, training=False)
            return [head(features, training=False), tflite_friendly_score(features, bank, scale, blanks)]
    else:  # a model trained before the OOD score existed
        def serve(pixels):
            return [model(pixels, training=False)]

    spec = tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")
    return tf.function(serve, input_signature=[spec]).get_concrete_function()


def _convert(serve, mode: str, representative, per_channel: bool = True) -> bytes:
    import tensorflow as tf

    # Without a trackable object the converter freezes the function instead of saving and loading it
    # again as a SavedModel; it logs that this path is deprecated (a warning users cannot act on).
    with _quiet_converter():
        converter = tf.lite.TFLiteConverter.from_concrete_functions([serve])
    if mode != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        def representative_dataset():
            for image in representative:
                yield [image[None].astype(np.float32)]

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Full integer: pixels go in as uint8 and probabilities come out as uint8 (scale 1/256), so
        # the model runs on integer-only accelerators (Edge TPU, NPUs, microcontrollers).
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
        # The converter's only switch between the two weight schemes (private, stable since TF 2.5).
        converter._experimental_disable_per_channel = not per_channel
    try:
        with _quiet_converter():
            return converter.convert()
    except Exception as exc:  # the converter raises ConverterError, RuntimeError, ValueError...
        last_line = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        raise ExportError(f"TFLite conversion ({mode}) failed: {type(exc).__name__}: {last_line}") from None


@contextlib.contextmanager
def _quiet_converter():
    """Hide the converter's Python warnings: that conversion from a concrete function is deprecated, and
    that int8 input statistics were not given (`finish` sets the uint8 input to plain pixels)."""
    import warnings

    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _with_depthwise_from(per_tensor: bytes, per_channel: bytes):
    """The per-tensor model with the depthwise filters and biases of the per-channel model.

    Returns (bytes, scheme), or None when the two conversions do not line up op for op with the same
    activation scales (then the bias scales, input scale x filter scale, would not hold): the caller
    falls back to the per-channel model.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    target = flatbuffer_utils.convert_bytearray_to_object(bytearray(per_tensor))
    source = flatbuffer_utils.convert_bytearray_to_object(bytearray(per_channel))
    if len(target.subgraphs) != 1 or len(source.subgraphs) != 1:
        return None
    t_graph, s_graph = target.subgraphs[0], source.subgraphs[0]
    if len(t_graph.operators) != len(s_graph.operators):
        return None
    uses = np.bincount([t.buffer for t in t_graph.tensors], minlength=len(target.buffers))
    replaced = 0
    for t_op, s_op in zip(t_graph.operators, s_graph.operators):
        t_code = _builtin_code(target.operatorCodes[t_op.opcodeIndex])
        if t_code != _builtin_code(source.operatorCodes[s_op.opcodeIndex]):
            return None
        if not _is_depthwise(t_graph, t_op, t_code):
            continue
        t_in, s_in = t_graph.tensors[t_op.inputs[0]], s_graph.tensors[s_op.inputs[0]]
        if not _same_quantization(t_in, s_in):
            return None
        for i in (1, 2):  # filter, bias
            t_tensor, s_tensor = t_graph.tensors[t_op.inputs[i]], s_graph.tensors[s_op.inputs[i]]
            if list(t_tensor.shape) != list(s_tensor.shape) or t_tensor.type != s_tensor.type:
                return None
            data = source.buffers[s_tensor.buffer].data
            if uses[t_tensor.buffer] == 1:
                target.buffers[t_tensor.buffer].data = data
            else:  # the converter shares equal constants (all-zero biases): give this tensor its own
                uses[t_tensor.buffer] -= 1
                target.buffers.append(schema.BufferT())
                target.buffers[-1].data = data
                t_tensor.buffer = len(target.buffers) - 1
            t_tensor.quantization = s_tensor.quantization
        replaced += 1
    scheme = "mixed" if replaced else "per-tensor"
    return bytes(flatbuffer_utils.convert_object_to_bytearray(target)), scheme


def _is_depthwise(graph, op, code: int) -> bool:
    """A depthwise convolution, or a grouped one (ConvNeXt's: a CONV_2D whose filter sees fewer channels
    than its input has)."""
    from tensorflow.lite.python import schema_py_generated as schema

    if code == schema.BuiltinOperator.DEPTHWISE_CONV_2D:
        return True
    if code != schema.BuiltinOperator.CONV_2D:
        return False
    return graph.tensors[op.inputs[1]].shape[-1] < graph.tensors[op.inputs[0]].shape[-1]


def _builtin_code(code) -> int:
    # Codes above 127 live only in `builtinCode`; older ones in both (see the TFLite schema).
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _same_quantization(a, b) -> bool:
    qa, qb = a.quantization, b.quantization
    if qa is None or qb is None:
        return qa is qb
    return (np.array_equal(np.asarray(qa.scale), np.asarray(qb.scale))
            and np.array_equal(np.asarray(qa.zeroPoint), np.asarray(qb.zeroPoint)))
