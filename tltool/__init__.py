"""tltool: transfer learning for image classification with Keras.

The public API; the CLI uses only these. Heavy modules (TensorFlow) load on first use, so
`import tltool` and `tltool --help` stay fast.
"""

import os
import sys
import types

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
    "tune": "tltool.tune",
    "TuneResult": "tltool.tune",
}

__all__ = sorted(_LAZY) + ["__version__"]


class _Package(types.ModuleType):
    """The `tltool` package, whose API functions `finetune` and `tune` share their names with modules.

    Importing `tltool.finetune` (the module) would otherwise replace `tltool.finetune` (the function) with
    the module, so that the second `tltool.finetune(...)` of a process fails.
    """

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tltool' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
