"""tltool: transfer learning for image classification with Keras.

The public API; the CLI uses only these. Heavy modules (TensorFlow) load on first use, so
`import tltool` and `tltool --help` stay fast. Modules are named differently from the API functions
(`finetuning.py` holds `finetune`): importing a submodule binds its name on the package, which would
otherwise replace the function.
"""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU feature notes) is noise for tltool's users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

_LAZY = {
    "finetune": "tltool.finetuning",
    "FinetuneResult": "tltool.finetuning",
    "load_recipe": "tltool.recipe",
    "Recipe": "tltool.recipe",
    "describe_fields": "tltool.recipe",
    "list_backbones": "tltool.backbones",
    "get_backbone_spec": "tltool.backbones",
    "count_params": "tltool.backbones",
    "load_image": "tltool.images",
    "scan_folder": "tltool.data",
    "TltoolError": "tltool.errors",
    "evaluate": "tltool.evaluation",
    "compute_metrics": "tltool.evaluation",
    "export": "tltool.exporting",
    "load_predictor": "tltool.predict",
    "predict_files": "tltool.predict",
    "results_to_csv_rows": "tltool.predict",
    "tune": "tltool.tuning",
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

