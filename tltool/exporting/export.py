"""`export`: turn a run's model into SavedModel, .keras, TFLite or ONNX, and check the result.

Every export checks itself before it reports success: the run's validation images (the same seeded split
that `finetune` made) go through the Keras model and through the exported artifact, reloaded the way a
user would load it (`tltool.exporting.predictors.load_predictor`). The figures land in `export.json` next to the
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

from tltool.exporting import tflite as tflite_export
from tltool.errors import ExportError, ExportOptionError, RunDirError
from tltool.exporting.graph_decode import decode_like_pillow
from tltool.data.folders import SkipLog, decoded_batches

FORMATS = ("savedmodel", "keras", "tflite", "onnx")
QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
EXPORT_FILE = "export.json"
SAVEDMODEL_VERSION = "1"
TFLITE_FILE = "model.tflite"
ONNX_FILE = "model.onnx"

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
        # The weight schemes that meet both bounds are explained in tflite_export.
        return Tolerance(max_accuracy_drop=1.5, max_size_ratio=0.3)
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

    from tltool.engine.stages import load_split_data
    from tltool.exporting.predictors import KerasPredictor, load_predictor
    from tltool.recipe import load_recipe

    labels = rundir.read_labels(run_dir)
    keras_predictor = KerasPredictor.from_file(run_dir / rundir.MODEL_FILE, labels)
    model = keras_predictor.model
    size = int(model.input_shape[1])
    recipe = load_recipe(run_dir / rundir.RECIPE_FILE)
    split = load_split_data(recipe)
    check_paths, check_pixels, check_labels = _load_images(split.val.paths, split.val.labels, size,
                                                           MAX_CHECK_IMAGES, recipe.seed)
    if not check_paths:
        raise ExportError(f"No readable validation images in {split.val.root}: the export cannot be checked.")

    out.parent.mkdir(parents=True, exist_ok=True)
    probs_keras = keras_predictor.predict(check_pixels)
    tol = tolerance_for(format, quantize)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))

    def check_artifact(predictor=None) -> dict:
        """Compare what is in `tmp`, reloaded the way a user would (or `predictor`), with the Keras model."""
        predictor = predictor or load_predictor(tmp)
        return _compare(probs_keras, predictor.predict(check_pixels), np.asarray(check_labels))

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
            rundir.write_labels(tmp, labels)
            representative = None
            if quantize == "int8":
                _, representative, _ = _load_images(split.train.paths, split.train.labels, size,
                                                    REPRESENTATIVE_IMAGES, recipe.seed)
            candidates, float32_size = tflite_export.convert(model, size, quantize, representative,
                                                             _metadata(labels, size, quantize))
            if float32_size is not None:
                extra["float32_size_bytes"] = float32_size
            report, tried = _first_accurate(candidates, artifact, check_artifact, tol)
            if candidates[0].int8_weights:
                extra["int8_weights"] = tried[-1][0]
                extra["int8_accuracy_by_weights"] = {scheme: r["accuracy_export"] for scheme, r in tried}
        else:
            artifact = tmp / ONNX_FILE
            _write_onnx(model, size, labels, artifact)
            rundir.write_labels(tmp, labels)

        if format != "tflite":
            predictor = load_predictor(tmp)
            report = check_artifact(predictor)
            if format == "savedmodel":
                extra["encoded_images_signature"] = _check_encoded_signature(predictor, check_paths, probs_keras)
        size_bytes = _size_of(artifact)
        if "float32_size_bytes" in extra:
            extra["size_ratio"] = round(size_bytes / extra["float32_size_bytes"], 4)
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


def _first_accurate(candidates, artifact: Path, check, tol: Tolerance):
    """Write the candidates to `artifact` in turn until one is within the accuracy bound (or none is left).

    Returns the last check's report and [(int8 weight scheme, report)] for every candidate tried.
    """
    max_drop = tol.max_accuracy_drop if tol.max_accuracy_drop is not None else float("inf")
    tried = []
    for candidate in candidates:
        rundir.atomic_write_bytes(artifact, candidate.data)
        report = check()
        tried.append((candidate.int8_weights, report))
        if _accuracy_drop(report) <= max_drop:
            break
    return report, tried


def _accuracy_drop(report: dict) -> float:
    """Accuracy lost by the export, in percentage points."""
    return 100 * (report["accuracy_keras"] - report["accuracy_export"])


def _check_tolerance(result: dict, tol: Tolerance) -> None:
    what = f"{result['format']}" + (f" ({result['quantize']})" if result["quantize"] != "none" else "")
    problems = []
    if tol.max_abs_prob_diff is not None and result["max_abs_prob_diff"] > tol.max_abs_prob_diff:
        problems.append(f"probabilities differ from the Keras model's by up to {result['max_abs_prob_diff']:.3g} "
                        f"(allowed {tol.max_abs_prob_diff:g})")
    drop = _accuracy_drop(result)
    if tol.max_accuracy_drop is not None and drop > tol.max_accuracy_drop:
        problems.append(f"accuracy drops by {drop:.1f} points ({100 * result['accuracy_keras']:.1f}% -> "
                        f"{100 * result['accuracy_export']:.1f}%; allowed {tol.max_accuracy_drop:g})")
    if tol.max_size_ratio is not None and result.get("size_ratio", 0) > tol.max_size_ratio:
        problems.append(f"it is {result['size_ratio']:.3f}x the float32 size (allowed {tol.max_size_ratio:g}x)")
    if problems:
        hint = (" Try --quantize dynamic or float16, or more varied training images for calibration."
                if result["quantize"] in ("int8", "dynamic") else "")
        tried = result.get("int8_accuracy_by_weights", {})
        if len(tried) > 1:
            hint = (" Int8 weight schemes tried (validation accuracy): "
                    + ", ".join(f"{scheme} {100 * acc:.1f}%" for scheme, acc in tried.items()) + "." + hint)
        raise ExportError(f"The {what} export failed its check on {result['n_images']} validation images: "
                          f"{'; '.join(problems)}. Nothing was written.{hint}")


def _check_encoded_signature(predictor, paths: list[str], probs_keras: np.ndarray) -> dict:
    """Run the files' own bytes through `serving_default` (decoding and resizing in the graph).

    TensorFlow's decoders and resize differ slightly from Pillow's (rounding; CMYK JPEGs, EXIF in formats
    other than JPEG), so this is reported, not held to the tolerance of the pixel signature.
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
    sample = [str(paths[i]) for i in order]
    batches = list(decoded_batches(sample, size, 64, SkipLog()))
    pixels = np.concatenate([b for b, _ in batches]) if batches else np.zeros((0, size, size, 3), np.uint8)
    ok = np.concatenate([o for _, o in batches]) if batches else np.zeros((0,), bool)
    kept = [path for path, good in zip(sample, ok) if good]
    kept_labels = [int(labels[i]) for i, good in zip(order, ok) if good]
    return kept, pixels[ok], kept_labels


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

        def serve_encoded(images):
            pixels = tf.map_fn(lambda encoded: decode_like_pillow(encoded, size), images,
                               fn_output_signature=tf.TensorSpec((size, size, 3), tf.uint8))
            return outputs(pixels)

        archive.add_endpoint("serving_default", serve_encoded,
                             input_signature=[tf.TensorSpec([None], tf.string, name="images")])
        archive.add_endpoint("serving_pixels", outputs,
                             input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="pixels")])
        try:
            archive.write_out(str(path), verbose=False)
        except Exception as exc:  # TensorFlow raises many types while tracing and saving
            raise ExportError(f"Writing the SavedModel failed ({type(exc).__name__}: {str(exc)[:200]}).") from None


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
    entry.key = tflite_export.METADATA_KEY
    entry.value = json.dumps(_metadata(labels, size, "none"))
    rundir.atomic_write_bytes(path, proto.SerializeToString())
