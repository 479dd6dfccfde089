"""The run directory: what `finetune` and `tune` write and `evaluate`, `export` and `predict` read.

Layout of a finetune run:

    model.keras      the trained model (takes plain RGB pixels, 0-255)
    labels.txt       class names, one per line, in output order
    recipe.yaml      the fully resolved recipe (feed it back to `tltool finetune` to repeat the run)
    history.csv      one row per finished epoch, with `stage` and `epoch` columns
    summary.json     accuracy, counts, skipped files, timings

Everything is written durably and atomically (see files.py), so a crash never leaves a half-written file
that a later command would trust.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tltool.errors import RunDirError
from tltool.files import atomic_save, atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.txt"
RECIPE_FILE = "recipe.yaml"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"
EXPORT_FILE = "export.json"  # in an export folder: what `tltool export` measured and recorded


def atomic_save_model(model, path: Path) -> None:
    """`model.save` to a temporary name in the same folder, then a durable rename into place."""
    atomic_save(path, model.save)


def write_labels(run_dir: Path, classes: list[str]) -> None:
    atomic_write_text(Path(run_dir) / LABELS_FILE, "".join(f"{name}\n" for name in classes))


def read_labels(path: Path) -> list[str]:
    """Class names from a labels file, or from the `labels.txt` inside a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / LABELS_FILE
    if not path.is_file():
        raise RunDirError(f"No labels file at {path}. Point at a run directory written by `tltool finetune`.")
    # Split on "\n" only, as written: str.splitlines would also split on U+0085, U+2028 and other separators.
    return [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def require_run_dir(run_dir: Path) -> Path:
    """Check that `run_dir` holds a finished run (model and labels), or say what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"Run directory not found: {run_dir}. Pass the --out folder of a `tltool finetune` run.")
    if not (run_dir / RECIPE_FILE).is_file():  # not a run at all: --resume would not help
        raise RunDirError(f"{run_dir} is not a tltool run directory (it has no {RECIPE_FILE}). Pass the --out "
                          f"folder of a `tltool finetune` run.")
    for name in (MODEL_FILE, LABELS_FILE):
        if not (run_dir / name).is_file():
            raise RunDirError(f"{run_dir} has no {name}: it is not a finished tltool run. "
                              f"Finish it with `tltool finetune --resume --out {run_dir}` or train a new one.")
    return run_dir


def save_inference_model(model, path: Path) -> None:
    """Save `model` uncompiled, as a fresh functional wrapper over the same layers: users load it for
    inference or their own training, and a stale optimizer state would only cause warnings on load."""
    import keras

    # `input` and `output`, not the lists `inputs` and `outputs`: the model keeps its structure (one input,
    # named outputs {probabilities, ood_score}), and calling it with one tensor raises no warning.
    atomic_save_model(keras.Model(model.input, model.output, name=model.name), path)


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary)


def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def new_run_dir(name: str) -> Path:
    """A new folder runs/NAME-TIME (NAME-TIME-2, ... when another run started in the same second)."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        candidate = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            candidate.mkdir()  # atomic: of two runs picking the same name, one gets it
            return candidate
        except FileExistsError:
            continue
    raise RunDirError(f"Could not make a new run folder next to {base}; pass --out.")
