"""`export`: a run's model as SavedModel, .keras, TFLite or ONNX, each checked against the Keras model.

Every export checks itself before it reports success (see exporting/checks.py): the run's validation
images go through the Keras model and through the exported artifact, reloaded the way a user would load
it. The figures land in `export.json` next to the artifact; an artifact outside tolerance is never
published, and `ExportError` says by how much it missed.

Layouts (default folder RUN/export/FORMAT, or FORMAT-QUANTIZE for quantized TFLite):

    savedmodel/1/        TF Serving layout (numbered version). Signatures: `serving_default` takes encoded
                         images (tf.string: JPEG, PNG, GIF, BMP) and decodes, resizes and runs the model in
                         the graph; `serving_pixels` takes uint8 pixels. Both return `probabilities`,
                         `label`, `score`, `top_k_labels`, `top_k_scores`, and `ood_score` and
                         `is_unknown` (ood_score > 1). labels.txt is an asset.
    keras/model.keras    the Keras model ({probabilities, ood_score} out), with labels.txt
    tflite/model.tflite  float32 pixels (0..255) in; output 0 probabilities [N, classes], output 1 ood_score
                         [N, 1], also by name in the `serving_default` signature (`pixels` in); int8 takes and
                         returns uint8. Labels and input size travel inside the file as the `tltool` metadata
                         entry (JSON), and in labels.txt next to it.
    onnx/model.onnx      float32 NHWC pixels (0..255) in; outputs `probabilities` and `ood_score` (by name);
                         labels in the model's metadata_props (`tltool`).

Models trained before tltool had the OOD score have probabilities alone, and export as before.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tltool import outputs, rundir
from tltool.data.manifest import manifest_split, read_manifest
from tltool.engine.setup import RunSetup, prepare_run
from tltool.errors import ExportError, ExportOptionError, RunDirError
from tltool.exporting import checks, mediapipe_check, tflite
from tltool.exporting.metadata import model_metadata
from tltool.exporting.tflite_metadata import ModelInfo
from tltool.exporting.predictors import KerasPredictor, load_predictor, tflite_runtime
from tltool.engine.trust import blank_images
from tltool.models.ood import Scores, ood_parts
from tltool.recipe import load_recipe

FORMATS = ("savedmodel", "keras", "tflite", "onnx")
QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
EXPORT_FILE = rundir.EXPORT_FILE
SAVEDMODEL_VERSION = "1"
TFLITE_FILE = "model.tflite"
ONNX_FILE = "model.onnx"


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
    run_dir, recipe, out = _checked(run_dir, format, quantize, out, force)
    t_start = time.perf_counter()
    keras_predictor = KerasPredictor.from_file(run_dir / rundir.MODEL_FILE, rundir.read_labels(run_dir))
    setup = _recorded_setup(run_dir, recipe, keras_predictor.labels)
    check = _CheckImages.of(setup, keras_predictor)
    tol = checks.tolerance_for(format, quantize)
    # Written beside `out` and put in place whole once checked: the old export stays until the new is in.
    with outputs.replacing_output_dir(out, "export") as tmp:
        writer = _WRITERS[format]
        artifact, report, extra = writer(keras_predictor, setup, quantize, tmp, check, tol)
        result = {"format": format, "quantize": quantize, "path": str(out), **_size(artifact, extra), **report,
                  "n_images": len(check.paths), "image_size": keras_predictor.image_size,
                  "num_classes": len(keras_predictor.labels), "augment_flip": recipe.augment.flip, **extra,
                  "tolerance": {k: v for k, v in asdict(tol).items() if v is not None},
                  "seconds": round(time.perf_counter() - t_start, 2)}
        checks.check_tolerance(result, tol)
        rundir.atomic_write_json(tmp / EXPORT_FILE, result)
    return result


def export_run(run_dir, format: str | None = None, quantize: str | None = None, out=None, force: bool = False,
               log=None) -> list[dict]:
    """Export a run as `tltool export RUN` does: the given format, or every format of the recipe's `export`.

    Args:
        run_dir: a run directory written by `tltool finetune`.
        format: one format; default every format in the run recipe's `export.formats`.
        quantize: TFLite quantization; default the recipe's `export.quantize` (applies to tflite only).
        out: folder to write (only with a single format).
        force: replace existing export folders.
        log: callable for the lines on each export (what starts, where it went, how its checks went), or None.

    Returns:
        One `export.json` content per format, in order.
    """
    recipe_file = Path(run_dir) / rundir.RECIPE_FILE
    defaults = load_recipe(recipe_file).export if recipe_file.is_file() else None
    formats = [format] if format else (list(defaults.formats) if defaults else ["savedmodel"])
    if out is not None and len(formats) > 1:
        raise ExportOptionError(f"--out takes one format; the recipe lists {', '.join(formats)}. Add --format.")
    if quantize not in (None, "none") and "tflite" not in formats:
        raise ExportOptionError(f"Quantization applies to --format tflite only. Received: format(s) "
                                f"{', '.join(formats)}, quantize={quantize}. Add --format tflite.")
    jobs = [(name, (quantize or (defaults.quantize if defaults else "none")) if name == "tflite" else "none")
            for name in formats]
    # Whatever would refuse an export refuses before the first "Exporting" line (and before any export of a
    # recipe's several formats is written): a refused command prints its one-line error alone. `export`
    # checks again when it writes.
    for name, q in jobs:
        _checked(run_dir, name, q, out, force)
    results = []
    for name, q in jobs:
        if log:
            log(f"Exporting {run_dir} as {name}" + (f" ({q})" if q != "none" else "")
                + ", then checking the export against the Keras model on the validation images.")
        results.append(export(run_dir, name, quantize=q, out=out, force=force))
        for line in describe_export(results[-1]) if log else ():
            log(line)
    return results


def describe_export(result: dict) -> list[str]:
    """Lines on an export: where it went and its size, then how its self-checks went."""
    what = result["format"] + (f" ({result['quantize']})" if result["quantize"] != "none" else "")
    size = f"{result['size_bytes'] / 1e6:.2f} MB" + (f", {result['size_ratio']:.3f}x float32"
                                                    if "size_ratio" in result else "")
    if "int8_weights" in result:
        size += f", {result['int8_weights']} weight scales"
    lines = [f"Exported {what} to {result['path']} ({size}).",
             f"Check on {result['n_images']} validation images: top-1 agreement {result['top1_agreement']:.4f}, "
             f"max |prob diff| {result['max_abs_prob_diff']:.2g}, accuracy {result['accuracy_keras']:.4f} (Keras) "
             f"vs {result['accuracy_export']:.4f} (export)"
             + (f"; in/out-of-distribution agreement {result['unknown_agreement']:.4f}, max |ood_score diff| "
                f"{result['max_abs_ood_diff']:.2g}." if "unknown_agreement" in result else ".")]
    mediapipe = result.get("mediapipe")
    if mediapipe and mediapipe.get("checked"):
        lines.append(f"MediaPipe Tasks' ImageClassifier loads it: the class names and the same top class as "
                     f"{result['runtime']} on {mediapipe['n_images']} images.")
    elif mediapipe:
        lines.append(f"Not checked in MediaPipe Tasks: {mediapipe['reason']}.")
    return lines


def _checked(run_dir, format: str, quantize: str, out, force: bool):
    """What can refuse an export before any work (the options, the run directory, the output folder); returns
    (the run directory, its recipe, the output folder)."""
    _check_options(format, quantize)
    if (Path(run_dir) / EXPORT_FILE).is_file():
        raise RunDirError(f"{run_dir} is an export, not a run directory: export from the run it came from "
                          f"(`tltool export RUN --format ...`).")
    run_dir = rundir.require_run_dir(Path(run_dir))
    recipe = load_recipe(run_dir / rundir.RECIPE_FILE)
    return run_dir, recipe, _export_folder(run_dir, recipe, format, quantize, out, force)


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


def _export_folder(run_dir: Path, recipe, format: str, quantize: str, out, force: bool) -> Path:
    """Where the export goes: not the run directory or anything holding it, not inside a data folder, and
    an existing folder only with `force` when it holds an earlier tltool export."""
    name = format if quantize == "none" else f"{format}-{quantize}"
    out = Path(out) if out is not None else run_dir / "export" / name
    folders = [f for f in (recipe.data.train, recipe.data.val, recipe.data.test) if f]
    outputs.check_output_dir(out, "export", force=force, inputs=[run_dir, *folders], data=folders)
    return out


def _recorded_setup(run_dir: Path, recipe, labels: list[str]) -> RunSetup:
    """The run's data as it recorded it (data.json), not a re-split of the folder as it is now; the classes
    must be the model's (labels.txt), or every accuracy of the check would compare misaligned labels."""
    manifest = read_manifest(run_dir)
    setup = prepare_run(recipe, weights=False, split=manifest_split(manifest) if manifest else None)
    if setup.classes != labels:
        raise ExportError(f"The classes of {run_dir}'s data ({', '.join(setup.classes)}) are not its model's "
                          f"labels.txt ({', '.join(labels)}): the export cannot be checked. Restore the run's data "
                          f"or labels.txt.")
    return setup


