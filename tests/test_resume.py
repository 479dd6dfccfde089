"""Interrupted runs: SIGKILL then --resume continues without repeating or losing an epoch; SIGTERM exits cleanly."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from helpers import make_image_folder
from tltool.cli import main

STAGE1, STAGE2 = 3, 12


def finetune_args(data, out):
    return ["finetune", "--data", str(data), "--out", str(out), "--quiet", "--weights", "none",
            "--image-size", "32", "--batch-size", "8", "--epochs", str(STAGE1), "--fine-tune-epochs", str(STAGE2),
            "--set", "frozen.early_stopping=0", "--set", "fine_tune.early_stopping=0",
            "--set", "fine_tune.unfreeze=1",
            # No augmented views to extract and no flip to measure: what is tested is the resume.
            "--set", "frozen.feature_views=0", "--set", "augment.flip=horizontal"]


def history(out):
    path = out / "history.csv"
    if not path.is_file():
        return []
    with open(path) as handle:
        return [(int(r["stage"]), int(r["epoch"])) for r in csv.DictReader(handle)]


def start(args, env_dir):
    env = dict(os.environ, TLTOOL_CACHE_DIR=str(env_dir))
    return subprocess.Popen([sys.executable, "-m", "tltool", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for(proc, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / "data", per_class=10)


def test_sigkill_then_resume_continues_from_the_last_finished_epoch(tmp_path, data):
    out = tmp_path / "run"
    proc = start(finetune_args(data, out), tmp_path / "cache")
    try:
        reached = wait_for(proc, lambda: any(stage == 2 and epoch >= 2 for stage, epoch in history(out)))
        assert reached, proc.communicate()[1][-2000:] if proc.poll() is not None else "timed out"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = history(out)
    assert before[:STAGE1] == [(1, e) for e in range(1, STAGE1 + 1)]
    assert not (out / "model.keras").exists()

    result = CliRunner().invoke(main, ["finetune", "--resume", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    after = history(out)
    expected = [(1, e) for e in range(1, STAGE1 + 1)] + [(2, e) for e in range(1, STAGE2 + 1)]
    assert after == expected  # every epoch exactly once, in order
    assert after[:len(before)] == before
    assert (out / "model.keras").is_file()

    again = CliRunner().invoke(main, ["finetune", "--resume", "--out", str(out)])
    assert again.exit_code == 2 and "already finished" in again.output


def test_sigterm_stops_cleanly_and_says_how_to_resume(tmp_path, data):
    out = tmp_path / "run"
    proc = start(finetune_args(data, out), tmp_path / "cache")
    try:
        assert wait_for(proc, lambda: len(history(out)) >= 1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert f"tltool finetune --resume --out {out}" in err
    assert "Traceback" not in err


def test_resume_refuses_other_settings(tmp_path, data):
    result = CliRunner().invoke(main, ["finetune", "--resume", "--out", str(tmp_path), "--epochs", "3"])
    assert result.exit_code == 2 and "drop --epochs" in result.output
    result = CliRunner().invoke(main, ["finetune", "--resume", "--out", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "Nothing to resume" in result.output


def test_deterministic_runs_give_identical_metrics(tmp_path, data):
    args = finetune_args(data, tmp_path / "a") + ["--deterministic"]
    args[args.index("--fine-tune-epochs") + 1] = "1"
    first = CliRunner().invoke(main, args)
    second = CliRunner().invoke(main, [a if a != str(tmp_path / "a") else str(tmp_path / "b") for a in args])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    rows_a = (tmp_path / "a" / "history.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "history.csv").read_text().splitlines()
    strip = lambda rows: [",".join(r.split(",")[:-1]) for r in rows]  # noqa: E731 - drop the seconds column
    assert strip(rows_a) == strip(rows_b)


class SimulatedCrash(Exception):
    pass


def test_early_stopping_keeps_its_patience_and_best_weights_across_a_resume(tmp_path):
    import keras
    import numpy as np

    from tltool.engine.callbacks import ResumableEarlyStopping
    from tltool.engine.fitting import stage_callbacks

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")

    def model():
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        m.compile(keras.optimizers.SGD(0.5), "binary_crossentropy")
        return m

    class Crash(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 3:
                self.weights = self.model.get_weights()
                raise SimulatedCrash

    # Validating on the opposite labels: val_loss only rises, so epoch 0 stays the best and patience runs.
    validation = (x, 1 - y)
    crash = Crash()
    first = stage_callbacks(None, 1, patience=50, backup_dir=tmp_path, extra=[crash])
    with pytest.raises(SimulatedCrash):
        model().fit(x, y, validation_data=validation, epochs=10, callbacks=first, verbose=0)
    before = next(c for c in first if isinstance(c, ResumableEarlyStopping))
    assert (before.best_epoch, before.wait) == (0, 3)
    assert not np.allclose(before.best_weights[0], crash.weights[0])  # the backup holds other weights

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.state = (after.wait, after.best, after.best_epoch)

    probe = Probe()
    second = stage_callbacks(None, 1, patience=50, backup_dir=tmp_path, extra=[probe])
    after = next(c for c in second if isinstance(c, ResumableEarlyStopping))
    resumed = model()  # fresh weights: everything comes back from the backups
    resumed.fit(x, y, validation_data=validation, epochs=4, callbacks=second, verbose=0)  # nothing left to run
    assert probe.state == (before.wait, pytest.approx(before.best), before.best_epoch)
    for restored, best in zip(resumed.get_weights(), before.best_weights):
        np.testing.assert_array_equal(restored, best)
