"""Keras callbacks of tltool's own."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import keras

HISTORY_COLUMNS = ["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"]


class HistoryCSV(keras.callbacks.Callback):
    """Appends one row per finished epoch to `history.csv`, with the stage and the epoch within it.

    Each row is flushed and fsynced at once, so the file is complete up to the last finished epoch even
    after a crash, and a resumed run continues it rather than starting it again.
    """

    def __init__(self, path: Path, stage: int):
        super().__init__()
        self.path = Path(path)
        self.stage = stage
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        row = {"stage": self.stage, "epoch": epoch + 1, "seconds": round(time.perf_counter() - self._t0, 3)}
        lr = logs.get("learning_rate")
        if lr is None and self.model is not None and hasattr(self.model, "optimizer"):
            try:
                lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            except Exception:  # some schedules cannot be read outside a step
                lr = None
        row["learning_rate"] = lr
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            value = logs.get(key)
            row[key] = None if value is None else round(float(value), 6)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())


def read_history(path: Path) -> list[dict]:
    """Rows of a `history.csv` as dicts with numbers converted (empty cells become None)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.append({k: (None if v in ("", None) else (int(v) if k in ("stage", "epoch") else float(v)))
                         for k, v in row.items()})
    return rows
