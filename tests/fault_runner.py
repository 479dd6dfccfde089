"""Run a tltool command and kill -9 it at a named point: the fault injection of tests/test_faults.py.

    python tests/fault_runner.py POINT N FIRED_FILE -- TLTOOL_ARGS...

The Nth time the run reaches POINT, FIRED_FILE is written (so the test knows the fault fired there and not
elsewhere) and the process sends itself SIGKILL: no handler, no cleanup, as a power cut or the OOM killer.
Feature extraction stores a shard every 8 images here, so that a small test dataset has several.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path


def _points():
    """POINT -> (object, attribute, "before" or "after" the call, which calls count)."""
    import keras

    from tltool import files
    from tltool.engine import callbacks, features, history, progress
    from tltool.commands import finetune

    def checkpoint_commit(path, *args, **kwargs):
        return Path(path).name == callbacks.EpochCheckpoint.FILE

    def old_export_moved_aside(src, dst, *args, **kwargs):
        return ".old." in Path(dst).name

    return {
        "extraction-shard": (features.FeatureCache, "add", "after", None),
        "mid-epoch": (keras.callbacks.TerminateOnNaN, "on_train_batch_end", "before", None),
        "after-history-row": (history, "append_row", "after", None),
        "before-commit": (callbacks.rundir, "atomic_write_json", "before", checkpoint_commit),
        "after-fit": (progress.RunProgress, "finish_stage", "before", None),
        "before-summary": (finetune.rundir, "write_summary", "before", None),
        "export-swap": (files.os, "replace", "after", old_export_moved_aside),
    }


def _arm(point: str, nth: int, fired: Path) -> None:
    owner, name, when, counts = _points()[point]
    original = getattr(owner, name)
    calls = [0]

    def die():
        fired.write_text(point)
        os.kill(os.getpid(), signal.SIGKILL)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        hit = counts is None or counts(*(args[1:] if isinstance(owner, type) else args), **kwargs)
        calls[0] += bool(hit)
        if hit and calls[0] == nth and when == "before":
            die()
        result = original(*args, **kwargs)
        if hit and calls[0] == nth and when == "after":
            die()
        return result

    setattr(owner, name, wrapper)


def main(argv: list[str]) -> None:
    point, nth, fired = argv[0], int(argv[1]), Path(argv[2])
    tltool_args = argv[argv.index("--") + 1:]
    from tltool.engine import features

    features.SHARD_IMAGES = 8
    _arm(point, nth, fired)
    from tltool.cli import main as cli

    cli(tltool_args, prog_name="tltool")


if __name__ == "__main__":
    main(sys.argv[1:])
