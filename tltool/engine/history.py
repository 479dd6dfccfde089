"""`history.csv`, one row per finished epoch: its only writer and reader.

Columns: stage, epoch (within the stage, from 1), loss, accuracy, val_loss, val_accuracy, learning_rate,
seconds. Rows are appended and fsynced one epoch at a time, so the file is complete up to the last
finished epoch even after a crash; a resumed run trims the rows after the epoch its backup holds, then
appends again.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from tltool.files import atomic_write_text, fsync_dir

COLUMNS = ["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds"]
_INTEGER_COLUMNS = ("stage", "epoch")


def append_row(path: Path, row: dict) -> None:
    """Append one epoch's row (missing columns stay empty), writing the header first in a new file."""
    path = Path(path)
    new_file = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new_file:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        os.fsync(handle.fileno())
    if new_file:  # the file's name in its folder must survive a power cut too
        fsync_dir(path.parent)


def read_history(path: Path) -> list[dict]:
    """Rows of a `history.csv` as dicts with numbers converted (empty cells become None)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: _number(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def trim_history(path: Path, stage: int, last_epoch: int) -> None:
    """Drop the rows of `stage` after `last_epoch` (and of later stages), so that no epoch appears twice."""
    rows = read_history(path)
    keep = [r for r in rows if r["stage"] < stage or (r["stage"] == stage and r["epoch"] <= last_epoch)]
    if len(keep) == len(rows):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS} for r in keep)
    atomic_write_text(path, buffer.getvalue())


def _number(column: str, text: str | None):
    if text in ("", None):
        return None
    return int(text) if column in _INTEGER_COLUMNS else float(text)