@dataclass
class _CheckImages:
    """The validation images of the self-check, and the Keras model's probabilities on them."""

    paths: list[str]
    pixels: np.ndarray
    labels: np.ndarray
    keras: Scores  # the Keras model's probabilities (and OOD scores) on them

    @classmethod
    def of(cls, setup: RunSetup, keras_predictor) -> "_CheckImages":
        val = setup.split.val
        paths, pixels, labels = checks.load_images(val.paths, val.labels, keras_predictor.image_size,
                                                   checks.MAX_CHECK_IMAGES, setup.recipe.seed)
        if not paths:
            raise ExportError(f"No readable validation images in {val.root}: the export cannot be checked.")
        return cls(paths, pixels, np.asarray(labels), keras_predictor.scores(pixels))

    def against(self, predictor) -> dict:
        """The export's figures: `predictor` (the artifact as a user would load it) against the Keras model."""
        return checks.compare(self.keras, predictor.scores(self.pixels), self.labels)


def _keras_artifact(keras_predictor, setup, quantize, tmp: Path, check: _CheckImages, tol):
    shutil.copyfile(keras_predictor.source, tmp / rundir.MODEL_FILE)
    rundir.write_labels(tmp, keras_predictor.labels)
    return tmp / rundir.MODEL_FILE, check.against(load_predictor(tmp)), {}


