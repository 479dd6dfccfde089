"""The ONNX export (tf2onnx through Keras's `model.export`), with tltool's metadata in `metadata_props`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tltool import rundir
from tltool.errors import ExportError
from tltool.exporting.metadata import METADATA_KEY, model_metadata


def write_onnx(model, size: int, labels: list[str], path: Path, augment_flip: str) -> None:
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
    entry.value = json.dumps(model_metadata(labels, size, "none", augment_flip))
    rundir.atomic_write_bytes(path, proto.SerializeToString())
