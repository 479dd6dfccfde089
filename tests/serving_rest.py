"""TF Serving's REST `predict` API, row format, applied to a loaded SavedModel's signatures in-process.

What TF Serving does with `POST /v1/models/NAME:predict` (its REST API reference, "Encoding binary values"
and "Request format / Row format"):
- `instances` is a list with one entry per example; with a single-input signature an entry is that input's
  value, otherwise an object of named inputs;
- `{"b64": "..."}` is a binary value: base64-decoded into a DT_STRING element;
- the examples are batched into one tensor per input and the signature runs once;
- the response is `{"predictions": [...]}`, one object per example with every named output (a bare value
  when the signature has one output). DT_STRING outputs come back as strings, or as `{"b64": ...}` when
  the output's name ends in `_bytes`.
"""

from __future__ import annotations

import base64
import json

import numpy as np


def rest_predict(signatures, body: str) -> dict:
    """The JSON-ready response TF Serving gives to a REST predict `body` (str) for these signatures."""
    import tensorflow as tf

    request = json.loads(body)
    fn = signatures[request.get("signature_name", "serving_default")]
    specs = fn.structured_input_signature[1]
    instances = request["instances"]
    if len(specs) == 1:
        ((name, spec),) = specs.items()
        columns = {name: [_decode(value) for value in instances]}
    else:
        columns = {name: [_decode(row[name]) for row in instances] for name in specs}
    tensors = {name: tf.constant(values, dtype=specs[name].dtype) for name, values in columns.items()}
    outputs = {key: value.numpy() for key, value in fn(**tensors).items()}
    rows = []
    for i in range(len(instances)):
        row = {key: _encode(key, value[i]) for key, value in outputs.items()}
        rows.append(next(iter(row.values())) if len(row) == 1 else row)
    return {"predictions": rows}


def _decode(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _encode(name: str, value):
    if isinstance(value, np.ndarray):
        return [_encode(name, v) for v in value]
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")} if name.endswith("_bytes") else value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
