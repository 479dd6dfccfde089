"""`tltool export`: every format exports, reloads through `load_predictor` and passes its own check."""

import importlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import (load_saved_model, saved_model_accuracy, saved_model_probabilities, tiny_trained_run,
                     validation_paths)

import tltool
from tltool.cli import main
from tltool.errors import ExportError, ExportOptionError, RunDirError
from tltool.data.images import load_image

export_module = importlib.import_module("tltool.exporting.checks")

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_trained_run(tmp_path_factory.mktemp("export-run"), calibrate_on_noise=True)


def val_pixels(run_dir, n=6):
    files = sorted(p for p in (run_dir.parent / "images").rglob("*") if p.suffix in (".png", ".jpg"))[::4][:n]
    return files, np.stack([load_image(p, 32) for p in files])


def keras_outputs(run_dir, pixels) -> dict:
    model = load_saved_model(run_dir / "model.keras")
    return {k: np.asarray(v) for k, v in model(pixels.astype(np.float32), training=False).items()}


def keras_probs(run_dir, pixels):
    return keras_outputs(run_dir, pixels)["probabilities"]


def check_report(result, out, fmt, quantize="none"):
    assert result["format"] == fmt and result["quantize"] == quantize
    assert result["n_images"] == 6  # the run's validation split: 2 of 8 images per class
    assert result["size_bytes"] > 0
    # Both accuracies are those of the run's validation images, computed again here: the Keras model's
    # from model.keras, the export's by loading it as a user would; labels from the class folders' names.
    run_dir = out.parent.parent
    files = validation_paths(run_dir)
    assert len(files) == result["n_images"]
    keras_accuracy, _ = saved_model_accuracy(run_dir, files)
    assert result["accuracy_keras"] == pytest.approx(keras_accuracy, abs=1e-6)
    _, labels = saved_model_probabilities(run_dir, files)
    pixels = np.stack([load_image(p, 32) for p in files])
    scores = tltool.load_predictor(out).scores(pixels)
    assert result["accuracy_export"] == pytest.approx(float(np.mean(scores.probabilities.argmax(1) == labels)),
                                                      abs=1e-6)
    # The OOD score travels in every export, and its check covers it: measured again here.
    ood_keras = keras_outputs(run_dir, pixels)["ood_score"].reshape(-1)
    assert scores.ood_score is not None and scores.ood_score.shape == ood_keras.shape
    assert result["max_abs_ood_diff"] == pytest.approx(float(np.abs(scores.ood_score - ood_keras).max()), abs=1e-5)
    assert result["unknown_agreement"] == pytest.approx(float(np.mean((scores.ood_score > 1) == (ood_keras > 1))))
    saved = json.loads((out / "export.json").read_text())
    for key in ("format", "quantize", "size_bytes", "max_abs_prob_diff", "top1_agreement", "accuracy_keras",
                "accuracy_export", "n_images", "max_abs_ood_diff", "unknown_agreement"):
        assert saved[key] == result[key]


