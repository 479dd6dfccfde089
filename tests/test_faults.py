"""Fault injection: kill -9 at every point that writes state, then resume; nothing trained twice, nothing lost.

One run is killed again and again, each time at the next point (tests/fault_runner.py), and resumed each
time: during feature extraction, in the middle of an epoch, after an epoch's history row and before its
checkpoint, between the checkpoint's weights and its commit, after a stage's fit before the stage is
recorded, in stage 2, and after the model is saved before the summary. At the end its history must hold
every epoch exactly once, in order, and its model must be as good as an uninterrupted run's.
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import calibrated_backbone_weights, make_image_folder
from tltool.cli import main

STAGE1, STAGE2 = 12, 3
RUNNER = Path(__file__).with_name("fault_runner.py")

#: (point, which occurrence) in the order one run meets them, resumed after each.
FAULTS = [
    ("extraction-shard", 2),   # two of the training images' shards stored, the third not
    ("mid-epoch", 5),          # in stage 1's second epoch (3 batches an epoch)
    ("after-history-row", 1),  # epoch 2's row written, its checkpoint not: the row must go
    ("before-commit", 1),      # epoch 2's weights file written, checkpoint.json still says epoch 1
    ("after-fit", 1),          # stage 1's fit returned, the stage not recorded: no epoch may run again
    ("mid-epoch", 4),          # stage 2's second epoch
    ("before-summary", 1),     # model.keras saved, summary.json not
]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_image_folder(root / "data", per_class=10)
    weights = calibrated_backbone_weights(root / "backbone.weights.h5", images=data)
    args = ["--data", str(data), "--quiet", "--weights", str(weights), "--image-size", "32", "--batch-size", "8",
            "--epochs", str(STAGE1), "--fine-tune-epochs", str(STAGE2), "--set", "frozen.learning_rate=0.02",
            "--set", "frozen.early_stopping=0", "--set", "fine_tune.early_stopping=0",
            "--set", "fine_tune.unfreeze=1", "--set", "frozen.feature_views=0", "--set", "augment.flip=horizontal"]
    return root, args


def history(out):
    with open(out / "history.csv") as handle:
        return [(int(r["stage"]), int(r["epoch"])) for r in csv.DictReader(handle)]


def killed_at(point, nth, args, root, cache):
    """Run tltool ARGS in a subprocess that SIGKILLs itself at `point`; assert it died there."""
    fired = root / "fired"
    fired.unlink(missing_ok=True)
    env = dict(os.environ, TLTOOL_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, str(RUNNER), point, str(nth), str(fired), "--", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert fired.read_text() == point


def cached_rows(cache: Path) -> int:
    from tltool.engine.features import FeatureCache

    return sum(len(FeatureCache(entry, touch=False, lock=False).keys()) for entry in cache.iterdir())


def test_kill_9_at_every_state_writing_point_then_resume(setting, tmp_path, monkeypatch):
    root, args = setting
    cache = tmp_path / "cache"
    reference = CliRunner().invoke(main, ["finetune", *args, "--out", str(tmp_path / "reference")])
    assert reference.exit_code == 0, reference.output
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(cache))

    out = tmp_path / "run"
    killed_at("extraction-shard", 2, ["finetune", *args, "--out", str(out)], tmp_path, cache)
    assert cached_rows(cache) == 16  # what was extracted before the kill is kept
    for point, nth in FAULTS[1:]:
        killed_at(point, nth, ["finetune", "--resume", "--out", str(out), "--quiet"], tmp_path, cache)
        rows = history(out) if (out / "history.csv").exists() else []
        assert rows == sorted(set(rows)), (point, rows)  # never an epoch twice, never out of order
    assert (out / "model.keras").is_file() and not (out / "summary.json").exists()

    resumed = CliRunner().invoke(main, ["finetune", "--resume", "--out", str(out), "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    expected = [(1, e) for e in range(1, STAGE1 + 1)] + [(2, e) for e in range(1, STAGE2 + 1)]
    assert history(out) == expected  # every epoch exactly once: none lost, none repeated, no gap

    got = json.loads((out / "summary.json").read_text())
    want = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert got["resumed"] is True
    assert got["val_accuracy"] >= want["val_accuracy"] - 1 / 6 - 1e-9  # one validation image of six
    assert got["images"] == want["images"]


def test_kill_9_while_an_export_replaces_another_then_export_again(setting, tmp_path, monkeypatch):
    """Killed between moving the old export aside and moving the new one in: the old one is still on disk
    (aside), and the same command run again publishes a checked export, then removes the old one."""
    root, args = setting
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    quick = [a if a != str(STAGE1) else "2" for a in args]
    quick[quick.index("--fine-tune-epochs") + 1] = "0"
    assert CliRunner().invoke(main, ["finetune", *quick, "--out", str(run_dir)]).exit_code == 0
    first = CliRunner().invoke(main, ["export", str(run_dir), "--format", "keras"])
    assert first.exit_code == 0, first.output
    out = run_dir / "export" / "keras"
    killed_at("export-swap", 1, ["export", str(run_dir), "--format", "keras", "--force"], tmp_path,
              tmp_path / "cache")
    aside = [p for p in out.parent.iterdir() if p.name.startswith(".keras.old.")]
    assert len(aside) == 1 and (aside[0] / "model.keras").is_file()  # the old export, not lost
    unmarked = out.parent / ".keras.old.mine"  # named alike, but not tltool's: left alone
    (unmarked / "notes").mkdir(parents=True)
    again = CliRunner().invoke(main, ["export", str(run_dir), "--format", "keras", "--force"])
    assert again.exit_code == 0, again.output
    assert (out / "model.keras").is_file() and json.loads((out / "export.json").read_text())["top1_agreement"] == 1
    assert not aside[0].exists() and (unmarked / "notes").is_dir()  # the old export, replaced now, is gone


def test_kill_9_during_a_trial_then_the_same_tune_command_finishes_the_search(setting, tmp_path):
    root, args = setting
    data = args[args.index("--data") + 1]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tune:\n  algorithm: grid\n  space:\n    head.dropout: {choice: [0.0, 0.3, 0.6]}\n")
    tune = ["tune", str(recipe), "--data", data, "--out", str(tmp_path / "search"), "--quiet",
            "--weights", "none", "--image-size", "32", "--batch-size", "8", "--set", "frozen.epochs=2",
            "--set", "fine_tune.epochs=0", "--set", "frozen.feature_views=0", "--set", "augment.flip=horizontal"]
    killed_at("mid-epoch", 8, tune, tmp_path, tmp_path / "cache")  # in the second trial (3 batches an epoch)
    result = CliRunner().invoke(main, tune, env={"TLTOOL_CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert summary["trials_completed"] == 3, summary
    assert sorted(t["hyperparameters"]["head.dropout"] for t in summary["trials"]
                  if t["status"] == "completed") == [0.0, 0.3, 0.6]
