"""`export`: turn a run's model into SavedModel, .keras, TFLite or ONNX, and check the result.

Every export checks itself before it reports success: the run's validation images (the same seeded split
that `finetune` made) go through the Keras model and through the exported artifact, reloaded the way a
user would load it (`tltool.predict.load_predictor`). The figures land in `export.json` next to the
artifact; an artifact outside tolerance is deleted and `ExportError` says by how much it missed.

Layouts (default folder RUN/export/FORMAT, or FORMAT-QUANTIZE for quantized TFLite):

    savedmodel/1/        TF Serving layout (numbered version). Signatures: `serving_default` takes encoded
                         images (tf.string: JPEG, PNG, GIF, BMP) and decodes, resizes and runs the model in
                         the graph; `serving_pixels` takes uint8 pixels. Both return `probabilities`,
                         `label`, `score`, `top_k_labels`, `top_k_scores`. labels.txt is an asset.
    keras/model.keras    the Keras model, with labels.txt
    tflite/model.tflite  float32 pixels (0..255) in, probabilities out; int8 takes and returns uint8.
                         Labels and input size travel inside the file as the `tltool` metadata entry
                         (JSON), and in labels.txt next to it.
    onnx/model.onnx      float32 NHWC pixels (0..255) in; labels in the model's metadata_props (`tltool`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tltool import rundir
from tltool.errors import ExportError, ExportOptionError, RunDirError
from tltool.images import ImageReadError, load_image

FORMATS = ("savedmodel", "keras", "tflite", "onnx")
QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
EXPORT_FILE = "export.json"
SAVEDMODEL_VERSION = "1"
TFLITE_FILE = "model.tflite"
ONNX_FILE = "model.onnx"
#: Name of the metadata entry (TFLite) / metadata_props key (ONNX) holding labels and input size as JSON.
METADATA_KEY = "tltool"

#: Validation images used by the self-check, and training images used to calibrate int8 quantization.
MAX_CHECK_IMAGES = 1000
REPRESENTATIVE_IMAGES = 200


@dataclass(frozen=True)
class Tolerance:
    """What an export must meet: any bound left None is not checked."""

    max_abs_prob_diff: float | None = None   # largest |p_keras - p_export| over all images and classes
    max_accuracy_drop: float | None = None   # in percentage points, accuracy_keras - accuracy_export
    max_size_ratio: float | None = None      # size relative to the float32 TFLite model


def tolerance_for(format: str, quantize: str) -> Tolerance:
    """The bounds an export of `format` with `quantize` must meet."""
    if quantize == "int8":
        # Per-channel weight quantization (what keeps MobileNet-style depthwise convolutions accurate) stores
        # a float32 scale and an int64 zero point per output channel and bias: ~12% on top of the int8
        # weights of a headless MobileNetV2 (0.308x its float32 size). Per-tensor would reach 0.26x but
        # lost 5 points on the sample data, so the bound leaves room for those parameters.
        return Tolerance(max_accuracy_drop=1.5, max_size_ratio=0.32)
    if quantize == "dynamic":
        return Tolerance(max_accuracy_drop=1.5)
    if quantize == "float16":
        return Tolerance(max_abs_prob_diff=2e-2)
    # Same TensorFlow kernels (keras, savedmodel) agree to rounding; converted graphs (fused ops,
    # other kernels) to about 1e-5, so 1e-3 on probabilities is tight and still robust.
    return Tolerance(max_abs_prob_diff=1e-4 if format in ("keras", "savedmodel") else 1e-3)


def export(run_dir, format: str, quantize: str = "none", out=None, force: bool = False) -> dict:
    """Export a run's model and check the export against the Keras model on the validation images.

    Args:
        run_dir: a run directory written by `tltool finetune`.
        format: `savedmodel`, `keras`, `tflite` or `onnx`.
        quantize: `none` (default), or for TFLite `dynamic` (int8 weights), `float16` or `int8` (full
            integer: uint8 input and output, calibrated on up to 200 training images).
        out: folder to write; default RUN/export/FORMAT (RUN/export/tflite-QUANTIZE when quantized).
        force: replace `out` if it exists and is not empty.

    Returns:
        The content of `export.json`: format, quantize, path, size_bytes, max_abs_prob_diff,
        top1_agreement, accuracy_keras, accuracy_export, n_images, tolerance, and format-specific extras.

    Raises:
        ExportOptionError: unknown format, a quantization the format does not take, or a missing package.
        ExportError: the conversion failed, or the export is outside tolerance (nothing is left behind).
    """
    _check_options(format, quantize)
    run_dir = rundir.require_run_dir(Path(run_dir))
    name = format if quantize == "none" else f"{format}-{quantize}"
    out = Path(out) if out is not None else run_dir / "export" / name
    if out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents:
        raise RunDirError(f"--out {out} would replace the run directory {run_dir} itself. Choose another --out.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise RunDirError(f"Export folder {out} already exists. Pass --force to replace it, or choose "
                          f"another --out.")
    t_start = time.perf_counter()

    from tltool.finetuning import load_split_data
    from tltool.predict import KerasPredictor, load_predictor
    from tltool.recipe import load_recipe

    labels = rundir.read_labels(run_dir)
    model = KerasPredictor.from_file(run_dir / rundir.MODEL_FILE, labels).model
    size = int(model.input_shape[1])
    recipe = load_recipe(run_dir / rundir.RECIPE_FILE)
    split = load_split_data(recipe)
    check_paths, check_pixels, check_labels = _load_images(split.val.paths, split.val.labels, size,
                                                           MAX_CHECK_IMAGES, recipe.seed)
    if not check_paths:
        raise ExportError(f"No readable validation images in {split.val.root}: the export cannot be checked.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        extra: dict = {}
        if format == "keras":
            shutil.copyfile(run_dir / rundir.MODEL_FILE, tmp / rundir.MODEL_FILE)
            rundir.write_labels(tmp, labels)
            artifact = tmp / rundir.MODEL_FILE
        elif format == "savedmodel":
            artifact = tmp / SAVEDMODEL_VERSION
            _write_savedmodel(model, labels, size, artifact)
        elif format == "tflite":
            artifact = tmp / TFLITE_FILE
            representative = None
            if quantize == "int8":
                _, representative, _ = _load_images(split.train.paths, split.train.labels, size,
                                                    REPRESENTATIVE_IMAGES, recipe.seed)
            data, float32_size = _convert_tflite(model, size, quantize, representative, labels)
            rundir.atomic_write_bytes(artifact, data)
            rundir.write_labels(tmp, labels)
            if float32_size is not None:
                extra["float32_size_bytes"] = float32_size
        else:
            artifact = tmp / ONNX_FILE
            _write_onnx(model, size, labels, artifact)
            rundir.write_labels(tmp, labels)

        predictor = load_predictor(tmp)
        probs_keras = _predict_keras(model, check_pixels)
        probs_export = predictor.predict(check_pixels)
        report = _compare(probs_keras, probs_export, np.asarray(check_labels))
        if format == "savedmodel":
            extra["encoded_images_signature"] = _check_encoded_signature(predictor, check_paths, probs_keras)
        size_bytes = _size_of(artifact)
        if "float32_size_bytes" in extra:
            extra["size_ratio"] = round(size_bytes / extra["float32_size_bytes"], 4)
        tol = tolerance_for(format, quantize)
        result = {"format": format, "quantize": quantize, "path": str(out), "size_bytes": size_bytes, **report,
                  "n_images": len(check_paths), "image_size": size, "num_classes": len(labels), **extra,
                  "tolerance": {k: v for k, v in asdict(tol).items() if v is not None},
                  "seconds": round(time.perf_counter() - t_start, 2)}
        _check_tolerance(result, tol)
        rundir.atomic_write_json(tmp / EXPORT_FILE, result)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------ checks


def _check_options(format: str, quantize: str) -> None:
    if format not in FORMATS:
        raise ExportOptionError(f"Expected `format` to be one of {', '.join(FORMATS)}. Received: format={format}")
    if quantize not in QUANTIZATIONS:
        raise ExportOptionError(f"Expected `quantize` to be one of {', '.join(QUANTIZATIONS)}. "
                                f"Received: quantize={quantize}")
    if quantize != "none" and format != "tflite":
        raise ExportOptionError(f"Quantization applies to --format tflite only. Received: format={format}, "
                                f"quantize={quantize}. Drop --quantize or use --format tflite.")
    if format == "onnx":
        missing = [name for name in ("tf2onnx", "onnx", "onnxruntime") if not _importable(name)]
        if missing:
            raise ExportOptionError(f"ONNX export needs {', '.join(missing)}: install them with "
                                    f"pip install 'tltool[onnx]'.")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _compare(probs_keras: np.ndarray, probs_export: np.ndarray, labels: np.ndarray) -> dict:
    top_keras, top_export = probs_keras.argmax(1), probs_export.argmax(1)
    return {
        "max_abs_prob_diff": float(np.abs(probs_keras - probs_export).max()),
        "top1_agreement": round(float((top_keras == top_export).mean()), 6),
        "accuracy_keras": round(float((top_keras == labels).mean()), 6),
        "accuracy_export": round(float((top_export == labels).mean()), 6),
    }


def _check_tolerance(result: dict, tol: Tolerance) -> None:
    what = f"{result['format']}" + (f" ({result['quantize']})" if result["quantize"] != "none" else "")
    problems = []
    if tol.max_abs_prob_diff is not None and result["max_abs_prob_diff"] > tol.max_abs_prob_diff:
        problems.append(f"probabilities differ from the Keras model's by up to {result['max_abs_prob_diff']:.3g} "
                        f"(allowed {tol.max_abs_prob_diff:g})")
    drop = 100 * (result["accuracy_keras"] - result["accuracy_export"])
    if tol.max_accuracy_drop is not None and drop > tol.max_accuracy_drop:
        problems.append(f"accuracy drops by {drop:.1f} points ({100 * result['accuracy_keras']:.1f}% -> "
                        f"{100 * result['accuracy_export']:.1f}%; allowed {tol.max_accuracy_drop:g})")
    if tol.max_size_ratio is not None and result.get("size_ratio", 0) > tol.max_size_ratio:
        problems.append(f"it is {result['size_ratio']:.3f}x the float32 size (allowed {tol.max_size_ratio:g}x)")
    if problems:
        hint = (" Try --quantize dynamic or float16, or more varied training images for calibration."
                if result["quantize"] in ("int8", "dynamic") else "")
        raise ExportError(f"The {what} export failed its check on {result['n_images']} validation images: "
                          f"{'; '.join(problems)}. Nothing was written.{hint}")


def _check_encoded_signature(predictor, paths: list[str], probs_keras: np.ndarray) -> dict:
    """Run the files' own bytes through `serving_default` (decoding and resizing in the graph).

    TensorFlow's decoders and resize differ slightly from Pillow's (no EXIF rotation, alpha dropped rather
    than composited on white), so this is reported, not held to the tolerance of the pixel signature.
    """
    import tensorflow as tf

    fn = predictor.signatures["serving_default"]
    rows, probs, failed = [], [], 0
    for i, path in enumerate(paths):
        try:
            out = fn(images=tf.constant([Path(path).read_bytes()]))
        except (tf.errors.InvalidArgumentError, OSError):
            failed += 1
            continue
        rows.append(i)
        probs.append(out["probabilities"].numpy()[0])
    if not rows:
        return {"n_images": 0, "undecodable": failed}
    probs = np.stack(probs)
    ref = probs_keras[rows]
    return {"n_images": len(rows), "undecodable": failed,
            "max_abs_prob_diff": float(np.abs(ref - probs).max()),
            "top1_agreement": round(float((ref.argmax(1) == probs.argmax(1)).mean()), 6)}


# ------------------------------------------------------------------------------------------ images


def _load_images(paths, labels, size: int, limit: int, seed: int):
    """Up to `limit` readable images (a seeded sample when there are more) as uint8 pixels."""
    order = np.arange(len(paths))
    if len(order) > limit:
        order = np.sort(np.random.default_rng(seed).choice(order, limit, replace=False))
    kept, pixels, kept_labels = [], [], []
    for i in order:
        try:
            pixels.append(load_image(paths[i], size))
        except ImageReadError:
            continue
        kept.append(str(paths[i]))
        kept_labels.append(int(labels[i]))
    array = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return kept, array, kept_labels


def _predict_keras(model, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.asarray(model.predict(pixels.astype(np.float32), batch_size=batch_size, verbose=0), np.float32)


def _size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _metadata(labels: list[str], size: int, quantize: str) -> dict:
    from tltool import __version__

    return {"labels": labels, "image_size": size, "input": "RGB pixels 0..255, NHWC", "quantize": quantize,
            "tltool_version": __version__}


# ------------------------------------------------------------------------------------------ SavedModel


def _write_savedmodel(model, labels: list[str], size: int, path: Path) -> None:
    """A SavedModel whose serving signatures do all the work: decode, resize, run, name the top classes."""
    import keras
    import tensorflow as tf

    k = min(5, len(labels))
    with tempfile.TemporaryDirectory() as scratch:
        labels_file = Path(scratch) / rundir.LABELS_FILE
        labels_file.write_text("".join(f"{name}\n" for name in labels), encoding="utf-8")
        # A table initialised from the file makes labels.txt an asset: copied into the SavedModel and
        # read from there when it is loaded (TF Serving included).
        table = tf.lookup.StaticHashTable(
            tf.lookup.TextFileInitializer(str(labels_file), tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                                          tf.string, tf.lookup.TextFileIndex.WHOLE_LINE), default_value="")
        # Tracking the model as well would store every weight twice (under the model and the endpoints).
        archive = keras.export.ExportArchive()
        archive.track(table)

        def outputs(pixels):
            probs = model(tf.cast(pixels, tf.float32), training=False)
            scores, index = tf.math.top_k(probs, k=k)
            names = table.lookup(tf.cast(index, tf.int64))
            return {"probabilities": probs, "label": names[:, 0], "score": scores[:, 0],
                    "top_k_labels": names, "top_k_scores": scores}

        def decode(encoded):
            # Decoded as Pillow does in `load_image`, so both signatures see the same pixels: accurate
            # JPEG DCT, PNG transparency composited on white. (EXIF rotation is not applied in the graph.)
            def jpeg():
                return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")

            def png():
                rgba = tf.cast(tf.io.decode_png(encoded, channels=4), tf.float32)
                alpha = rgba[..., 3:] / 255.0
                return tf.cast(tf.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), tf.uint8)

            def other():  # GIF (first frame), BMP, WebP
                return tf.io.decode_image(encoded, channels=3, expand_animations=False)

            is_png = tf.equal(tf.strings.substr(encoded, 0, 4), b"\x89PNG")
            image = tf.case([(tf.io.is_jpeg(encoded), jpeg), (is_png, png)], default=other)
            # Antialiased bilinear is what Pillow's bilinear resize does when it shrinks an image.
            image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

        def serve_encoded(images):
            pixels = tf.map_fn(decode, images, fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
            return outputs(pixels)

        archive.add_endpoint("serving_default", serve_encoded,
                             input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        archive.add_endpoint("serving_pixels", outputs,
                             input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="pixels")])
        try:
            archive.write_out(str(path), verbose=False)
        except Exception as exc:  # TensorFlow raises many types while tracing and saving
            raise ExportError(f"Writing the SavedModel failed ({type(exc).__name__}: {str(exc)[:200]}).") from None


# ------------------------------------------------------------------------------------------ TFLite


def _float_savedmodel(model, size: int, path: str) -> None:
    """The model alone with a float32 pixel signature: the converters' input."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.add_endpoint("serving_default", functools.partial(model.__call__, training=False),
                         input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    archive.write_out(path, verbose=False)


