"""Nothing of the user's overwritten, nothing trusted blindly: output folders, locks, inputs, the cache key."""

import json
import os
import shutil
import time

import pytest
from click.testing import CliRunner

from helpers import make_image_folder, tiny_recipe_args
from tltool import outputs
from tltool.cli import main


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, a finished run) shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("safety")
    data = make_image_folder(root / "data", per_class=6)
    result = run("finetune", "--data", data, "--out", root / "run", "--quiet", *tiny_recipe_args())
    assert result.exit_code == 0, result.output
    return data, root / "run"


# ------------------------------------------------------------------------------ destructive paths


def test_evaluate_out_run_force_leaves_the_run_whole(trained):
    data, run_dir = trained
    before = sorted(p.name for p in run_dir.iterdir())
    result = run("evaluate", run_dir, "--data", data, "--out", run_dir, "--force", "--no-robustness")
    assert result.exit_code == 2 and "which this command reads" in result.output
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_force_never_replaces_a_folder_tltool_did_not_write(trained, tmp_path):
    data, _ = trained
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    result = run("finetune", "--data", data, "--out", mine, "--force", "--quiet", *tiny_recipe_args())
    assert result.exit_code == 2 and "no .tltool marker" in result.output
    assert (mine / "notes.txt").read_text() == "my notes"


def test_force_replaces_only_output_of_the_same_kind(trained, tmp_path):
    data, run_dir = trained
    evaluation = tmp_path / "eval"
    assert run("evaluate", run_dir, "--data", data, "--out", evaluation, "--no-robustness").exit_code == 0
    assert outputs.read_marker(evaluation) == {"kind": "evaluation"}
    again = run("evaluate", run_dir, "--data", data, "--out", evaluation, "--force", "--no-robustness")
    assert again.exit_code == 0, again.output
    result = run("finetune", "--data", data, "--out", evaluation, "--force", "--quiet", *tiny_recipe_args())
    assert result.exit_code == 2 and "holds a tltool evaluation, not a tltool run" in result.output
    assert (evaluation / "report.html").is_file()


def test_out_inside_or_holding_the_data_is_refused(trained, tmp_path):
    data, _ = trained
    copy = shutil.copytree(data, tmp_path / "data")
    for out in (copy / "run", copy, tmp_path):
        result = run("finetune", "--data", copy, "--out", out, "--force", "--quiet", *tiny_recipe_args())
        assert result.exit_code == 2, result.output
    assert sorted(p.name for p in copy.iterdir()) == ["blue", "green", "red"]


@pytest.mark.parametrize("variable", ["TLTOOL_FINETUNE_FORCE", "TLTOOL_FINETUNE_RESUME"])
def test_destructive_flags_are_never_read_from_the_environment(trained, tmp_path, variable):
    data, _ = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = run("finetune", "--data", data, "--out", out, "--quiet", *tiny_recipe_args(), env={variable: "1"})
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
    assert (out / "keep.txt").is_file()


def test_a_second_command_on_a_locked_folder_is_refused(trained, tmp_path):
    data, _ = trained
    out = tmp_path / "busy"
    with outputs.claim_output_dir(out, "run"):  # as a run in progress holds it
        (out / "history.csv").write_text("stage,epoch\n")
        result = run("finetune", "--data", data, "--out", out, "--force", "--quiet", *tiny_recipe_args())
        assert result.exit_code == 2 and "in use by another tltool command" in result.output
    assert (out / "history.csv").is_file()


