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


def test_a_crash_before_the_epoch_commit_retrains_that_epoch_as_an_uninterrupted_fit_would(tmp_path):
    """The checkpoint holds weights, optimizer state and early stopping's state of the same epoch: a fit
    killed after an epoch's other callbacks ran, before its commit, resumes to the same model."""
    import keras
    import numpy as np

    from tltool.engine.callbacks import read_checkpoint
    from tltool.engine.fitting import stage_callbacks

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")

    class Crash(keras.callbacks.Callback):  # an `extra` callback: it runs before the commit
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 3:
                raise SimulatedCrash

    def fit(folder, epochs=8, extra=()):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(keras.optimizers.Adam(0.05), "binary_crossentropy")  # Adam: optimizer state matters
        callbacks = stage_callbacks(None, 1, patience=3, backup_dir=folder, extra=extra)
        model.fit(x, y, validation_data=(x[:16], y[:16]), epochs=epochs, callbacks=callbacks, verbose=0,
                  shuffle=False)
        return model, next(c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping))

    reference, reference_es = fit(tmp_path / "reference")
    with pytest.raises(SimulatedCrash):
        fit(tmp_path / "run", extra=[Crash()])
    assert read_checkpoint(tmp_path / "run")["epoch"] == 3  # epochs 1-3 committed, the 4th not
    resumed, resumed_es = fit(tmp_path / "run")  # fresh weights: everything comes back from the checkpoint
    assert (resumed_es.wait, resumed_es.best_epoch) == (reference_es.wait, reference_es.best_epoch)
    assert resumed_es.best == pytest.approx(reference_es.best, rel=1e-5)
    for got, want in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert read_checkpoint(tmp_path / "run")["epoch"] == read_checkpoint(tmp_path / "reference")["epoch"]


def test_checkpoint_weights_round_trip_with_the_optimizer_state_and_old_keras_files_still_load(tmp_path):
    import keras
    import numpy as np

    from tltool.engine.callbacks import load_weights, save_weights

    def trained(seed):
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile(keras.optimizers.Adam(0.01), "categorical_crossentropy")
        x = np.random.default_rng(seed).normal(size=(16, 4)).astype("float32")
        model.fit(x, np.eye(2, dtype="float32")[np.arange(16) % 2], epochs=2, verbose=0)
        return model

    def state(model):
        return model.get_weights() + [np.asarray(v) for v in model.optimizer.variables]

    saved = trained(0)
    save_weights(saved, tmp_path / "epoch-2.npz")
    saved.save_weights(tmp_path / "epoch-2.weights.h5")  # a checkpoint of an earlier version
    for path in (tmp_path / "epoch-2.npz", tmp_path / "epoch-2.weights.h5"):
        fresh = trained(1)  # other weights, other Adam moments, another step count
        assert not all(np.array_equal(a, b) for a, b in zip(state(fresh), state(saved)))
        load_weights(fresh, path)
        for got, want in zip(state(fresh), state(saved)):
            np.testing.assert_array_equal(got, want)
    without = tmp_path / "after_stage.npz"
    save_weights(saved, without, optimizer=False)
    assert len(np.load(without).files) == len(saved.get_weights())
