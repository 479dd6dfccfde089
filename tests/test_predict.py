"""`tltool predict` and `load_predictor`: same answers from every format, JSON/CSV shapes, bad files."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from click.testing import CliRunner
from helpers import tiny_trained_run

import tltool
from tltool.cli import main
from tltool.errors import RunDirError

LABELS = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny run and its SavedModel and float32 TFLite exports."""
    run_dir = tiny_trained_run(tmp_path_factory.mktemp("predict-run"))
    tltool.export(run_dir, "savedmodel")
    tltool.export(run_dir, "tflite")
    return {"run": run_dir, "savedmodel": run_dir / "export" / "savedmodel",
            "tflite": run_dir / "export" / "tflite" / "model.tflite", "images": run_dir.parent / "images"}


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    return tmp_path


def test_predictions_agree_across_run_savedmodel_and_tflite(models):
    results = {name: tltool.predict_files(models[name], [models["images"]], top_k=3)
               for name in ("run", "savedmodel", "tflite")}
    reference = results["run"]
    assert len(reference) == 24 and all(r["error"] is None for r in reference)
    assert len({r["label"] for r in reference}) > 1  # the model tells images apart: the check means something
    for name in ("savedmodel", "tflite"):
        assert [r["path"] for r in results[name]] == [r["path"] for r in reference]
        assert [r["label"] for r in results[name]] == [r["label"] for r in reference]
        np.testing.assert_allclose([r["score"] for r in results[name]], [r["score"] for r in reference], atol=1e-3)


def test_load_predictor_interface(models):
    for name in ("run", "savedmodel", "tflite"):
        predictor = tltool.load_predictor(models[name])
        assert predictor.labels == LABELS and predictor.image_size == 32
        probs = predictor.predict(np.zeros((5, 32, 32, 3), np.uint8))
        assert probs.shape == (5, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-3)
    # The SavedModel's version folder and the .tflite's folder load too.
    assert tltool.load_predictor(models["savedmodel"] / "1").format == "savedmodel"
    assert tltool.load_predictor(models["tflite"].parent).format == "tflite"
    with pytest.raises(ValueError, match=r"Expected pixels of shape \(N, 32, 32, 3\)"):
        tltool.load_predictor(models["run"]).predict(np.zeros((1, 64, 64, 3), np.uint8))


def test_load_predictor_says_what_it_expects(tmp_path):
    with pytest.raises(RunDirError, match="No model in .*: expected a run directory"):
        tltool.load_predictor(tmp_path)
    with pytest.raises(RunDirError, match="Model not found"):
        tltool.load_predictor(tmp_path / "missing")


