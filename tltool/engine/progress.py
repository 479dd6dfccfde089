"""Resume state of a run directory: `checkpoints/state.json` and the weights after each finished stage.

Within a stage, EpochCheckpoint (callbacks.py) commits the last finished epoch (weights, optimizer state,
epoch, early stopping's patience count and best weights) in `checkpoints/stageN/`; after a stage, the full
model's weights are saved and the stage is listed as done, so a resumed run never trains an epoch twice.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tltool import rundir
from tltool.engine import history
from tltool.engine.callbacks import load_weights, read_checkpoint, save_weights
from tltool.errors import RunDirError

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
_AFTER_STAGE_WEIGHTS = "after_stage.npz"
_AFTER_STAGE_KERAS_WEIGHTS = "after_stage.weights.h5"  # what runs of earlier versions saved


class RunProgress:
    """Which stages of a run are done, and how long the run has taken over all its attempts."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / CHECKPOINTS_DIR
        path = self.dir / STATE_FILE
        self.state = json.loads(path.read_text()) if path.is_file() else {"stages_done": []}
        self._t0 = time.perf_counter()
        #: seconds spent on this run before this process started (earlier, interrupted attempts)
        self.elapsed_before = self.state.get("elapsed_s", 0.0)

    @property
    def finished(self) -> bool:
        return bool(self.state.get("finished"))

    @property
    def timings(self) -> dict:
        """The timings saved with the last finished stage (empty before any)."""
        return dict(self.state.get("timings", {}))

    def elapsed(self) -> float:
        """Seconds spent on the run so far, earlier attempts included."""
        return self.elapsed_before + time.perf_counter() - self._t0

    def done(self, stage: int) -> bool:
        return stage in self.state["stages_done"]

    def backup_dir(self, stage: int) -> Path:
        return self.dir / f"stage{stage}"

    def restore(self, model, say) -> None:
        found = [self.dir / name for name in (_AFTER_STAGE_WEIGHTS, _AFTER_STAGE_KERAS_WEIGHTS)
                 if (self.dir / name).is_file()]
        if self.state["stages_done"] and found:
            load_weights(model, found[0])
        last = self.state["stages_done"][-1] if self.state["stages_done"] else 0
        say(f"Resuming: stage(s) {self.state['stages_done'] or 'none'} done; continuing from stage {last + 1}.")

    def trim_history(self, stage: int, history_path: Path) -> None:
        """Drop history rows of `stage` after the epoch its backup holds, so no epoch appears twice."""
        state = read_checkpoint(self.backup_dir(stage))
        kept_epochs = state["epoch"] if state is not None else 0
        history.trim_history(history_path, stage, kept_epochs)

    def finish_stage(self, stage: int, model, timings: dict) -> None:
        save_weights(model, self.dir / _AFTER_STAGE_WEIGHTS, optimizer=False)  # each stage compiles afresh
        self.state["stages_done"].append(stage)
        self.state["timings"] = timings
        self._save()
        shutil.rmtree(self.backup_dir(stage), ignore_errors=True)

    def finish_run(self) -> None:
        self.state["finished"] = True
        self._save()
        for name in (_AFTER_STAGE_WEIGHTS, _AFTER_STAGE_KERAS_WEIGHTS):
            (self.dir / name).unlink(missing_ok=True)

    def _save(self) -> None:
        self.state["elapsed_s"] = round(self.elapsed(), 3)
        rundir.atomic_write_json(self.dir / STATE_FILE, self.state)


def check_resumable(run_dir: Path) -> Path:
    """`run_dir` if it holds an interrupted run; otherwise a one-line error saying what it holds."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.RECIPE_FILE).is_file():
        raise RunDirError(f"Nothing to resume in {run_dir}: it has no recipe.yaml. Start a new run instead.")
    if (run_dir / rundir.SUMMARY_FILE).is_file() and RunProgress(run_dir).finished:
        raise RunDirError(f"The run in {run_dir} has already finished; nothing to resume.")
    return run_dir