def test_a_replaced_output_is_put_in_place_whole_or_not_at_all(tmp_path):
    """What evaluate and export write goes into a temporary folder beside --out, replacing --out only once the
    block completes; a failure leaves the old folder as it was and no temporary behind."""
    out = tmp_path / "eval"
    with outputs.replacing_output_dir(out, "evaluation") as folder:
        (folder / "report.html").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with outputs.replacing_output_dir(out, "evaluation") as folder:
            (folder / "report.html").write_text("half")
            raise RuntimeError("failed midway")
    assert (out / "report.html").read_text() == "old" and outputs.read_marker(out) == {"kind": "evaluation"}
    with outputs.replacing_output_dir(out, "evaluation") as folder:
        (folder / "metrics.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == [".tltool", "metrics.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


def test_only_stale_temporaries_that_are_provably_tltool_s_own_are_removed(tmp_path):
    """A killed command leaves its temporary behind, marked; the next one on the same --out removes it once
    stale, and nothing else: not a recent one, one in use, one of another kind, or one without a marker."""
    out = tmp_path / "export"
    names = ("killed", "recent", "busy", "other-kind", "unmarked")
    folders = {name: tmp_path / f".export.{name}.tmp" for name in names} | {"linked": tmp_path / "linked"}
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "model.keras").write_bytes(b"half written")
        kind = "evaluation" if name == "other-kind" else "export"
        if name != "unmarked":
            (folder / outputs.MARKER).write_text(json.dumps({"kind": kind}))
    link = tmp_path / ".export.link.tmp"
    link.symlink_to("linked")
    old = time.time() - outputs.STALE_TEMPORARY_S - 60
    for name, folder in folders.items():
        if name != "recent":
            os.utime(folder, (old, old))
    with outputs.FileLock(folders["busy"] / outputs.MARKER):  # a command still writing it, for hours
        with outputs.replacing_output_dir(out, "export") as folder:
            (folder / "model.keras").write_bytes(b"new")
    assert not folders["killed"].exists()
    assert all(folder.exists() for name, folder in folders.items() if name != "killed") and link.is_symlink()
    assert (out / "model.keras").read_bytes() == b"new"


def test_recipe_name_cannot_leave_the_runs_folder(trained, tmp_path, monkeypatch):
    data, _ = trained
    monkeypatch.chdir(tmp_path)
    for name in ("../escape", "/tmp/abs", "..", "a/b"):
        result = run("finetune", "--data", data, "--set", f"name={name}", "--quiet", *tiny_recipe_args())
        assert result.exit_code == 2 and "`name` becomes a folder name" in result.output
    assert not (tmp_path.parent / "escape").exists()


# ---------------------------------------------------------------------------------------- resume


def test_resume_refuses_changed_data_naming_what_changed(trained, tmp_path):
    data, run_dir = trained
    copy = shutil.copytree(data, tmp_path / "data")
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    manifest = json.loads((out / "data.json").read_text())
    for split in manifest["files"].values():  # the copied run trained on the copied folder
        for row in split or []:
            row[0] = row[0].replace(str(data), str(copy))
            row[2:] = [os.stat(row[0]).st_size, os.stat(row[0]).st_mtime_ns]
    manifest["roots"] = {k: v and v.replace(str(data), str(copy)) for k, v in manifest["roots"].items()}
    (out / "data.json").write_text(json.dumps(manifest))
    recipe = (out / "recipe.yaml").read_text().replace(str(data), str(copy))
    (out / "recipe.yaml").write_text(recipe)
    (out / "summary.json").unlink()  # as if interrupted
    shutil.copy(copy / "red" / "red_000.jpg", copy / "red" / "red_new.jpg")
    result = run("finetune", "--resume", "--out", out, "--quiet")
    assert result.exit_code == 2 and "1 image(s) added (e.g." in result.output and "red_new.jpg" in result.output
    (copy / "red" / "red_new.jpg").unlink()
    (copy / "red").rename(copy / "crimson")
    result = run("finetune", "--resume", "--out", out, "--quiet")
    assert result.exit_code == 2 and "classes gone: red; classes added: crimson" in result.output


def test_export_checks_on_the_recorded_split_and_the_model_labels(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "labels.txt").write_text("blue\nred\ngreen\n")  # not the order the model was trained with
    result = run("export", out, "--format", "keras")
    assert result.exit_code == 1 and "are not its model's labels.txt" in result.output


