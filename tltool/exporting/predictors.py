"""Loading any tltool model (run directory or export) for inference.

`load_predictor` gives one interface over every format: `.labels`, `.image_size`, `.format`,
`.predict(uint8 pixels N x H x W x 3) -> probabilities N x C` and `.scores(pixels)`, which adds the
out-of-distribution score of models that have it (`.has_ood`; models exported before it existed have not).
Images are read with Pillow (`tltool.data.images.load_image`: EXIF rotation, CMYK, alpha on white) for every
format, so the same file gives the same pixels, and the same answer, whichever model it goes to.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from tltool import rundir
from tltool.errors import RunDirError
from tltool.exporting.metadata import METADATA_KEY, metadata_entries, read_tflite_metadata
from tltool.exporting.tflite_metadata import METADATA_BUFFER, read_standard_metadata
from tltool.models.ood import OOD_SCORE, PROBABILITIES, Scores, split_outputs


class Predictor:
    """A loaded model: `scores(uint8 pixels)` -> probabilities and (where the model has it) the OOD score,
    `predict(uint8 pixels)` -> probabilities, with the labels of its outputs."""

    format = "?"
    has_ood = False  # the model outputs `ood_score` (every model tltool trained since it existed)
    trained_flip: str | None = None  # the recipe's `augment.flip` it trained with, where recorded (`mirror_tta`)

    def __init__(self, source: Path, labels: list[str], image_size: int):
        self.source = Path(source)
        self.labels = list(labels)
        self.image_size = int(image_size)

    def predict(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (float32, N x num_classes) for uint8 RGB pixels N x size x size x 3."""
        return self.scores(pixels, batch_size).probabilities

    def scores(self, pixels: np.ndarray, batch_size: int = 32) -> Scores:
        """Probabilities and OOD scores (None for a model without them) for uint8 RGB pixels N x size x size x 3."""
        pixels = np.asarray(pixels)
        expected = (self.image_size, self.image_size, 3)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise ValueError(f"Expected pixels of shape (N, {self.image_size}, {self.image_size}, 3). "
                             f"Received: shape={pixels.shape}")
        if len(pixels) == 0:
            empty = np.zeros(0, np.float32) if self.has_ood else None
            return Scores(np.zeros((0, len(self.labels)), np.float32), empty)
        pixels = np.clip(pixels, 0, 255).astype(np.uint8) if pixels.dtype != np.uint8 else pixels
        parts = [self._predict_batch(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
        probs = np.concatenate([p for p, _ in parts]).astype(np.float32)
        ood = np.concatenate([o for _, o in parts]).astype(np.float32).reshape(-1) if self.has_ood else None
        return Scores(probs, ood)

    def _predict_batch(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, ood_score or None) of one batch."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.format} {self.source} ({len(self.labels)} classes, {self.image_size}px)>"


class KerasPredictor(Predictor):
    """A Keras model (pixels in, probabilities [and ood_score] out), loaded from a file or already in memory."""

    format = "keras"

    def __init__(self, model, labels: list[str], source: Path | str = "<memory>", batch_size: int = 32):
        output = model.output  # one tensor, or {probabilities, ood_score}
        self.has_ood = isinstance(output, dict) and OOD_SCORE in output
        outputs = (output[PROBABILITIES] if isinstance(output, dict) else output).shape[-1]
        if outputs != len(labels):
            raise RunDirError(f"{source} is inconsistent: the model has {outputs} outputs but its labels list "
                              f"{len(labels)} classes. Train the run again with `tltool finetune`.")
        self.model = model
        self.batch_size = batch_size
        super().__init__(Path(source), labels, model.input_shape[1])

    @classmethod
    def from_file(cls, model_file: Path, labels: list[str]) -> "KerasPredictor":
        import zipfile

        import keras

        if Path(model_file).suffix == ".keras" and Path(model_file).is_file() and not zipfile.is_zipfile(model_file):
            # Keras would say "File not found" of a file that is there.
            raise RunDirError(f"Cannot load {model_file}: it is not a Keras model file (a .keras file is a zip "
                              f"archive; this one is damaged or something else). Train the run again with "
                              f"`tltool finetune`, or export it again.")
        try:
            model = keras.models.load_model(model_file, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises ValueError, OSError, zipfile errors ... for a damaged file
            raise RunDirError(f"Cannot load {model_file} ({type(exc).__name__}: {str(exc)[:120]}). "
                              f"Train the run again with `tltool finetune`.") from None
        return cls(model, labels, model_file)

    def scores(self, pixels: np.ndarray, batch_size: int | None = None) -> Scores:
        return super().scores(pixels, batch_size or self.batch_size)

    def predict(self, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        return self.scores(pixels, batch_size).probabilities

    def _predict_batch(self, pixels):
        x = pixels.astype(np.float32)
        # Padding to whole batches gives the model one input shape, so it is traced once (a second trace
        # for a ragged last batch costs seconds on CPU; the padding costs far less). predict_on_batch:
        # model.predict's per-call set-up costs more than a small batch's inference.
        pad = -len(x) % self.batch_size
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        probs, ood = split_outputs(self.model.predict_on_batch(x))
        return probs[:len(pixels)], None if ood is None else ood[:len(pixels)]


class SavedModelPredictor(Predictor):
    format = "savedmodel"

    def __init__(self, path: Path):
        import tensorflow as tf

        try:
            self.loaded = tf.saved_model.load(str(path))
        except Exception as exc:  # noqa: BLE001 - OSError (a corrupt saved_model.pb), NotFoundError (variables/) ...
            raise _unreadable(path, "SavedModel", exc) from None
        self.signatures = self.loaded.signatures
        if "serving_pixels" not in self.signatures:
            raise RunDirError(f"The SavedModel at {path} has no `serving_pixels` signature: it was not written "
                              f"by `tltool export`. Export the run again.")
        signature = self.signatures["serving_pixels"]
        spec = signature.structured_input_signature[1]["pixels"]
        self.has_ood = OOD_SCORE in signature.structured_outputs
        super().__init__(path, rundir.read_labels(path / "assets" / rundir.LABELS_FILE), spec.shape[1])

    def _predict_batch(self, pixels):
        import tensorflow as tf

        out = self.signatures["serving_pixels"](pixels=tf.constant(pixels))
        return out[PROBABILITIES].numpy(), out[OOD_SCORE].numpy() if self.has_ood else None


class TFLitePredictor(Predictor):
    format = "tflite"

    def __init__(self, path: Path):
        data = Path(path).read_bytes()
        entries = metadata_entries(path, data)
        meta = read_tflite_metadata(path, entries)  # tltool's own entry: every tltool export has it
        standard = read_standard_metadata(path, data, entries.get(METADATA_BUFFER))  # any classifier's
        self.interpreter = _tflite_interpreter(path)
        details = self.interpreter.get_input_details()[0]
        labels = (standard and standard.labels) or meta.get("labels") or _labels_next_to(path)
        outputs = self.interpreter.get_output_details()
        width = max(int(d["shape"][-1]) for d in outputs)  # the probabilities; the OOD score is [N, 1]
        size = _checked_metadata(path, labels, meta.get("image_size"), int(details["shape"][1]), width)
        super().__init__(path, labels, size)
        self.quantize = meta.get("quantize", "none")
        self.trained_flip = meta.get("augment_flip")
        # A float input declared as normalised, (pixel - mean) / std (Model Maker's files); tltool's take
        # plain pixels (mean 0, std 1).
        self._norm = (standard.norm_mean, standard.norm_std) if standard and standard.norm_mean else None
        # Outputs told apart by shape: [N, classes] probabilities, [N, 1] the OOD score (never one class).
        self._probs = next(d for d in outputs if d["shape"][-1] == len(self.labels))
        self._ood = next((d for d in outputs if d["shape"][-1] == 1 and d is not self._probs), None)
        self.has_ood = self._ood is not None
        # The probabilities' resolution: one step of a uint8 output (1/256), 0 for float32.
        self.output_step = 0.0 if self._probs["dtype"] == np.float32 else float(self._probs["quantization"][0])
        self._batch = None

    def _predict_batch(self, pixels):
        it = self.interpreter
        detail = it.get_input_details()[0]
        if self._batch != len(pixels):
            it.resize_tensor_input(detail["index"], [len(pixels), self.image_size, self.image_size, 3])
            it.allocate_tensors()
            self._batch = len(pixels)
        values = pixels.astype(np.float32)
        if self._norm is not None and detail["dtype"] == np.float32:
            mean, std = (np.asarray(v, np.float32) for v in self._norm)
            values = (values - mean) / std
        it.set_tensor(detail["index"], _quantize(values, detail))
        it.invoke()
        probs = _dequantize(it.get_tensor(self._probs["index"]), self._probs)
        return probs, _dequantize(it.get_tensor(self._ood["index"]), self._ood) if self.has_ood else None


class OnnxPredictor(Predictor):
    format = "onnx"

    def __init__(self, path: Path):
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors (InvalidProtobuf, Fail ...)
            raise _unreadable(path, "ONNX model", exc) from None
        meta = json.loads(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY, "{}"))
        self._input = self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self.has_ood = OOD_SCORE in names
        self._outputs = [PROBABILITIES, OOD_SCORE] if self.has_ood else names[:1]
        labels = meta.get("labels") or _labels_next_to(path)
        model_size = self.session.get_inputs()[0].shape[1]
        width = self.session.get_outputs()[names.index(self._outputs[0])].shape[-1]
        size = _checked_metadata(path, labels, meta.get("image_size"), model_size if isinstance(model_size, int)
                                 else None, width if isinstance(width, int) else None)
        super().__init__(path, labels, size)
        self.trained_flip = meta.get("augment_flip")

    def _predict_batch(self, pixels):
        out = self.session.run(self._outputs, {self._input: pixels.astype(np.float32)})
        return out[0], out[1] if self.has_ood else None


class MirrorAveraged(Predictor):
    """Test-time augmentation: the mean of a model's probabilities for each image and its mirror image.

    A model trained on mirrored copies has learnt both; averaging the two answers evens out what either
    view shows by chance. Measured on held-out photos it adds about a point of accuracy (see the README),
    at twice the inference cost. Only for models whose training mirrored images (`mirror_tta` checks).
    """

    def __init__(self, inner: Predictor):
        super().__init__(inner.source, inner.labels, inner.image_size)
        self.inner = inner
        self.has_ood = inner.has_ood
        self.format = f"{inner.format}+mirror"

    def scores(self, pixels: np.ndarray, batch_size: int = 32) -> Scores:
        pixels = np.asarray(pixels)
        mirrored = np.ascontiguousarray(pixels[:, :, ::-1]) if pixels.ndim == 4 else pixels
        plain, flipped = self.inner.scores(pixels, batch_size), self.inner.scores(mirrored, batch_size)
        ood = None if plain.ood_score is None else (plain.ood_score + flipped.ood_score) / 2
        return Scores((plain.probabilities + flipped.probabilities) / 2, ood)


def mirror_tta(predictor: Predictor, model=None) -> MirrorAveraged:
    """`predictor` with test-time mirroring, refused for a model whose training never saw mirrored images
    (digits, text, scans: `augment.flip` measured or set to none or vertical), as its run's recipe or its
    export's metadata records. `model`: where it was loaded from, for a predictor made in memory."""
    flip = predictor.trained_flip or _recorded_flip(model)
    if flip not in (None, "auto") and "horizontal" not in flip:  # `auto` left unresolved trains with the flip
        raise RunDirError(f"--tta mirrors each image, but {model or predictor.source} was trained without mirrored "
                          f"images (augment.flip: {flip}): mirrored copies would mislead it. Leave out --tta.")
    return MirrorAveraged(predictor)


def _recorded_flip(model) -> str | None:
    """The `augment.flip` recorded next to a model: its run directory's recipe, or its export folder's
    export.json (a SavedModel's version folder, or a file, is looked up in the folder above). None if neither."""
    if model is None or isinstance(model, Predictor):
        return None
    import yaml

    model = Path(model)
    folders = [model] if model.is_dir() else []
    folders.append(model.parent)
    for folder in folders:
        recipe_file, export_file = folder / rundir.RECIPE_FILE, folder / rundir.EXPORT_FILE
        try:
            if recipe_file.is_file():
                return str(((yaml.safe_load(recipe_file.read_text()) or {}).get("augment") or {}).get("flip", "auto"))
            if export_file.is_file():
                flip = json.loads(export_file.read_text()).get("augment_flip")
                return None if flip is None else str(flip)
        except (OSError, ValueError, AttributeError, yaml.YAMLError):  # unreadable: nothing recorded
            return None
    return None


def load_predictor(path) -> Predictor:
    """Load a model for inference from whatever tltool wrote.

    Loading a SavedModel runs its TensorFlow graph: load only SavedModels you trust. `.keras` files load
    in Keras's safe mode (no arbitrary code); TFLite and ONNX files hold no code, and their metadata is
    checked against the model (input size, number of labels).

    Args:
        path: a run directory (or an `export --format keras` folder), a SavedModel folder (the version
            folder or the folder holding numbered versions), a .tflite or .onnx file, or a folder holding
            exactly one of them.

    Returns:
        A `Predictor` with `.labels`, `.image_size`, `.format` and `.predict(uint8 pixels) -> probabilities`.

    Raises:
        RunDirError: nothing loadable at `path`.
    """
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"Model not found: {path}. Pass a run directory, an exported SavedModel folder, or a "
                          f".tflite / .onnx file.")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".tflite":
            return TFLitePredictor(path)
        if suffix == ".onnx":
            return OnnxPredictor(path)
        if suffix == ".keras":
            return KerasPredictor.from_file(path, _labels_next_to(path))
        raise RunDirError(f"Expected a .tflite, .onnx or .keras file, or a folder. Received: {path}")
    if (path / rundir.MODEL_FILE).is_file():
        return KerasPredictor.from_file(path / rundir.MODEL_FILE, rundir.read_labels(path))
    if (path / "saved_model.pb").is_file():
        return SavedModelPredictor(path)
    versions = sorted((p for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file()),
                      key=lambda p: int(p.name))
    if versions:
        return SavedModelPredictor(versions[-1])  # TF Serving serves the highest version too
    for suffix, cls in ((".tflite", TFLitePredictor), (".onnx", OnnxPredictor)):
        found = sorted(path.glob(f"*{suffix}"))
        if len(found) == 1:
            return cls(found[0])
        if len(found) > 1:
            raise RunDirError(f"{path} holds {len(found)} {suffix} files; pass the one to use.")
    raise RunDirError(f"No model in {path}: expected a run directory (model.keras + labels.txt), a SavedModel, "
                      f"or a .tflite / .onnx file written by `tltool export`.")


# ------------------------------------------------------------------------------------------ TFLite helpers


#: The largest input size a model file may declare: metadata is read from files users are sent.
MAX_IMAGE_SIZE = 4096


def _checked_metadata(path: Path, labels: list, declared_size, model_size: int | None,
                      output_width: int | None) -> int:
    """The input size of an exported model, after checking what its metadata says against the model itself.

    The metadata travels in a file that may come from anywhere: an input size that is not a small positive
    integer, or a label list that does not match the outputs, is refused with one line instead of failing
    (or allocating gigabytes) later.
    """
    size = declared_size if declared_size is not None else model_size
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise RunDirError(f"{path} declares an input size of {size!r}: expected an integer from 1 to "
                          f"{MAX_IMAGE_SIZE}. Export the model again with `tltool export`.")
    if model_size is not None and model_size > 0 and size != model_size:
        raise RunDirError(f"{path} declares {size}px images but its model takes {model_size}px. Export the model "
                          f"again with `tltool export`.")
    if not labels or not all(isinstance(label, str) for label in labels):
        raise RunDirError(f"{path} has no usable labels. Export the model again with `tltool export`.")
    if output_width is not None and output_width > 0 and output_width != len(labels):
        raise RunDirError(f"{path} is inconsistent: its model has {output_width} outputs but its labels list "
                          f"{len(labels)} classes. Export the model again with `tltool export`.")
    return size


def _labels_next_to(path: Path) -> list[str]:
    return rundir.read_labels(Path(path).parent / rundir.LABELS_FILE)


def tflite_runtime() -> str:
    """The interpreter TFLite files run in: LiteRT, or TensorFlow's own where LiteRT is not installed."""
    try:
        from importlib.metadata import version

        return f"ai-edge-litert {version('ai-edge-litert')}"
    except Exception:  # PackageNotFoundError, or metadata missing from a source install
        import tensorflow as tf

        return f"tensorflow {tf.__version__} (tf.lite)"


def _unreadable(path: Path, kind: str, exc: Exception) -> RunDirError:
    """The error for an exported model its runtime cannot load (damaged, cut short, partly deleted)."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return RunDirError(f"{path} is not a readable {kind} ({type(exc).__name__}: {reason}). Export the run again "
                       f"with `tltool export`.")


def _tflite_interpreter(path: Path):
    try:  # LiteRT is TFLite's successor; TensorFlow's own interpreter is deprecated and warns on creation
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return Interpreter(model_path=str(path))
        except ValueError as exc:
            raise _unreadable(path, "TFLite model", exc) from None


def _quantize(pixels: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return pixels
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(pixels / scale + zero_point), info.min, info.max).astype(detail["dtype"])


def _dequantize(values: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] == np.float32:
        return values
    scale, zero_point = detail["quantization"]
    return (values.astype(np.float32) - zero_point) * scale