def test_keras_export_reloads_identically(run_dir):
    result = CliRunner().invoke(main, ["export", str(run_dir), "--format", "keras"])
    assert result.exit_code == 0, result.output
    assert "Exported keras to" in result.output and "top-1 agreement 1.0000" in result.output
    out = run_dir / "export" / "keras"
    report = json.loads((out / "export.json").read_text())
    check_report(report, out, "keras")
    assert report["max_abs_prob_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    predictor = tltool.load_predictor(out)
    assert predictor.format == "keras" and predictor.labels == ["blue", "green", "red"]
    _, pixels = val_pixels(run_dir)
    # Same inference path on both sides, so any difference would come from the exported file itself.
    np.testing.assert_allclose(predictor.predict(pixels), tltool.load_predictor(run_dir).predict(pixels), atol=1e-6)


def test_export_refuses_to_overwrite_without_force(run_dir, tmp_path):
    out = tmp_path / "keras-out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(RunDirError, match="already exists and is not empty.*pass --force"):
        tltool.export(run_dir, "keras", out=out)
    assert (out / "keep.txt").exists()


def test_export_outside_tolerance_fails_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    strict = export_module.Tolerance(max_abs_prob_diff=-1.0)
    monkeypatch.setattr(export_module, "tolerance_for", lambda fmt, q: strict)
    out = tmp_path / "strict"
    with pytest.raises(ExportError, match="probabilities differ from the Keras model's by up to"):
        tltool.export(run_dir, "keras", out=out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]  # no temporary folder left


def test_an_export_removes_what_killed_exports_left_behind(run_dir, tmp_path):
    """kill -9 gives an export no chance to remove its temporary folder (marked as an export from the start);
    the next export to the same place removes the stale ones, and leaves a recent one (an export that may
    still be running) and an unmarked one (not provably tltool's) alone."""
    import os
    import time

    from tltool import outputs

    out = tmp_path / "keras-out"
    stale, recent, other, unmarked = (tmp_path / ".keras-out.k1ll3d.tmp", tmp_path / ".keras-out.running.tmp",
                                      tmp_path / ".other.k1ll3d.tmp", tmp_path / ".keras-out.mine.tmp")
    for folder in (stale, recent, other, unmarked):
        folder.mkdir()
        (folder / "model.keras").write_bytes(b"half written")
        if folder is not unmarked:
            (folder / outputs.MARKER).write_text(json.dumps({"kind": "export"}))
    old = time.time() - outputs.STALE_TEMPORARY_S - 60
    for folder in (stale, other, unmarked):
        os.utime(folder, (old, old))
    tltool.export(run_dir, "keras", out=out)
    assert not stale.exists() and recent.exists() and unmarked.exists()
    assert other.exists()  # another target's are not ours to judge


def test_savedmodel_signatures_labels_asset_and_serving_layout(run_dir):
    import tensorflow as tf

    result = tltool.export(run_dir, "savedmodel")
    out = run_dir / "export" / "savedmodel"
    check_report(result, out, "savedmodel")
    assert result["max_abs_prob_diff"] <= 1e-4
    version = out / "1"  # TF Serving's numbered version folder
    assert (version / "saved_model.pb").is_file()
    assert (version / "assets" / "labels.txt").read_text().split() == ["blue", "green", "red"]

    loaded = tf.saved_model.load(str(version))
    assert {"serving_default", "serving_pixels"} <= set(loaded.signatures)
    files, pixels = val_pixels(run_dir)
    expected = keras_probs(run_dir, pixels)
    by_pixels = loaded.signatures["serving_pixels"](pixels=tf.constant(pixels))
    np.testing.assert_allclose(by_pixels["probabilities"].numpy(), expected, atol=1e-4)
    ood = keras_outputs(run_dir, pixels)["ood_score"].reshape(-1)
    np.testing.assert_allclose(by_pixels["ood_score"].numpy(), ood, atol=1e-4)
    np.testing.assert_array_equal(by_pixels["is_unknown"].numpy(), ood > 1)
    # The default signature decodes the files' own bytes in the graph. Lossless PNGs at the model's size
    # (one with a transparent border, which must come out white as with Pillow) give the very same pixels.
    encoded = []
    for i, image in enumerate(pixels):
        rgba = np.concatenate([image, np.full((32, 32, 1), 255, np.uint8)], axis=-1)
        if i == 0:
            rgba[:4, :, 3] = 0
            pixels[0, :4] = 255
        encoded.append(tf.io.encode_png(rgba).numpy())
    expected = keras_probs(run_dir, pixels)
    by_bytes = loaded.signatures["serving_default"](images=tf.constant(encoded))
    np.testing.assert_allclose(by_bytes["probabilities"].numpy(), expected, atol=1e-4)
    labels = [s.decode() for s in by_bytes["label"].numpy()]
    assert labels == [["blue", "green", "red"][i] for i in expected.argmax(1)]
    assert by_bytes["top_k_labels"].shape == (len(files), 3)
    # A phone photo stored sideways: turned upright in the graph by its EXIF orientation, as Pillow does.
    from PIL import Image

    sideways = np.ascontiguousarray(np.rot90(pixels[1], 1))  # what a camera stores for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = run_dir.parent / "sideways.jpg"
    Image.fromarray(sideways).save(photo, exif=exif, quality=98)
    upright = load_image(photo, 32)
    assert np.abs(upright.astype(int) - pixels[1].astype(int)).mean() < 4  # Pillow's view: upright again
    by_photo = loaded.signatures["serving_default"](images=tf.constant([photo.read_bytes()]))
    np.testing.assert_allclose(by_photo["probabilities"].numpy(), keras_probs(run_dir, upright[None]), atol=0.02)
    # The run's JPEG and PNG files themselves (40 px, resized in the graph) were checked by the export.
    assert result["encoded_images_signature"]["n_images"] == 6
    assert result["encoded_images_signature"]["undecodable"] == 0
    assert tltool.load_predictor(out).format == "savedmodel"


def test_tflite_float32_embeds_labels_and_matches(run_dir):
    from tltool.exporting.metadata import read_tflite_metadata as tflite_metadata

    result = tltool.export(run_dir, "tflite")
    out = run_dir / "export" / "tflite"
    check_report(result, out, "tflite")
    assert result["max_abs_prob_diff"] <= 1e-3 and result["top1_agreement"] == 1.0
    meta = tflite_metadata(out / "model.tflite")
    assert meta["labels"] == ["blue", "green", "red"] and meta["image_size"] == 32
    (out / "labels.txt").unlink()  # the labels inside the file are enough
    predictor = tltool.load_predictor(out / "model.tflite")
    assert predictor.labels == ["blue", "green", "red"]
    _, pixels = val_pixels(run_dir)
    np.testing.assert_allclose(predictor.predict(pixels), keras_probs(run_dir, pixels), atol=1e-3)


@pytest.mark.slow
def test_tflite_int8_is_full_integer_small_and_accurate(run_dir):
    cli = CliRunner().invoke(main, ["export", str(run_dir), "--format", "tflite", "--quantize", "int8"])
    assert cli.exit_code == 0, cli.output
    assert "x float32, mixed weight scales)." in cli.output
    out = run_dir / "export" / "tflite-int8"
    result = json.loads((out / "export.json").read_text())
    check_report(result, out, "tflite", "int8")
    assert result["size_ratio"] <= 0.3 and result["size_bytes"] < result["float32_size_bytes"]
    assert result["accuracy_keras"] - result["accuracy_export"] <= 0.015
    # MobileNetV2 has depthwise convolutions: the smaller mixed weight scheme was accurate enough.
    assert result["int8_weights"] == "mixed" and list(result["int8_accuracy_by_weights"]) == ["mixed"]
    predictor = tltool.load_predictor(out)
    details = predictor.interpreter.get_input_details()[0]
    assert details["dtype"] == np.uint8 and predictor.interpreter.get_output_details()[0]["dtype"] == np.uint8
    _, pixels = val_pixels(run_dir)
    probs = predictor.predict(pixels)
    assert (probs.argmax(1) == keras_probs(run_dir, pixels).argmax(1)).mean() >= 0.8


def test_int8_falls_back_to_the_next_weight_scheme_when_one_is_not_accurate(tmp_path):
    from tltool.exporting.tflite import Converted

    candidates = [Converted(b"mixed bytes", "mixed"), Converted(b"per-channel bytes", "per-channel")]
    accuracy = {b"mixed bytes": 0.80, b"per-channel bytes": 0.95}
    artifact = tmp_path / "model.tflite"

    def check():  # what the export's check would find in the file written last
        return {"accuracy_keras": 0.96, "accuracy_export": accuracy[artifact.read_bytes()]}

    tol = export_module.tolerance_for("tflite", "int8")
    report, tried = export_module.first_accurate(candidates, artifact, check, tol)
    assert [scheme for scheme, _ in tried] == ["mixed", "per-channel"]
    assert artifact.read_bytes() == b"per-channel bytes" and report["accuracy_export"] == 0.95
    accuracy[b"mixed bytes"] = 0.955  # within 1.5 points: the smaller scheme is kept
    report, tried = export_module.first_accurate(candidates, artifact, check, tol)
    assert [scheme for scheme, _ in tried] == ["mixed"] and artifact.read_bytes() == b"mixed bytes"

    def check_97():  # 97.0% -> 95.5% is 1.5 points exactly (1.5000000000000013 in floating point)
        return {"accuracy_keras": 0.97, "accuracy_export": accuracy[artifact.read_bytes()]}

    report, tried = export_module.first_accurate(candidates, artifact, check_97, tol)
    assert [scheme for scheme, _ in tried] == ["mixed"]
    export_module.check_tolerance({"format": "tflite", "quantize": "int8", "n_images": 200, "max_abs_prob_diff": 0.1,
                                   **report}, tol)  # within tolerance: no error
    # Neither within the bound: the more accurate one is left in the file, and its figures are reported.
    accuracy.update({b"mixed bytes": 0.90, b"per-channel bytes": 0.85})
    report, tried = export_module.first_accurate(candidates, artifact, check, tol)
    assert len(tried) == 2 and artifact.read_bytes() == b"mixed bytes" and report["accuracy_export"] == 0.90


def test_int8_failure_names_the_weight_schemes_tried():
    result = {"format": "tflite", "quantize": "int8", "n_images": 200, "accuracy_keras": 0.98,
              "accuracy_export": 0.975, "max_abs_prob_diff": 0.2, "size_ratio": 0.308,
              "int8_accuracy_by_weights": {"mixed": 0.5, "per-channel": 0.975}}
    message = (r"export failed its check on 200 validation images: it is 0.308x the float32 size \(allowed 0.3x\)"
               r"\. Nothing was written\. Int8 weight schemes tried \(validation accuracy\): mixed 50.0%, "
               r"per-channel 97.5%\. Try --quantize dynamic or float16")
    with pytest.raises(ExportError, match=message):
        export_module.check_tolerance(result, export_module.tolerance_for("tflite", "int8"))


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["float16", "dynamic"])
def test_tflite_float16_and_dynamic(run_dir, quantize):
    result = tltool.export(run_dir, "tflite", quantize=quantize)
    check_report(result, run_dir / "export" / f"tflite-{quantize}", "tflite", quantize)
    assert result["top1_agreement"] >= 0.8
    if quantize == "float16":
        assert result["max_abs_prob_diff"] <= 2e-2


