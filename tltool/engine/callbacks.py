"""Keras callbacks of tltool's own."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import keras
import numpy as np

from tltool import interrupts, rundir
from tltool.engine import history

class HistoryCSV(keras.callbacks.Callback):
    """Appends one row per finished epoch to `history.csv` (see engine/history.py), with the stage."""

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
        history.append_row(self.path, row)


class StopOnSignal(keras.callbacks.Callback):
    """Stops training between batches once SIGTERM has arrived (see interrupts.py for why not at once)."""

    def on_train_batch_end(self, batch, logs=None):
        interrupts.check()

    def on_test_batch_end(self, batch, logs=None):
        interrupts.check()


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose patience count and best weights survive an interrupted run.

    BackupAndRestore brings back the weights, the optimizer and the epoch, but a fresh EarlyStopping would
    count patience from zero and, at the end, restore the best weights seen since the restart, which may
    be worse than the best before it. This one writes its state (and the best weights, when they change)
    to `state_dir` after every epoch and takes it back when a resumed fit begins. List it after the
    BackupAndRestore callback, whose `on_train_begin` sets the epoch the fit resumes from.
    """

    STATE_FILE = "early_stopping.json"
    WEIGHTS_FILE = "early_stopping_best.npz"

    def __init__(self, state_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.state_dir = Path(state_dir)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        state_file = self.state_dir / self.STATE_FILE
        resumed_at = getattr(self.model, "_initial_epoch", None) or 0
        if resumed_at == 0 or not state_file.is_file():
            return
        state = json.loads(state_file.read_text())
        if state["epoch"] != resumed_at - 1:  # not the epoch the weights backup holds: start afresh
            return
        self.wait, self.best, self.best_epoch = state["wait"], state["best"], state["best_epoch"]
        weights = self.state_dir / self.WEIGHTS_FILE
        if self.restore_best_weights and weights.is_file():
            with np.load(weights) as saved:
                self.best_weights = [saved[f"w{i}"] for i in range(len(saved.files))]

    def on_epoch_end(self, epoch, logs=None):
        weights_before = self.best_weights
        super().on_epoch_end(epoch, logs)
        if self.best_weights is not weights_before:  # Keras stores a new list whenever the best changes
            buffer = io.BytesIO()
            np.savez(buffer, **{f"w{i}": w for i, w in enumerate(self.best_weights)})
            rundir.atomic_write_bytes(self.state_dir / self.WEIGHTS_FILE, buffer.getvalue())
        best = None if self.best is None else float(self.best)
        rundir.atomic_write_json(self.state_dir / self.STATE_FILE,
                                 {"epoch": epoch, "wait": self.wait, "best": best, "best_epoch": self.best_epoch})
