"""End to end: tiny finetune runs through the API and the CLI, on CPU, without network."""

import csv
import json
import os
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import tltool
from helpers import (calibrated_backbone_weights, image_paths, make_image_folder, saved_model_accuracy,
                     saved_model_probabilities, tiny_recipe_args, tiny_values, validation_paths)
from tltool.cli import main
from tltool.errors import TrainingError
from tltool.recipe import load_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny two-stage run shared by the tests that only read its outputs.

    Calibrated random backbone weights make its answers depend on the image, so that its numbers can be
    checked by computing them again; train.deterministic makes the run repeatable exactly.
    """
    root = tmp_path_factory.mktemp("run")
    data = make_image_folder(root / "data", per_class=8)
    test = make_image_folder(root / "test", per_class=3, seed=1)
    weights = calibrated_backbone_weights(root / "backbone.weights.h5", images=data)
    result = tltool.finetune(data=data, test_data=test, out=root / "out", verbose=0,
                             overrides=tiny_values(32) + [f"backbone.weights={weights}", "train.deterministic=true"])
    return result


def test_run_directory_has_every_artifact(tiny_run):
    run = tiny_run.run_dir
    for name in ("model.keras", "labels.txt", "recipe.yaml", "history.csv", "summary.json"):
        assert (run / name).is_file(), name
    assert (run / "labels.txt").read_text().split() == ["blue", "green", "red"]


def test_summary_has_the_documented_fields(tiny_run):
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    assert summary["classes"] == ["blue", "green", "red"]
    # The accuracies and losses are those of model.keras on the validation split and the test folder.
    test_files = image_paths(load_recipe(tiny_run.run_dir / "recipe.yaml").data.test)
    for key, paths in (("val", validation_paths(tiny_run.run_dir)), ("test", test_files)):
        accuracy, loss = saved_model_accuracy(tiny_run.run_dir, paths)
        assert summary[f"{key}_accuracy"] == pytest.approx(accuracy, abs=1e-6), key
        assert summary[f"{key}_loss"] == pytest.approx(loss, abs=1e-4), key
    assert summary["images"] == {"train": 18, "val": 6, "test": 9}
    assert summary["skipped_files"] == []
    timings = summary["timings"]
    assert timings["total_s"] >= timings["stage1_s"] + timings["stage2_s"] > 0
    assert timings["feature_images"] == 24 and timings["features_s"] > 0


def test_history_has_one_row_per_epoch_of_each_stage(tiny_run):
    rows = list(csv.DictReader(open(tiny_run.run_dir / "history.csv")))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "1")]
    assert all(r["val_accuracy"] for r in rows)


def test_saved_model_reloads_safely_and_takes_plain_pixels(tiny_run):
    model = keras.models.load_model(tiny_run.run_dir / "model.keras", safe_mode=True)
    pixels = np.full((2, 32, 32, 3), 200, "float32")
    outputs = model.predict(pixels, verbose=0)
    probs, ood = outputs["probabilities"], outputs["ood_score"]
    assert probs.shape == (2, 3) and ood.shape == (2, 1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_resolved_recipe_repeats_the_run(tiny_run, tmp_path):
    first = tiny_run.run_dir
    recipe = load_recipe(first / "recipe.yaml")
    assert recipe.backbone.weights.endswith("backbone.weights.h5") and recipe.data.image_size == 32
    assert recipe.train.deterministic
    again = tltool.finetune(first / "recipe.yaml", out=tmp_path / "again", verbose=0)
    second = again.run_dir
    # Same classes, and the same split of the same files: the repeat's validation numbers are those of
    # its model on the first run's validation files.
    assert (second / "labels.txt").read_text() == (first / "labels.txt").read_text()
    assert again.summary["classes"] == tiny_run.summary["classes"]
    assert again.summary["images"] == tiny_run.summary["images"]
    assert again.summary["class_counts"] == tiny_run.summary["class_counts"]
    accuracy, loss = saved_model_accuracy(second, validation_paths(first))
    assert again.summary["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert again.summary["val_loss"] == pytest.approx(loss, abs=1e-4)
    # Deterministic training: every epoch's losses and accuracies, and the final model, come out the same.
    def history(run):
        with open(run / "history.csv") as handle:
            return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]

    assert len(history(first)) == 3 and history(second) == history(first)
    for key in ("val_accuracy", "val_loss", "test_accuracy", "test_loss"):
        assert again.summary[key] == tiny_run.summary[key], key
    files = validation_paths(first) + [str(p) for p in image_paths(recipe.data.test)]
    np.testing.assert_allclose(saved_model_probabilities(second, files)[0],
                               saved_model_probabilities(first, files)[0], atol=1e-6)
    # The repeat's resolved recipe is the first's (nothing in it names the run or its directory).
    repeated = load_recipe(second / "recipe.yaml").to_dict()
    original = recipe.to_dict()
    repeated.pop("name"), original.pop("name")
    assert repeated == original


def test_learns_an_easy_task(tmp_path):
    """Colour classes are separable by the features of a random VGG16 (no BatchNorm to calibrate)."""
    data = make_image_folder(tmp_path / "data", per_class=12)
    result = tltool.finetune(data=data, out=tmp_path / "out", verbose=0, backbone="vgg16",
                             overrides=["backbone.weights=none", "data.image_size=32", "data.batch_size=8",
                                        "frozen.epochs=20", "frozen.learning_rate=0.01", "frozen.early_stopping=0",
                                        "fine_tune.epochs=0"])
    assert result.summary["val_accuracy"] >= 0.8


def test_weights_file_saved_by_the_test_is_loaded(tmp_path, image_folder):
    spec = tltool.get_backbone_spec("mobilenet_v2")
    net = spec.constructor_fn()(include_top=False, weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(0)
    # Weights no initialiser would give (a variance must stay positive, or every feature is NaN).
    net.set_weights([(w + rng.normal(0, 0.01, w.shape) if "variance" not in v.path else w).astype("float32")
                     for v, w in zip(net.weights, net.get_weights())])
    path = tmp_path / "pretrained.weights.h5"
    net.save_weights(path)
    reference = net.get_weights()[0]
    result = tltool.finetune(data=image_folder, out=tmp_path / "out", weights=str(path), verbose=0,
                             overrides=["data.image_size=32", "frozen.epochs=1", "fine_tune.epochs=0"])
    model = keras.models.load_model(result.run_dir / "model.keras")
    backbone = next(layer for layer in model.get_layer("feature_extractor").layers
                    if isinstance(layer, keras.Model))
    np.testing.assert_allclose(backbone.get_weights()[0], reference)


def test_weights_file_of_another_network_is_a_clear_error(tmp_path, image_folder):
    other = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    result = CliRunner().invoke(main, ["finetune", "--data", str(image_folder), "--weights", str(path),
                                       "--out", str(tmp_path / "out"), *tiny_recipe_args()[2:]])
    assert result.exit_code == 2
    assert "does not fit mobilenet_v2 without its top" in result.output
    # Nothing trained, nothing kept: the command runs again in the same folder without --force.
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".tltool"]
    again = CliRunner().invoke(main, ["finetune", "--data", str(image_folder), "--out", str(tmp_path / "out"),
                                      *tiny_recipe_args()])
    assert again.exit_code == 0, again.output


def test_classic_head_swaps_only_the_last_layer(tmp_path, image_folder):
    result = tltool.finetune(data=image_folder, out=tmp_path / "out", backbone="vgg16", verbose=0,
                             overrides=["backbone.weights=none", "head.mode=classic", "data.image_size=32",
                                        "frozen.epochs=1", "fine_tune.epochs=0"])
    model = result.model
    assert model.output["probabilities"].shape == (None, 3)
    backbone = next(layer for layer in model.get_layer("feature_extractor").layers
                    if isinstance(layer, keras.Model) and "classic" in layer.name)
    assert backbone.output_shape == (None, 4096)  # VGG16's fc2 kept


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_finetune_success(tmp_path, image_folder):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["finetune", "--data", str(image_folder), "--out", str(out), "--quiet",
                                       "--epochs", "1", "--fine-tune-epochs", "0", *tiny_recipe_args()])
    assert result.exit_code == 0, result.output
    assert "val_accuracy" in result.output and (out / "model.keras").is_file()


def test_cli_refuses_a_non_empty_out_without_force(tmp_path, image_folder):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["finetune", "--data", str(image_folder), "--out", str(out), "--quiet", *tiny_recipe_args()]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert "already exists and is not empty" in result.output and "--force" in result.output
    assert (out / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- --force keeps the last run


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def stopped_in_training(monkeypatch, exc):
    """Make training stop with `exc` once the new run has recorded its start (it is resumable from there)."""
    import tltool.commands.finetune as finetune_module

    def stops(ctx, tm, run_dir, **kwargs):
        (run_dir / "history.csv").write_text("stage,epoch\n1,1\n")  # half a new run
        raise exc

    monkeypatch.setattr(finetune_module, "train_stages", stops)


def test_a_force_run_that_fails_leaves_the_previous_run_as_it_was(tiny_run, tmp_path, image_folder,
                                                                  monkeypatch):
    out = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    before = files_of(out)
    stopped_in_training(monkeypatch, TrainingError("The loss diverged."))
    with pytest.raises(TrainingError):
        tltool.finetune(data=image_folder, out=out, force=True, verbose=0, overrides=tiny_values(32))
    assert files_of(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing kept aside any more


def test_an_interrupted_force_run_keeps_the_previous_run_aside_and_resumes(tiny_run, tmp_path, image_folder,
                                                                          monkeypatch):
    """A kill (here a Ctrl-C, which cleans up nothing either) leaves the previous run whole beside the new
    one; --resume finishes the new one, and only then removes the previous one."""
    out = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    before = files_of(out)
    stopped_in_training(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        tltool.finetune(data=image_folder, out=out, force=True, verbose=0, overrides=tiny_values(32))
    previous = tmp_path / ".run.previous"
    assert files_of(previous) == before
    assert (out / "recipe.yaml").is_file() and not (out / "summary.json").exists()
    monkeypatch.undo()
    lines = []
    resumed = tltool.finetune(out=out, resume=True, verbose=2, log=lines.append)
    assert resumed.summary["resumed"] and (out / "model.keras").is_file()
    assert f"{previous} holds the run that an interrupted --force replaced in {out}" in "\n".join(lines)
    assert not previous.exists()


def test_resume_after_a_force_run_killed_before_it_began_says_where_the_old_run_is(tiny_run, tmp_path):
    """Killed just after moving the old run aside (its first step): nothing to resume, and the line says where
    the old run is and how to get it back or go on."""
    out = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    os.replace(out, tmp_path / ".run.previous")  # what --force does first, in one rename
    result = CliRunner().invoke(main, ["finetune", "--resume", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"The run it replaced is whole in {tmp_path / '.run.previous'}: run the same --force command" in result.output
    assert len(result.output.strip().splitlines()) == 1 and (tmp_path / ".run.previous" / "summary.json").is_file()


def test_a_force_run_settles_what_an_interrupted_one_left_aside(tiny_run, tmp_path, image_folder,
                                                                monkeypatch):
    """After an interrupted --force, the previous run is the last finished one: the next --force keeps it (and
    puts it back when it fails); once the folder holds a finished run, a run left aside is removed."""
    out = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    before = files_of(out)
    previous = tmp_path / ".run.previous"
    stopped_in_training(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        tltool.finetune(data=image_folder, out=out, force=True, verbose=0, overrides=tiny_values(32))
    stopped_in_training(monkeypatch, TrainingError("The loss diverged."))

    def failing_force_run() -> str:
        lines = []
        with pytest.raises(TrainingError):
            tltool.finetune(data=image_folder, out=out, force=True, verbose=1, log=lines.append,
                            overrides=tiny_values(32))
        return "\n".join(lines)

    assert f"{previous} holds the run that an interrupted --force replaced in {out}" in failing_force_run()
    assert files_of(out) == before and not previous.exists()
    shutil.copytree(out, previous)  # as a kill just before the finished run removed it leaves it
    assert f"Removed {previous}: it kept the run that --force replaced in {out}" in failing_force_run()
    assert files_of(out) == before and not previous.exists()


def test_force_leaves_a_folder_in_the_way_of_the_previous_run_alone(tiny_run, tmp_path, image_folder):
    out = shutil.copytree(tiny_run.run_dir, tmp_path / "run")
    mine = tmp_path / ".run.previous"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    result = CliRunner().invoke(main, ["finetune", "--data", str(image_folder), "--out", str(out), "--force",
                                       "--quiet", *tiny_recipe_args()])
    assert result.exit_code == 2 and "holds something else: move it away" in result.output
    assert (mine / "notes.txt").read_text() == "my notes" and (out / "summary.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/folder"], "The training folder /nonexistent/folder does not exist"),
    (["--backbone", "resnet5"], "Unknown backbone `resnet5`. Did you mean `resnet50`"),
    (["--set", "head.dropuot=0.1"], "unknown key `head.dropuot`. Did you mean `head.dropout`?"),
    (["--backbone", "inception_v3", "--image-size", "40"], "Image size 40 is too small for inception_v3"),
    (["--image-size", "16"], "expected `data.image_size` to be between 32 and 1024"),
    (["--weights", "/nonexistent/w.weights.h5"], "Weights file not found"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, image_folder, args, message):
    base = ["finetune", "--out", str(tmp_path / "out")]
    if "--weights" not in args:
        base += ["--weights", "none"]
    if "--data" not in args:
        base += ["--data", str(image_folder)]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_missing_recipe_file(tmp_path):
    result = CliRunner().invoke(main, ["finetune", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "Recipe file not found" in result.output


def test_cli_backbones_lists_the_registry():
    result = CliRunner().invoke(main, ["backbones", "mobilenet_v*", "--no-params"])
    assert result.exit_code == 0
    assert "mobilenet_v2" in result.output and "1280" in result.output and "vgg16" not in result.output
    result = CliRunner().invoke(main, ["backbones", "nothing*"])
    assert result.exit_code == 2 and "No backbone matches" in result.output


def test_gpu_options_are_ignored_with_a_warning_on_cpu(tmp_path, image_folder):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("checks the CPU fallback")
    with pytest.warns(UserWarning) as caught:
        result = tltool.finetune(data=image_folder, out=tmp_path / "run", verbose=0,
                                 overrides=tiny_values(32) + ["train.mixed_precision=true", "train.xla=true",
                                                              "train.strategy=mirrored", "fine_tune.epochs=0"])
    messages = " ".join(str(w.message) for w in caught)
    assert "mixed_precision is ignored" in messages and "xla is ignored" in messages and "mirrored" in messages
    # Mixed precision really was ignored: every layer of the saved model computes in float32.
    model = keras.models.load_model(result.run_dir / "model.keras")

    def layers(layer):
        yield layer
        for inner in getattr(layer, "layers", []):
            yield from layers(inner)

    assert {layer.dtype_policy.name for layer in layers(model)} == {"float32"}
    accuracy, _ = saved_model_accuracy(result.run_dir, validation_paths(result.run_dir))
    assert result.summary["val_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_run_files_get_ordinary_permissions(tiny_run):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for name in ("summary.json", "labels.txt", "recipe.yaml"):
        mode = stat.S_IMODE((tiny_run.run_dir / name).stat().st_mode)
        assert mode == 0o666 & ~umask, name


def test_cosine_schedule_decays_the_stage2_learning_rate(tmp_path, image_folder):
    tltool.finetune(data=image_folder, out=tmp_path / "run", verbose=0,
                    overrides=tiny_values(32) + ["frozen.epochs=1", "fine_tune.epochs=3", "fine_tune.early_stopping=0",
                                                 "fine_tune.learning_rate=0.001", "fine_tune.schedule=cosine"])
    with open(tmp_path / "run" / "history.csv") as handle:
        rates = [float(r["learning_rate"]) for r in csv.DictReader(handle) if r["stage"] == "2"]
    # Set per epoch: the start, a third and two thirds of the way down the half cosine.
    np.testing.assert_allclose(rates, [0.001, 0.00075, 0.00025], rtol=1e-5)


# ------------------------------------------------------------------------------------------ validation scores
# A run that trained on cached rows scores its validation images from them (the final features through the
# head and the OOD scorer), after checking a sample against the saved model run on the image files.


@pytest.fixture(scope="module")
def run_with_a_broken_val_file(tmp_path_factory):
    """A two-stage run (stage 2 on cached activations) whose validation folder has an unreadable file among
    its images, so that the rows of the cached scores must be matched to the right files."""
    root = tmp_path_factory.mktemp("val_rows")
    data = make_image_folder(root / "data", per_class=8)
    val = make_image_folder(root / "val", per_class=4, seed=1)
    # A file whose header reads (so the folder scan keeps it) but whose pixels do not: found while decoding,
    # after the val rows were laid out. It sorts between two readable files.
    whole = (val / "green" / "green_000.jpg").read_bytes()
    (val / "green" / "green_001b.jpg").write_bytes(whole[:len(whole) * 9 // 10])
    weights = calibrated_backbone_weights(root / "backbone.weights.h5", images=data)
    messages = []
    result = tltool.finetune(data=data, val_data=val, out=root / "out", log=messages.append,
                             overrides=tiny_values(32) + [f"backbone.weights={weights}", "frozen.epochs=4"])
    return result, messages


def test_validation_scores_from_the_cache_are_the_saved_models(run_with_a_broken_val_file):
    from tltool.evaluation.sets import KNOWN_SCORES_TOLERANCE

    result, messages = run_with_a_broken_val_file
    run, summary = result.run_dir, result.summary
    assert 0 <= summary["val_from_cache_gap"] <= KNOWN_SCORES_TOLERANCE  # scored from the cache
    assert not any("evaluating every validation image" in m for m in messages)
    paths = [p for p in image_paths(run.parent / "val") if p.name != "green_001b.jpg"]
    probs, labels = saved_model_probabilities(run, paths)
    metrics = json.loads((run / "metrics.json").read_text())["val"]
    assert summary["images"]["val"] == len(paths) == 12
    assert [s["path"] for s in summary["skipped_files"]] == [str(run.parent / "val" / "green" / "green_001b.jpg")]
    assert summary["val_accuracy"] == pytest.approx(float(np.mean(probs.argmax(1) == labels)), abs=1e-6)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    assert summary["val_loss"] == pytest.approx(float(-np.mean(np.log(picked))), abs=1e-4)
    # Each image's confidence as the saved model gives it: rows matched to their files, the temperature in.
    assert metrics["mean_confidence"] == pytest.approx(float(probs.max(1).mean()), abs=1e-4)
    assert len(set(np.round(probs.max(1), 3))) > 3  # answers that differ from image to image


def test_validation_scores_that_are_not_the_models_are_not_used(run_with_a_broken_val_file):
    from tltool.commands.finetune import _evaluate
    from tltool.engine.setup import prepare_run
    from tltool.evaluation.sets import KnownScores
    from tltool.models.ood import Scores
    from tltool.recipe import load_recipe as load

    result, _ = run_with_a_broken_val_file
    setup = prepare_run(load(result.run_dir / "recipe.yaml"))
    honest, _, unchecked = _evaluate(result.model, setup, {})  # every image through the model
    assert unchecked is None
    rows = np.flatnonzero([not p.endswith("green_001b.jpg") for p in setup.split.val.paths])
    wrong = np.tile(np.eye(3, dtype=np.float32)[:1], (len(rows), 1))  # "blue" for every image
    said = []
    (checked, *_), _, gap = _evaluate(result.model, setup, {},
                                      KnownScores(rows, Scores(wrong, honest[0].ood_score)), said.append)
    assert gap > 0.1
    assert any("evaluating every validation image" in m for m in said)
    np.testing.assert_allclose(checked.probs, honest[0].probs, atol=1e-6)
    assert checked.metrics["accuracy"] == honest[0].metrics["accuracy"]