def test_onnx_export_checked_with_onnxruntime(run_dir):
    result = tltool.export(run_dir, "onnx")
    out = run_dir / "export" / "onnx"
    check_report(result, out, "onnx")
    assert result["max_abs_prob_diff"] <= 1e-3
    predictor = tltool.load_predictor(out / "model.onnx")
    assert predictor.format == "onnx" and predictor.labels == ["blue", "green", "red"]
    assert predictor.image_size == 32


@pytest.mark.parametrize("fmt, quantize, message", [
    ("keras", "int8", "Quantization applies to --format tflite only"),
    ("coreml", "none", "Expected `format` to be one of savedmodel, keras, tflite, onnx. Received: format=coreml"),
    ("tflite", "int4", "Expected `quantize` to be one of none, dynamic, float16, int8. Received: quantize=int4"),
])
def test_bad_options_are_rejected_before_any_work(tmp_path, fmt, quantize, message):
    with pytest.raises(ExportOptionError, match=message):
        tltool.export(tmp_path / "no-such-run", fmt, quantize=quantize)


def test_cli_export_errors(run_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(run_dir), "--format", "keras", "--quantize", "int8"])
    assert result.exit_code == 2
    assert "Quantization applies to --format tflite only" in result.output
    assert "Traceback" not in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["export", str(empty), "--format", "tflite"])
    assert result.exit_code == 2 and "is not a tltool run directory (it has no recipe.yaml)" in result.output
    assert "--resume" not in result.output  # nothing there to resume
    (empty / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())  # a run that never finished
    result = runner.invoke(main, ["export", str(empty), "--format", "tflite"])
    assert result.exit_code == 2 and "has no model.keras: it is not a finished tltool run" in result.output
    assert "tltool finetune --resume" in result.output
    exported = tmp_path / "exported"  # an export folder (a .keras export also holds model.keras and labels)
    exported.mkdir()
    (exported / "export.json").write_text("{}")
    result = runner.invoke(main, ["export", str(exported), "--format", "tflite"])
    assert result.exit_code == 2 and "is an export, not a run directory" in result.output


