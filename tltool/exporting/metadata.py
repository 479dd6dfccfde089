"""The `tltool` metadata entry that travels inside exported files: labels, input size, quantization.

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


def model_metadata(labels: list[str], size: int, quantize: str) -> dict:
    from tltool import __version__

    return {"labels": labels, "image_size": size, "input": "RGB pixels 0..255, NHWC", "quantize": quantize,
            "tltool_version": __version__}


def embed_tflite_metadata(data: bytes, meta: dict) -> bytes:
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


def read_tflite_metadata(path: Path) -> dict:
    """The `tltool` metadata entry of a .tflite file (labels, image size, quantize), or {} if absent."""
    from tensorflow.lite.python import schema_py_generated as schema

    data = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == METADATA_KEY.encode():
                buffer = model.Buffers(entry.Buffer())
                if buffer.Offset() > 1:  # large models keep buffers after the flatbuffer
                    raw = data[buffer.Offset():buffer.Offset() + buffer.Size()]
                else:
                    raw = buffer.DataAsNumpy().tobytes()
                return json.loads(raw.decode("utf-8"))
    except Exception as exc:  # a damaged file fails in many ways inside the flatbuffer reader
        raise RunDirError(f"{path} is not a readable TFLite model ({type(exc).__name__}).") from None
    return {}