def _savedmodel_artifact(keras_predictor, setup, quantize, tmp: Path, check: _CheckImages, tol):
    from tltool.exporting.savedmodel import write_savedmodel

    artifact = tmp / SAVEDMODEL_VERSION
    write_savedmodel(keras_predictor.model, keras_predictor.labels, keras_predictor.image_size, artifact)
    predictor = load_predictor(tmp)
    signature = checks.check_encoded_signature(predictor, check.paths, check.keras)
    return artifact, check.against(predictor), {"encoded_images_signature": signature}


def _tflite_artifact(keras_predictor, setup, quantize, tmp: Path, check: _CheckImages, tol):
    """Convert, then write the candidates (int8 weight schemes) in turn until one passes the accuracy bound."""
    artifact, size, labels = tmp / TFLITE_FILE, keras_predictor.image_size, keras_predictor.labels
    rundir.write_labels(tmp, labels)
    representative = None
    if quantize == "int8":
        train = setup.split.train
        _, representative, _ = checks.load_images(train.paths, train.labels, size, checks.REPRESENTATIVE_IMAGES,
                                                  setup.recipe.seed)
        representative = _with_blank_images(representative, keras_predictor.model, size)
    candidates, float32_size = tflite.convert(keras_predictor.model, size, quantize, representative,
                                              model_metadata(labels, size, quantize, setup.recipe.augment.flip),
                                              _model_info(setup, keras_predictor))
    report, tried = checks.first_accurate(candidates, artifact, lambda: check.against(load_predictor(tmp)), tol)
    extra: dict = {} if float32_size is None else {"float32_size_bytes": float32_size}
    if candidates[0].int8_weights:
        extra["int8_weights"] = next(scheme for scheme, found in tried if found is report)  # the file's
        extra["int8_accuracy_by_weights"] = {scheme: r["accuracy_export"] for scheme, r in tried}
    # The file as apps load it: MediaPipe Tasks' ImageClassifier, against LiteRT (the checks' runtime).
    litert = load_predictor(tmp)
    sample = check.pixels[:mediapipe_check.MAX_IMAGES]
    extra["runtime"] = tflite_runtime()
    extra["mediapipe"] = mediapipe_check.check(artifact, labels, sample, litert.scores(sample), litert.output_step)
    return artifact, report, extra


def _with_blank_images(representative: np.ndarray, model, size: int) -> np.ndarray:
    """The int8 calibration images, plus the blank and noise images of a model whose OOD score rejects them.

    Calibration sets each tensor's int8 range from what these images produce: on training images alone the
    OOD score spans [0, ~0] (each is its own nearest neighbour), and the int8 model could then not represent
    the 2.0 it gives a blank frame (XNNPACK even refused to prepare its max)."""
    if not isinstance(model.output, dict) or ood_parts(model)[4] is None:
        return representative
    return np.concatenate([representative, blank_images(size)])


def _model_info(setup: RunSetup, keras_predictor) -> ModelInfo:
    """The model-level metadata fields: the recipe's `export` section, with defaults that say what it is."""
    recipe, labels = setup.recipe, keras_predictor.labels
    outputs = ("class probabilities, then an out-of-distribution score (above 1.0: unlike the training images)"
               if keras_predictor.has_ood else "class probabilities")
    shown = ", ".join(labels[:10]) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")
    description = recipe.export.description or (
        f"Image classifier for {len(labels)} classes ({shown}), fine-tuned from {recipe.backbone.name} by tltool. "
        f"Input: RGB pixels 0..255. Outputs: {outputs}.")
    return ModelInfo(name=recipe.name, description=description,
                     version=recipe.export.model_version or keras_predictor.source.parent.name, author=recipe.export.author,
                     license=recipe.export.license)


def _onnx_artifact(keras_predictor, setup, quantize, tmp: Path, check: _CheckImages, tol):
    from tltool.exporting.onnx_export import write_onnx

    artifact = tmp / ONNX_FILE
    write_onnx(keras_predictor.model, keras_predictor.image_size, keras_predictor.labels, artifact,
               setup.recipe.augment.flip)
    rundir.write_labels(tmp, keras_predictor.labels)
    return artifact, check.against(load_predictor(tmp)), {}


_WRITERS = {"keras": _keras_artifact, "savedmodel": _savedmodel_artifact, "tflite": _tflite_artifact,
            "onnx": _onnx_artifact}


def _size(artifact: Path, extra: dict) -> dict:
    size = {"size_bytes": checks.size_of(artifact)}
    if "float32_size_bytes" in extra:
        size["size_ratio"] = round(size["size_bytes"] / extra["float32_size_bytes"], 4)
    return size