def test_bad_files_are_reported_and_the_rest_go_on(models, bad_files):
    good = sorted(models["images"].glob("red/*"))[:2]
    results = tltool.predict_files(models["run"], [good[0], bad_files, bad_files / "missing.jpg", good[1]])
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in results}
    assert [r["path"] for r in results][0] == str(good[0]) and results[-1]["path"] == str(good[1])
    assert by_name["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert by_name["truncated.jpg"]["error"] and by_name["truncated.jpg"]["label"] is None
    assert by_name["missing.jpg"]["error"] == "file not found"
    assert all(by_name[p.name]["error"] is None and by_name[p.name]["label"] in LABELS for p in good)


def test_threshold_turns_low_scores_into_unknown(models):
    plain = tltool.predict_files(models["run"], [models["images"]])
    scores = sorted(r["score"] for r in plain)
    threshold = (scores[0] + scores[-1]) / 2
    assert scores[0] < threshold < scores[-1]
    gated = tltool.predict_files(models["run"], [models["images"]], threshold=threshold)
    for before, after in zip(plain, gated):
        assert after["label"] == (before["label"] if before["score"] >= threshold else "unknown")
        assert after["top_k"] == before["top_k"]  # the classes are still listed


def test_cli_predict_json(models):
    files = [str(p) for p in sorted(models["images"].glob("green/*"))[:3]]
    result = CliRunner().invoke(main, ["predict", str(models["savedmodel"]), *files,
                                                       "--json", "--top-k", "2"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == files
    for row in rows:
        assert set(row) == {"path", "label", "predicted", "score", "reason", "ood_score", "top_k", "error"}
        assert row["label"] in LABELS and len(row["top_k"]) == 2
        assert row["predicted"] == row["label"] and row["reason"] is None and row["ood_score"] <= 1
        assert row["top_k"][0] == {"label": row["label"], "score": row["score"]}


def test_cli_predict_csv_with_bad_file_exits_1(models, bad_files):
    files = [str(p) for p in sorted(models["images"].glob("blue/*"))[:2]] + [str(bad_files / "notes.png")]
    result = CliRunner().invoke(main, ["predict", str(models["tflite"]), *files, "--csv"])
    assert result.exit_code == 1
    table = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(table[0]) == ["path", "label", "score", "error", "predicted", "reason", "ood_score", "label_1",
                              "score_1", "label_2", "score_2", "label_3", "score_3"]
    assert [row["path"] for row in table] == files
    assert table[2]["error"] == "not an image (unrecognised content)" and table[2]["label"] == ""
    assert all(row["label"] in LABELS for row in table[:2])
    assert "1 of 3 file(s) could not be classified" in result.stderr


def test_cli_predict_errors(models, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(tmp_path), str(models["images"])])
    assert result.exit_code == 2
    assert "No model in" in result.stderr and "Traceback" not in result.stderr
    result = runner.invoke(main, ["predict", str(models["run"]), str(models["images"]), "--json", "--csv"])
    assert result.exit_code == 2 and "Pass at most one of --json and --csv" in result.stderr


def test_damaged_exports_get_one_line_saying_to_export_again(models, tmp_path):
    import shutil

    (tmp_path / "junk.onnx").write_bytes(b"not a model" * 100)
    (tmp_path / "junk.tflite").write_bytes(b"not a model" * 100)
    (tmp_path / "junk-keras").mkdir()
    (tmp_path / "junk-keras" / "model.keras").write_bytes(b"not a model" * 100)
    (tmp_path / "junk-keras" / "labels.txt").write_text((models["run"] / "labels.txt").read_text())
    junk_pb = tmp_path / "junk-savedmodel"
    shutil.copytree(models["savedmodel"], junk_pb)
    (junk_pb / "1" / "saved_model.pb").write_bytes(b"not a model" * 100)
    no_variables = tmp_path / "savedmodel-without-variables"
    shutil.copytree(models["savedmodel"], no_variables)
    shutil.rmtree(no_variables / "1" / "variables")
    for model in ("junk.onnx", "junk.tflite", "junk-keras/model.keras", "junk-savedmodel", "savedmodel-without-variables"):
        result = CliRunner().invoke(main, ["predict", str(tmp_path / model), str(models["images"])])
        assert result.exit_code == 2, (model, result.output)
        assert "not a readable" in result.stderr or "not a Keras model file" in result.stderr, (model, result.stderr)
        assert "Traceback" not in result.stderr and "File not found" not in result.stderr, (model, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (model, result.stderr)


def test_tta_averages_each_image_with_its_mirror_and_is_refused_for_unmirrored_runs(models, tmp_path):
    plain = tltool.load_predictor(models["tflite"])
    averaged = tltool.mirror_tta(plain, models["tflite"])
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = (plain.predict(pixels) + plain.predict(pixels[:, :, ::-1])) / 2
    np.testing.assert_allclose(averaged.predict(pixels), expected, rtol=1e-5, atol=1e-35)
    assert not np.allclose(expected, plain.predict(pixels), rtol=0.01, atol=0)  # mirroring changes the answer

    rows = tltool.predict_files(models["run"], [models["images"]], tta=True)
    assert all(r["error"] is None for r in rows)
    result = CliRunner().invoke(main, ["predict", str(models["run"]), str(models["images"]), "--tta", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["score"] for r in json.loads(result.output)] == [r["score"] for r in rows]

    # A run that was trained without mirrored images (digits, text) must not be averaged with them.
    import shutil

    import yaml

    unmirrored = tmp_path / "unmirrored-run"
    shutil.copytree(models["run"], unmirrored, ignore=shutil.ignore_patterns("export"))
    recipe = yaml.safe_load((unmirrored / "recipe.yaml").read_text())
    recipe["augment"]["flip"] = "none"
    (unmirrored / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    refused = CliRunner().invoke(main, ["predict", str(unmirrored), str(models["images"]), "--tta"])
    assert refused.exit_code != 0 and "trained without mirrored images (augment.flip: none" in refused.output
    assert "Traceback" not in refused.output

    # Its exports carry the flip too (TFLite and ONNX in the file's metadata, every format in export.json):
    # a .tflite file moved away from its folder, or a SavedModel, is refused as well.
    tltool.export(unmirrored, "tflite")
    tltool.export(unmirrored, "savedmodel")
    moved = tmp_path / "elsewhere" / "model.tflite"
    moved.parent.mkdir()
    shutil.copyfile(unmirrored / "export" / "tflite" / "model.tflite", moved)
    for exported in (moved, unmirrored / "export" / "savedmodel", unmirrored / "export" / "savedmodel" / "1"):
        refused = CliRunner().invoke(main, ["predict", str(exported), str(models["images"]), "--tta"])
        assert refused.exit_code != 0 and "(augment.flip: none)" in refused.output, (exported, refused.output)
    # The mirrored run's exports are averaged.
    assert tltool.predict_files(models["savedmodel"], [models["images"]], tta=True)[0]["error"] is None


def test_evaluating_an_export_writes_next_to_it_by_default(models, tmp_path, monkeypatch):
    """Not into the current folder, where two exports evaluated on the same data would collide."""
    monkeypatch.chdir(tmp_path)
    tflite_file = models["tflite"]
    result = CliRunner().invoke(main, ["evaluate", str(tflite_file), "--data", str(models["images"])])
    assert result.exit_code == 0, result.output
    assert (tflite_file.parent / "eval-images" / "metrics.json").is_file()
    assert "small perturbations" not in result.output  # measured for Keras models only: not announced here
    version = models["savedmodel"] / "1"
    written = tltool.evaluate(version, models["images"], robustness=False)["out"]
    assert str(written) == str(models["savedmodel"] / "eval-images")
    assert not list(tmp_path.iterdir())


def test_a_folder_expands_as_training_reads_it(tmp_path):
    """Hidden files and folders are left out (as finetune and data check do); a dangling link is listed, so
    that it is reported unreadable rather than left out without a word."""
    from tltool.commands.predict import collect_files

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "h.png")
    Image.new("RGB", (8, 8)).save(tmp_path / ".dotfile.png")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert [p.name for p, error in collect_files([tmp_path])] == ["a.png", "gone.jpg"]
