"""tltool: transfer learning for image classification with Keras.

The public API; the CLI uses only these, and they can do everything the CLI does. Heavy modules
(TensorFlow) load on first use, so `import tltool` and `tltool --help` stay fast. No module or
subpackage directly under `tltool` has an API function's name (`finetune` lives in
`commands/finetune.py`, `evaluate` in `commands/evaluate.py`): importing a submodule binds its name on
the package, which would otherwise replace the function.
"""

import os

from tltool import native_logs

# TensorFlow's C++ start-up chatter (CUDA probing, CPU feature notes) is noise for tltool's users.
native_logs.quiet_tensorflow_log_level()
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

_LAZY = {
    # commands
    "finetune": "tltool.commands.finetune",
    "FinetuneResult": "tltool.commands.finetune",
    "tune": "tltool.commands.tune",
    "TuneResult": "tltool.commands.tune",
    "evaluate": "tltool.commands.evaluate",
    "export": "tltool.commands.export",
    "export_run": "tltool.commands.export",
    "describe_export": "tltool.commands.export",
    "predict_files": "tltool.commands.predict",
    "results_to_csv_rows": "tltool.commands.predict",
    "check_data": "tltool.data.check",
    "format_report": "tltool.data.check",
    "stylize": "tltool.commands.stylize",
    "StylizeResult": "tltool.commands.stylize",
    "cache_info": "tltool.commands.cache",
    "prune_cache": "tltool.commands.cache",
    "clear_cache": "tltool.commands.cache",
    # recipes, backbones, images, models
    "load_recipe": "tltool.recipe",
    "Recipe": "tltool.recipe",
    "describe_fields": "tltool.recipe",
    "list_backbones": "tltool.models.backbones",
    "get_backbone_spec": "tltool.models.backbones",
    "count_params": "tltool.models.backbones",
    "load_image": "tltool.data.images",
    "scan_folder": "tltool.data.folders",
    "load_predictor": "tltool.exporting.predictors",
    "mirror_tta": "tltool.exporting.predictors",
    "compute_metrics": "tltool.evaluation.metrics",
    # errors and interruption
    "TltoolError": "tltool.errors",
    "WorkerLostError": "tltool.errors",
    "Interrupted": "tltool.interrupts",
    "sigterm_at_safe_points": "tltool.interrupts",
}

__all__ = sorted(_LAZY) + ["__version__"]

# The API functions that run TensorFlow: it is imported for them, once, with its native log lines filtered.
_NEEDS_TENSORFLOW = {"finetune", "tune", "evaluate", "export", "export_run", "predict_files", "stylize",
                     "count_params", "load_predictor"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tltool' has no attribute {name!r}")
    import importlib

    if name in _NEEDS_TENSORFLOW:
        native_logs.import_tensorflow_quietly()
    return getattr(importlib.import_module(module), name)

