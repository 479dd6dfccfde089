"""Standard TFLite Model Metadata: the schema MediaPipe Tasks, LiteRT's support library and Model Maker share.

What a runtime needs to use a classifier file unchanged travels inside it:

    input 0   ImageProperties (RGB) with NormalizationOptions mean 0, std 1: tltool's models take plain
              0..255 pixels and normalise inside, so MediaPipe feeds the image as it is
    output 0  `probabilities` [1, classes], with labels.txt as TENSOR_AXIS_LABELS: the category names
    output 1  `ood_score` [1, 1] (models with the trust layer), with ood_score.txt as its one label
    model     name, description, version, author and license (the recipe's `name` and `export` section)

The tables are built with MediaPipe's own schema code and builders (`mediapipe.tasks.metadata`,
`metadata_writers.metadata_info`). MediaPipe's `MetadataPopulator`, which would put them into the model,
cannot be imported from its pip wheels since 0.10.30: it imports a compiled helper the wheels no longer ship
(`mediapipe.tasks.cc.metadata.python._pywrap_metadata_version`). Its two steps are done here instead, in
the layout MediaPipe reads: the metadata flatbuffer goes into the model's `TFLITE_METADATA` buffer, and the
label files into a zip archive (stored, not compressed) appended after the flatbuffer.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tltool.errors import RunDirError

#: The model buffer that runtimes look up by name (`MetadataPopulator.METADATA_FIELD_NAME`).
METADATA_BUFFER = "TFLITE_METADATA"
#: The metadata flatbuffer's file identifier (metadata_schema.fbs: `file_identifier "M001"`).
_FILE_IDENTIFIER = b"M001"
#: Every field written here is in the schema's first version, so any metadata parser reads it.
#: (MediaPipe's C++ `GetMinimumMetadataParserVersion` raises the version only for members added later:
#: vocabulary and ScaNN files, tokenizers, process units on the subgraph, tensor groups, audio, file
#: versions, custom metadata. None of them is written here.)
_MIN_PARSER_VERSION = "1.0.0"
LABELS_FILE = "labels.txt"
OOD_LABELS_FILE = "ood_score.txt"
OOD_LABEL = "out_of_distribution"


@dataclass(frozen=True)
class ModelInfo:
    """The model-level fields: shown by Android Studio's model viewer and metadata displayers."""

    name: str
    description: str
    version: str = ""
    author: str = ""
    license: str = ""


def metadata_tables(labels: list[str], size: int, info: ModelInfo, input_type: int, output_types: list[int],
                    has_ood: bool):
    """The ModelMetadata flatbuffer (bytes) and the files it names ({name: bytes}).

    `input_type` and `output_types` are TFLite TensorType values of the model's input and outputs, in the
    model's order: probabilities first, then the OOD score when `has_ood`.
    """
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info as md

    image = md.InputImageTensorMd(
        name="image", description=(f"RGB image, {size}x{size} pixels, values 0..255 (the model normalises "
                                   "them itself)."),
        norm_mean=[0.0], norm_std=[1.0], color_space_type=fb.ColorSpaceType.RGB, tensor_type=input_type)
    outputs = [md.ClassificationTensorMd(
        name="probabilities", description=f"Calibrated probabilities of the {len(labels)} classes (sum 1).",
        label_files=[md.LabelFileMd(LABELS_FILE)], tensor_type=output_types[0])]
    files = {LABELS_FILE: "\n".join(labels).encode("utf-8")}
    if has_ood:
        outputs.append(md.TensorMd(
            name="ood_score", description=("Out-of-distribution score: above 1.0 the image is unlike the "
                                            "training images and the class should not be trusted."),
            content_type=fb.ContentProperties.FeatureProperties,
            associated_files=[md.AssociatedFileMd(OOD_LABELS_FILE, "The score's name.",
                                                  fb.AssociatedFileType.TENSOR_AXIS_LABELS)]))
        files[OOD_LABELS_FILE] = OOD_LABEL.encode("utf-8")
    subgraph = fb.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [image.create_metadata()]
    subgraph.outputTensorMetadata = [o.create_metadata() for o in outputs]
    model = md.GeneralMd(name=info.name, version=info.version or None, description=info.description,
                         author=info.author or None, licenses=info.license or None).create_metadata()
    model.subgraphMetadata = [subgraph]
    model.minParserVersion = _MIN_PARSER_VERSION
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), _FILE_IDENTIFIER)
    return bytes(builder.Output()), files


def append_files(data: bytes, files: dict[str, bytes]) -> bytes:
    """The model followed by a zip archive of `files`, where runtimes find a model's associated files."""
    out = io.BytesIO(data)
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return out.getvalue()


@dataclass(frozen=True)
class StandardMetadata:
    """What tltool reads back from a file's standard metadata (its own exports or Model Maker's)."""

    labels: list[str]  # of output 0; [] when the file names no label file
    norm_mean: list[float]  # input normalisation (pixel - mean) / std; [] when the input declares none
    norm_std: list[float]


def read_standard_metadata(path: Path, data: bytes, metadata_buffer: bytes | None) -> StandardMetadata | None:
    """The labels and input normalisation a file's TFLITE_METADATA declares, or None if it has none."""
    if metadata_buffer is None:
        return None
    try:
        from mediapipe.tasks.metadata import metadata_schema_py_generated as fb
    except ImportError:  # without MediaPipe, tltool's own metadata entry (or labels.txt) is read instead
        return None
    try:
        model = fb.ModelMetadata.GetRootAsModelMetadata(metadata_buffer, 0)
        subgraph = model.SubgraphMetadata(0)
        mean, std = _normalization(fb, subgraph.InputTensorMetadata(0))
        labels = _axis_labels(fb, data, subgraph.OutputTensorMetadata(0)) if subgraph.OutputTensorMetadataLength() else []
    except (zipfile.BadZipFile, KeyError, IndexError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        raise RunDirError(f"{path} has damaged TFLite metadata ({type(exc).__name__}). Export the model again "
                          "with `tltool export`.") from None
    return StandardMetadata(labels, mean, std)


def _normalization(fb, tensor) -> tuple[list[float], list[float]]:
    for i in range(tensor.ProcessUnitsLength()):
        unit = tensor.ProcessUnits(i)
        if unit.OptionsType() == fb.ProcessUnitOptions.NormalizationOptions:
            options = fb.NormalizationOptions()
            options.Init(unit.Options().Bytes, unit.Options().Pos)
            return options.MeanAsNumpy().tolist(), options.StdAsNumpy().tolist()
    return [], []


def _axis_labels(fb, data: bytes, tensor) -> list[str]:
    for i in range(tensor.AssociatedFilesLength()):
        entry = tensor.AssociatedFiles(i)
        if entry.Type() == fb.AssociatedFileType.TENSOR_AXIS_LABELS and not entry.Locale():
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                text = archive.read(entry.Name().decode("utf-8")).decode("utf-8")
            return [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    return []