def _convert_tflite(model, size: int, quantize: str, representative: np.ndarray | None, labels: list[str]):
    """TFLite bytes with metadata; for int8 also the float32 model's size (the size check's reference)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as scratch:
        _float_savedmodel(model, size, scratch)

        def convert(mode: str) -> bytes:
            converter = tf.lite.TFLiteConverter.from_saved_model(scratch)
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
            try:
                data = converter.convert()
            except Exception as exc:  # the converter raises ConverterError, RuntimeError, ValueError...
                last_line = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
                raise ExportError(f"TFLite conversion ({mode}) failed: {type(exc).__name__}: {last_line}") from None
            return _embed_tflite_metadata(data, _metadata(labels, size, mode))

        if quantize == "int8" and (representative is None or len(representative) == 0):
            raise ExportError("No readable training images to calibrate int8 quantization with.")
        data = convert(quantize)
        float32_size = None
        if quantize == "int8":
            float32_size = len(convert("none"))
    return data, float32_size


def _embed_tflite_metadata(data: bytes, meta: dict) -> bytes:
    """Add a `tltool` metadata entry (JSON: labels, input size) to a TFLite flatbuffer.

    TFLite keeps named metadata buffers in the model itself (the converter stores its own there);
    interpreters ignore names they do not know, so the file stays loadable everywhere.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(tree.buffers) - 1
    tree.metadata = [m for m in (tree.metadata or []) if m.name not in (METADATA_KEY, METADATA_KEY.encode())]
    tree.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


# ------------------------------------------------------------------------------------------ ONNX


def _write_onnx(model, size: int, labels: list[str], path: Path) -> None:
    import warnings

    import onnx
    import tensorflow as tf

    tf2onnx_logger = logging.getLogger("tf2onnx")
    level = tf2onnx_logger.level
    # tf2onnx logs tracebacks of optimizer passes it skips; they are noise, not failures.
    tf2onnx_logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf2onnx's numpy deprecation chatter
            model.export(str(path), format="onnx", verbose=False,
                         input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="pixels")])
    except Exception as exc:  # tf2onnx raises many types for unsupported ops
        raise ExportError(f"ONNX conversion failed ({type(exc).__name__}: {str(exc)[:200]}).") from None
    finally:
        tf2onnx_logger.setLevel(level)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(_metadata(labels, size, "none"))
    rundir.atomic_write_bytes(path, proto.SerializeToString())