# ---------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("override, message", [
    ("frozen.learning_rate=nan", "to be a finite number"),
    ("fine_tune.learning_rate=.inf", "to be a finite number"),
    ("seed=-1", "to be between 0 and 4294967295"),
    (f"seed={2**32}", "to be between 0 and 4294967295"),
])
def test_numbers_that_would_break_training_are_refused(trained, tmp_path, override, message):
    data, _ = trained
    result = run("finetune", "--data", data, "--out", tmp_path / "out", "--set", override)
    assert result.exit_code == 2 and message in result.output


def test_a_missing_data_folder_is_named_before_weights_are_fetched(tmp_path):
    result = run("finetune", "--data", tmp_path / "no-such-folder", "--out", tmp_path / "out")  # imagenet default
    assert result.exit_code == 2 and "no-such-folder does not exist" in result.output


@pytest.mark.parametrize("name", ["a\u2028b", "a\x85b"])
def test_class_names_with_line_separators_are_refused(tmp_path, name):
    from tltool.data.folders import bad_class_name

    assert bad_class_name(name) is not None


def test_a_class_with_one_image_is_reported_unvalidated(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=6)
    for extra in sorted((data / "blue").iterdir())[1:]:
        extra.unlink()
    result = run("finetune", "--data", data, "--out", tmp_path / "out", "--quiet", *tiny_recipe_args(),
                 "--set", "fine_tune.epochs=0")
    assert result.exit_code == 0, result.output
    assert "1 class(es) have a single image" in result.output and "blue" in result.output


def test_a_diverging_loss_fails_the_stage_instead_of_finishing_it(tmp_path):
    import keras
    import numpy as np

    from tltool.engine.callbacks import load_weights, read_checkpoint
    from tltool.engine.fitting import fit_stage, stage_callbacks
    from tltool.errors import TrainingError

    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[(x[:, 0] > 0).astype(int)]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(1e38), "mse")  # no clipping anywhere: the weights overflow at once
    callbacks = stage_callbacks(None, 1, patience=0, backup_dir=tmp_path)
    with pytest.raises(TrainingError, match="Training diverged: the loss became"):
        fit_stage(model, _dataset(x, y), _dataset(x, y), 5, callbacks, verbose=0)
    state = read_checkpoint(tmp_path)  # what a resume would start from: finite weights, never the diverged ones
    if state is not None:
        load_weights(model, tmp_path / state["weights"])
        assert all(np.isfinite(w).all() for w in model.get_weights())


def _dataset(x, y):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


# ----------------------------------------------------------------------------------------- cache


def test_random_backbones_of_two_seeds_never_share_cached_features():
    from tltool.engine.setup import RunSetup
    from tltool.engine.stages import weights_identity
    from tltool.models.backbones import ResolvedWeights
    from tltool.recipe import load_recipe

    def identity(seed, weights):
        return weights_identity(RunSetup(load_recipe(overrides=[f"seed={seed}"]), None, 32, weights))

    random = ResolvedWeights("none", None, "random")
    assert identity(1, random) != identity(2, random)
    assert identity(1, random) == identity(1, random)
    pretrained = ResolvedWeights("imagenet", "imagenet", "imagenet-abc")
    assert identity(1, pretrained) == identity(2, pretrained)  # the seed does not change pretrained weights


def test_cache_clear_and_prune_leave_an_entry_in_use_alone(tmp_path):
    import numpy as np

    from tltool.commands.cache import clear_cache, prune_cache
    from tltool.engine.features import FeatureCache, file_key

    image = tmp_path / "img.png"
    image.write_bytes(b"x")
    entry = tmp_path / "cache" / "mobilenet_v2-32-0123456789abcdef"
    with FeatureCache(entry) as cache:  # a run reading and adding rows
        cache.add([file_key(str(image))], np.ones((1, 4), np.float16))
        image.unlink()  # now stale
        assert clear_cache(tmp_path / "cache")["in_use"] == 1
        assert prune_cache(tmp_path / "cache")["in_use"] == 1
        assert entry.is_dir() and len(FeatureCache(entry, lock=False).keys()) == 1
    assert clear_cache(tmp_path / "cache")["entries"] == 1 and not entry.exists()


