"""`tltool evaluate`: metrics against hand-computed values, and evaluation of run directories.

The run directories here hold a hand-built Keras "colour classifier" (mean RGB -> softmax), whose
predictions on the solid-colour test images are known exactly, so every metric can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import tltool
from tltool.cli import main
from tltool.errors import DataError, RunDirError
from tltool.evaluation.metrics import calibration, compute_metrics, threshold_table, top_k_accuracy

LABELS = ["cat", "dog", "fox", "owl"]  # owl: never in the data, never predicted
Y_TRUE = [0, 0, 1, 1, 2, 2, 2]
PROBS = [
    [0.70, 0.20, 0.10, 0.0],  # cat, right, 0.70
    [0.30, 0.65, 0.05, 0.0],  # cat -> dog, 0.65 (cat second: top-2 hit)
    [0.10, 0.85, 0.05, 0.0],  # dog, right, 0.85
    [0.50, 0.45, 0.05, 0.0],  # dog -> cat, 0.50 (dog second: top-2 hit)
    [0.05, 0.05, 0.90, 0.0],  # fox, right, 0.90
    [0.20, 0.70, 0.10, 0.0],  # fox -> dog, 0.70 (fox third: top-2 miss)
    [0.10, 0.05, 0.85, 0.0],  # fox, right, 0.85
]


@pytest.fixture(scope="module")
def metrics():
    return compute_metrics(Y_TRUE, PROBS, LABELS, top_k=2)


def test_accuracy_and_top_k(metrics):
    assert metrics["num_images"] == 7
    assert metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["top_k"] == 2
    assert metrics["top_k_accuracy"] == pytest.approx(6 / 7)
    # k beyond the number of classes is clipped: every true class is then in the "top k".
    assert compute_metrics(Y_TRUE, PROBS, LABELS, top_k=10)["top_k"] == 4
    assert top_k_accuracy(Y_TRUE, PROBS, 10) == 1.0


def test_confusion_matrix_rows_are_true_classes(metrics):
    assert metrics["confusion_matrix"] == {
        "labels": LABELS,
        "matrix": [[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]],
    }


def test_per_class_and_averages(metrics):
    pc = metrics["per_class"]
    assert pc["cat"] == pytest.approx({"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert pc["dog"] == pytest.approx({"precision": 1 / 3, "recall": 1 / 2, "f1": 0.4, "support": 2})
    assert pc["fox"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert pc["owl"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Macro: over cat, dog and fox only (owl is neither in the data nor predicted).
    assert metrics["macro_avg"] == pytest.approx({"precision": 11 / 18, "recall": 5 / 9, "f1": 17 / 30,
                                                  "support": 7})
    assert metrics["weighted_avg"] == pytest.approx({"precision": 2 / 3, "recall": 4 / 7, "f1": 0.6, "support": 7})


def test_expected_calibration_error(metrics):
    # Bins of width 1/15: 0.50 -> bin 7 (wrong), 0.65 -> bin 9 (wrong), 0.70 x2 -> bin 10 (one right),
    # 0.85 x2 -> bin 12 (both right), 0.90 -> bin 13 (right).
    expected = (0.5 + 0.65 + 2 * abs(0.5 - 0.7) + 2 * (1 - 0.85) + (1 - 0.9)) / 7
    assert metrics["expected_calibration_error"] == pytest.approx(expected)
    bins = metrics["calibration_bins"]
    assert len(bins) == 15
    assert [b["count"] for b in bins] == [0] * 7 + [1, 0, 1, 2, 0, 2, 1, 0]
    assert bins[10]["accuracy"] == 0.5 and bins[10]["confidence"] == pytest.approx(0.7)
    assert sum(b["count"] for b in bins) == 7
    # A perfectly calibrated set has no error; confidence 0 lands in the first bin.
    assert calibration([1.0, 1.0, 0.0], [True, True, False])[0] == 0.0


def test_threshold_table_and_suggestion(metrics):
    table = metrics["thresholds"]
    rows = {r["threshold"]: r for r in table["rows"]}
    assert rows[0.0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": pytest.approx(4 / 7), "accepted": 7}
    assert rows[0.6]["accepted"] == 6 and rows[0.6]["accuracy"] == pytest.approx(4 / 6)
    assert rows[0.7]["accepted"] == 5 and rows[0.7]["accuracy"] == pytest.approx(0.8)
    assert rows[0.8] == {"threshold": 0.8, "coverage": pytest.approx(3 / 7), "accuracy": 1.0, "accepted": 3}
    assert rows[0.95] == {"threshold": 0.95, "coverage": 0.0, "accuracy": None, "accepted": 0}
    assert table["suggested"] == 0.8  # the lowest threshold reaching 95% accuracy
    assert "lowest threshold" in table["rule"]
    assert threshold_table([0.9, 0.9], [False, True])["suggested"] is None


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="Expected probs of shape"):
        compute_metrics([0, 1], [[0.5, 0.5]], ["a", "b"])
    with pytest.raises(ValueError, match="Expected labels in 0..1"):
        compute_metrics([0, 2], [[0.5, 0.5], [0.5, 0.5]], ["a", "b"])


# ------------------------------------------------------------------------------------------ run directories

ORDER = ["blue", "green", "red"]  # the image folder's classes, sorted


def colour_run(root: Path, swap_blue_green: bool = False, always: str | None = None) -> Path:
    """A run directory whose model classifies by mean colour (exact on the helper's solid-colour images)."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, 3), np.float32)  # rows: input R, G, B; columns: blue, green, red
    kernel[2, 0] = kernel[1, 1] = kernel[0, 2] = 10.0
    if swap_blue_green:
        kernel[:, [0, 1]] = kernel[:, [1, 0]]
    bias = np.zeros(3, np.float32)
    if always:
        kernel[:] = 0.0
        bias[ORDER.index(always)] = 10.0
    model.layers[-1].set_weights([kernel, bias])
    root.mkdir(parents=True)
    model.save(root / "model.keras")
    (root / "labels.txt").write_text("\n".join(ORDER) + "\n")
    return root


@pytest.fixture(scope="module")
def swapped_run(tmp_path_factory):
    return colour_run(tmp_path_factory.mktemp("swapped") / "run", swap_blue_green=True)


def test_evaluate_run_directory_exact(swapped_run, image_folder, tmp_path):
    out = tmp_path / "eval"
    result = tltool.evaluate(swapped_run, image_folder, out=out, top_k=2)
    assert result["out"] == str(out)
    assert result["num_images"] == 24
    # Blue and green images swap places; red ones are right.
    assert result["confusion_matrix"]["matrix"] == [[0, 8, 0], [8, 0, 0], [0, 0, 8]]
    assert result["accuracy"] == pytest.approx(1 / 3)
    assert result["top_k_accuracy"] == 1.0  # the true class is always second
    assert result["per_class"]["red"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 8}
    assert result["per_class"]["blue"]["recall"] == 0.0
    written = json.loads((out / "metrics.json").read_text())
    assert written["accuracy"] == result["accuracy"] and written["confusion_matrix"] == result["confusion_matrix"]
    for name in ("confusion_matrix", "per_class_recall", "reliability", "wrong_predictions"):
        with Image.open(out / "plots" / f"{name}.png") as img:
            assert img.format == "PNG" and min(img.size) > 200
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 + 4  # the pictures and the four probe thumbnails
    # A grey square is no colour: the model spreads its bets evenly, and the report says it is unsure.
    grey = next(p for p in result["probes"] if p["name"] == "blank grey")
    assert grey["confidence"] == pytest.approx(1 / 3, abs=1e-4) and not grey["overconfident"]
    assert "unsure about every probe" in page


def test_evaluate_matches_keras_on_the_same_pixels(tmp_path, image_folder):
    """The evaluation pipeline feeds the model what `load_image` gives, in the folder's order."""
    import keras

    from tltool.data.folders import scan_folder
    from tltool.data.images import load_image

    run = colour_run(tmp_path / "run")
    folder = scan_folder(image_folder, classes=ORDER)
    pixels = np.stack([load_image(p, 32) for p in folder.paths]).astype(np.float32)
    expected = keras.models.load_model(run / "model.keras").predict(pixels, verbose=0)
    result = tltool.evaluate(run, image_folder, out=tmp_path / "eval")
    assert result["accuracy"] == float(np.mean(expected.argmax(1) == np.array(folder.labels))) == 1.0
    assert result["mean_confidence"] == pytest.approx(float(expected.max(1).mean()), abs=1e-5)


def test_evaluate_default_out_is_inside_the_run(tmp_path, image_folder):
    run = colour_run(tmp_path / "run", always="red")
    result = CliRunner().invoke(main, ["evaluate", str(run), "--data", str(image_folder)])
    assert result.exit_code == 0, result.output
    out = run / f"eval-{Path(image_folder).name}"
    metrics = json.loads((out / "metrics.json").read_text())
    # A model that says "red" whatever it sees is caught by the probes, on the console and in the report.
    assert all(p["overconfident"] and p["predicted"] == "red" for p in metrics["probes"])
    assert "Warning: on a blank grey image the model says red (100%)" in result.output
    page = (out / "report.html").read_text()
    assert "Warning:</b> the model is at least 80% sure about 4 of 4 images" in page


def test_evaluate_errors(tmp_path, image_folder, swapped_run):
    with pytest.raises(RunDirError, match="Model not found: .*nope. Pass a run directory"):
        tltool.evaluate(tmp_path / "nope", image_folder)
    (tmp_path / "half").mkdir()
    with pytest.raises(RunDirError, match=r"No model in .*half: expected a run directory \(model.keras \+ labels.txt\)"):
        tltool.evaluate(tmp_path / "half", image_folder)
    odd = tmp_path / "odd"
    (odd / "purple").mkdir(parents=True)
    Image.new("RGB", (8, 8), (128, 0, 128)).save(odd / "purple" / "a.png")
    with pytest.raises(DataError, match="purple"):
        tltool.evaluate(swapped_run, odd, out=tmp_path / "x")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_evaluate(swapped_run, image_folder, tmp_path):
    out = tmp_path / "cli-eval"
    result = CliRunner().invoke(main, ["evaluate", str(swapped_run), "--data", str(image_folder), "--out", str(out),
                                       "--top-k", "1"])
    assert result.exit_code == 0, result.output
    assert "accuracy 0.3333, top-1 0.3333" in result.output
    assert str(out / "report.html") in result.output
    assert json.loads((out / "metrics.json").read_text())["top_k"] == 1


def test_cli_evaluate_errors(tmp_path, image_folder):
    runner = CliRunner()
    missing = runner.invoke(main, ["evaluate", str(tmp_path / "nope"), "--data", str(image_folder)])
    assert missing.exit_code == 2
    assert "Model not found" in missing.output and "Traceback" not in missing.output
    no_data = runner.invoke(main, ["evaluate", str(tmp_path)])
    assert no_data.exit_code == 2 and "Missing option '--data'" in no_data.output
    bad_k = runner.invoke(main, ["evaluate", str(tmp_path), "--data", str(image_folder), "--top-k", "0"])
    assert bad_k.exit_code == 2 and "--top-k" in bad_k.output


def test_evaluate_force_keeps_the_last_report_when_the_new_evaluation_cannot_run(swapped_run, image_folder, tmp_path):
    """--force replaces an evaluation only once the new one can run: a bad --ood-data, or a model without an
    OOD score to measure, is refused before the old report is touched."""
    out = tmp_path / "eval"
    tltool.evaluate(swapped_run, image_folder, out=out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(DataError, match="is not a folder"):
        tltool.evaluate(swapped_run, image_folder, out=out, force=True, ood_data=tmp_path / "missing")
    with pytest.raises(DataError, match="has no out-of-distribution score"):  # colour_run's model has none
        tltool.evaluate(swapped_run, image_folder, out=out, force=True, ood_data=image_folder)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_evaluate_force_replaces_the_last_report_only_when_the_new_one_is_complete(swapped_run, image_folder,
                                                                                   tmp_path, monkeypatch):
    """An evaluation that dies while writing (here: after its metrics.json, before the report) leaves the
    earlier one whole; the next one replaces it."""
    import tltool.commands.evaluate as evaluate_module

    out = tmp_path / "eval"
    tltool.evaluate(swapped_run, image_folder, out=out, robustness=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = evaluate_module.write_report

    def dies_midway(folder, *args, **kwargs):
        (Path(folder) / "metrics.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "write_report", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        tltool.evaluate(swapped_run, image_folder, out=out, force=True, robustness=False)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]  # no temporary folder left
    monkeypatch.setattr(evaluate_module, "write_report", real)
    tltool.evaluate(swapped_run, image_folder, out=out, force=True, robustness=False, top_k=1)
    assert json.loads((out / "metrics.json").read_text())["top_k"] == 1
