"""The SavedModel export: TF Serving's layout, with serving signatures that decode, resize, run and name classes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tltool import rundir
from tltool.errors import ExportError
from tltool.exporting.graph_decode import decode_like_pillow
from tltool.models.ood import OOD_SCORE, PROBABILITIES, UNKNOWN_ABOVE


def write_savedmodel(model, labels: list[str], size: int, path: Path) -> None:
    """A SavedModel whose serving signatures do all the work: decode, resize, run, name the top classes, and
    (for a model with the OOD score) say whether the image is out of distribution (`ood_score`, `is_unknown`)."""
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
            out = model(tf.cast(pixels, tf.float32), training=False)
            probs = out[PROBABILITIES] if isinstance(out, dict) else out
            scores, index = tf.math.top_k(probs, k=k)
            names = table.lookup(tf.cast(index, tf.int64))
            result = {PROBABILITIES: probs, "label": names[:, 0], "score": scores[:, 0],
                      "top_k_labels": names, "top_k_scores": scores}
            if isinstance(out, dict) and OOD_SCORE in out:
                ood = tf.reshape(out[OOD_SCORE], [-1])
                result.update({OOD_SCORE: ood, "is_unknown": ood > UNKNOWN_ABOVE})
            return result

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
