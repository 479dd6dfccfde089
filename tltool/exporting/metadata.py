"""The `tltool` metadata entry that travels inside exported files: labels, input size, quantization, and the
flip the model was trained with (so that `--tta` can refuse to mirror images for a model that never saw any).

One JSON object under one key, written into a .tflite flatbuffer's named metadata and an .onnx model's
`metadata_props`, and read back by `load_predictor`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tltool.errors import RunDirError

#: Name of the metadata entry holding labels and input size as JSON, in TFLite and ONNX files alike.
METADATA_KEY = "tltool"


def model_metadata(labels: list[str], size: int, quantize: str, augment_flip: str) -> dict:
    from tltool import __version__

    return {"labels": labels, "image_size": size, "input": "RGB pixels 0..255, NHWC", "quantize": quantize,
            "augment_flip": augment_flip, "tltool_version": __version__}


def embed_tflite_metadata(data: bytes, meta: dict, extra: dict[str, bytes] | None = None) -> bytes:
    """Add a `tltool` metadata entry (JSON: labels, input size) to a TFLite flatbuffer, and any `extra`
    named entries (the standard TFLITE_METADATA buffer); entries of the same names are replaced.

    TFLite keeps named metadata buffers in the model itself (the converter stores its own there);
    interpreters ignore names they do not know, so the file stays loadable everywhere.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    set_metadata_entries(tree, {METADATA_KEY: json.dumps(meta).encode("utf-8"), **(extra or {})})
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def set_metadata_entries(tree, entries: dict[str, bytes]) -> None:
    """Put named metadata buffers into a TFLite model object tree (flatbuffer_utils), replacing same names."""
    from tensorflow.lite.python import schema_py_generated as schema

    def name_of(entry) -> str:
        return entry.name.decode("utf-8") if isinstance(entry.name, bytes) else entry.name

    tree.metadata = [m for m in (tree.metadata or []) if name_of(m) not in entries]
    for name, payload in entries.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(payload, dtype=np.uint8)
        tree.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(tree.buffers) - 1
        tree.metadata.append(entry)


def metadata_entries(path: Path, data: bytes) -> dict[str, bytes]:
    """Every named metadata buffer of a .tflite file's bytes."""
    from tensorflow.lite.python import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(data, 0)
        entries = {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            buffer = model.Buffers(entry.Buffer())
            if buffer.Offset() > 1:  # large models keep buffers after the flatbuffer
                raw = data[buffer.Offset():buffer.Offset() + buffer.Size()]
            else:
                raw = buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
            entries[entry.Name().decode("utf-8")] = raw
        return entries
    except Exception as exc:  # a damaged file fails in many ways inside the flatbuffer reader
        raise RunDirError(f"{path} is not a readable TFLite model ({type(exc).__name__}).") from None


def read_tflite_metadata(path: Path, entries: dict[str, bytes] | None = None) -> dict:
    """The `tltool` metadata entry of a .tflite file (labels, image size, quantize), or {} if absent.

    `entries`: the file's `metadata_entries`, when the caller has read them already.
    """
    if entries is None:
        entries = metadata_entries(path, Path(path).read_bytes())
    raw = entries.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RunDirError(f"{path} has a damaged `{METADATA_KEY}` metadata entry. Export the model again "
                          "with `tltool export`.") from None
