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
    "finetune": "tltool.engine.stages",
    "FinetuneResult": "tltool.engine.stages",
    "load_recipe": "tltool.recipe",
    "Recipe": "tltool.recipe",
    "describe_fields": "tltool.recipe",
    "list_backbones": "tltool.models.backbones",
    "get_backbone_spec": "tltool.models.backbones",
    "count_params": "tltool.models.backbones",
    "load_image": "tltool.data.images",
    "scan_folder": "tltool.data.folders",
    "TltoolError": "tltool.errors",
    "evaluate": "tltool.evaluation.metrics",
    "compute_metrics": "tltool.evaluation.metrics",
    "export": "tltool.exporting.export",
    "load_predictor": "tltool.exporting.predictors",
    "predict_files": "tltool.exporting.predictors",
    "results_to_csv_rows": "tltool.exporting.predictors",
    "tune": "tltool.tuning.search",
    "check_data": "tltool.data.check",
    "format_report": "tltool.data.check",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tltool' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