def test_a_refused_export_prints_only_its_error(tmp_path):
    import yaml

    # Refused before the model is read: a run directory's files need not hold a real model.
    run = tmp_path / "run"
    run.mkdir()
    recipe = tltool.load_recipe(None).to_dict()
    recipe["export"]["formats"] = ["keras", "tflite"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "model.keras").write_bytes(b"")
    (run / "labels.txt").write_text("a\nb\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not tltool's")
    (run / "export" / "tflite").mkdir(parents=True)  # the recipe's second format: refused before the first is made
    (run / "export" / "tflite" / "notes.txt").write_text("not tltool's")
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "export.json").write_text("{}")
    for args, message in [([str(run), "--format", "keras", "--out", str(mine)], f"Output folder {mine} already"),
                          ([str(run)], f"Output folder {run / 'export' / 'tflite'} already"),
                          ([str(exported), "--format", "keras"], "is an export, not a run directory")]:
        result = CliRunner().invoke(main, ["export", *args])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error: ") and message in result.output
        assert len(result.output.splitlines()) == 1, result.output  # no "Exporting ..." line before it
    assert not (run / "export" / "keras").exists()


def test_export_without_format_uses_the_recipe_defaults(run_dir, tmp_path):
    import shutil

    import yaml

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export"))
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["export"] = {"formats": ["keras"], "quantize": "int8"}  # quantize applies to tflite only
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["export", str(copy)])
    assert result.exit_code == 0, result.output
    assert "Exported keras to" in result.output and (copy / "export" / "keras" / "model.keras").is_file()
    refused = CliRunner().invoke(main, ["export", str(copy), "--out", str(copy)])
    assert refused.exit_code == 2 and "which this command reads" in refused.output


