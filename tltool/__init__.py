"""tltool: transfer learning for image classification with Keras.

The public API; the CLI uses only these. Heavy modules (TensorFlow) load on first use, so
`import tltool` and `tltool --help` stay fast.
"""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU feature notes) is noise for tltool's users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

_LAZY = {
    "finetune": "tltool.finetune",
    "FinetuneResult": "tltool.finetune",
    "load_recipe": "tltool.recipe",
    "Recipe": "tltool.recipe",
    "describe_fields": "tltool.recipe",
    "list_backbones": "tltool.backbones",
    "get_backbone_spec": "tltool.backbones",
    "load_image": "tltool.images",
    "scan_folder": "tltool.data",
    "TltoolError": "tltool.errors",
    "check_data": "tltool.datacheck",
    "format_report": "tltool.datacheck",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tltool' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


class _Package(type(os)):
    """Keeps `tltool.finetune` the function: importing the submodule `tltool.finetune` would replace it."""

    def __setattr__(self, name, value):
        if isinstance(value, type(os)) and _LAZY.get(name) == getattr(value, "__name__", None):
            value = getattr(value, name, value)
        super().__setattr__(name, value)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _Package