def test_prune_keeps_rows_of_a_folder_that_cannot_be_reached(tmp_path):
    from tltool.engine.features import key_is_current

    drive = tmp_path / "drive" / "photos"
    drive.mkdir(parents=True)
    image = drive / "a.png"
    image.write_bytes(b"x")
    st = image.stat()
    key = f"{image}|{st.st_size}|{st.st_mtime_ns}|"
    assert key_is_current(key) is True
    image.unlink()
    assert key_is_current(key) is False  # deleted from a folder that is there: stale
    shutil.rmtree(tmp_path / "drive")  # the whole drive gone (not mounted): not proof the file is
    assert key_is_current(key) is None


# ------------------------------------------------------------------------------ exported files


@pytest.fixture(scope="module")
def tiny_tflite(tmp_path_factory):
    """The bytes of a small TFLite model taking 8x8 RGB images and giving 3 probabilities."""
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3, "softmax")])
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


@pytest.mark.parametrize("meta, message", [
    ({"labels": ["a", "b", "c"], "image_size": 10**9}, "declares an input size of 1000000000"),
    ({"labels": ["a", "b", "c"], "image_size": "8"}, "declares an input size of '8'"),
    ({"labels": ["a", "b", "c"], "image_size": 16}, "declares 16px images but its model takes 8px"),
    ({"labels": ["a", "b"], "image_size": 8}, "its model has 3 outputs but its labels list 2 classes"),
])
def test_metadata_of_an_exported_file_is_checked_against_its_model(tiny_tflite, tmp_path, meta, message):
    import tltool
    from tltool.errors import RunDirError
    from tltool.exporting.metadata import embed_tflite_metadata

    path = tmp_path / "model.tflite"
    path.write_bytes(embed_tflite_metadata(tiny_tflite, meta))
    with pytest.raises(RunDirError, match=message):
        tltool.load_predictor(path)
    good = tmp_path / "good.tflite"
    good.write_bytes(embed_tflite_metadata(tiny_tflite, {"labels": ["a", "b", "c"], "image_size": 8}))
    assert tltool.load_predictor(good).labels == ["a", "b", "c"]


def test_class_names_with_dollar_signs_draw(tmp_path):
    import numpy as np

    from tltool.evaluation import plots

    names = ["$5 bill", "price $\\bad{x$", "x^2_{a}$"]  # the middle one is broken mathtext
    png = plots.confusion_matrix(np.eye(3) * 4, names)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_16_bit_images_convert_strip_by_strip_to_the_same_pixels(tmp_path, monkeypatch):
    """A 16-bit scan is converted a strip of rows at a time (a 120-megapixel one used to take gigabytes of
    int64 copies per decoding thread); the result is the same 65535 -> 255 mapping."""
    import numpy as np
    from PIL import Image

    from tltool.data import images

    values = np.random.default_rng(0).integers(0, 65536, (300, 70), dtype=np.uint16)
    path = tmp_path / "scan.png"
    Image.fromarray(values).save(path)
    monkeypatch.setattr(images, "_CONVERT_PIXELS", 700)  # ten rows a strip
    strips = []
    original = images._by_rows
    monkeypatch.setattr(images, "_by_rows", lambda arr, f: strips.append(arr.shape) or original(arr, f))
    pixels = images.load_image(path)
    assert strips and pixels.shape == (300, 70, 3)
    np.testing.assert_array_equal(pixels[..., 0], ((values.astype(np.int64) + 128) // 257).astype(np.uint8))


def test_a_second_search_on_a_folder_in_use_is_refused(trained, tmp_path):
    data, _ = trained
    out = tmp_path / "search"
    with outputs.claim_output_dir(out, "search"):  # as a search in progress holds it
        result = run("tune", "--data", data, "--out", out, "--max-trials", "1", "--quiet", *tiny_recipe_args())
        assert result.exit_code == 2 and "in use by another tltool command" in result.output