def test_quantized_exports_may_judge_only_borderline_images_differently():
    """The OOD threshold is fitted on validation images, so some sit right at it: a quantized export may
    move those across (within rounding), never an image clearly on one side."""
    from tltool.exporting.checks import compare
    from tltool.models.ood import Scores

    probs = np.tile([[0.9, 0.1]], (4, 1))
    labels = np.zeros(4, int)
    keras_scores = Scores(probs, np.array([0.2, 0.99, 1.5, 0.5]))
    borderline_flip = Scores(probs, np.array([0.2, 1.01, 1.5, 0.5]))
    clear_flip = Scores(probs, np.array([1.2, 0.99, 1.5, 0.5]))
    tol = export_module.tolerance_for("tflite", "dynamic")
    meta = {"format": "tflite", "quantize": "dynamic", "n_images": 4}
    report = {**meta, **compare(keras_scores, borderline_flip, labels)}
    assert report["unknown_agreement"] == 0.75 and report["unknown_agreement_clear"] == 1.0
    export_module.check_tolerance(report, tol)  # passes
    report = {**meta, **compare(keras_scores, clear_flip, labels)}
    assert report["unknown_agreement_clear"] == pytest.approx(2 / 3)
    with pytest.raises(ExportError, match="clearly in or out of distribution"):
        export_module.check_tolerance(report, tol)
    # An int8 export that keeps the accuracy but not the OOD decision says why, and what keeps it.
    int8 = {**report, "quantize": "int8", "size_ratio": 0.28}
    with pytest.raises(ExportError, match="too coarse for this model's out-of-distribution threshold .*: --quantize dynamic"):
        export_module.check_tolerance(int8, export_module.tolerance_for("tflite", "int8"))
