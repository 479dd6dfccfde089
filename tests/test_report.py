"""The run report: pictures, the self-contained report.html, and what `finetune` writes at the end of a run."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tltool
from helpers import (calibrated_backbone_weights, image_paths, make_image_folder, saved_model_accuracy,
                     saved_model_probabilities, tiny_values, validation_paths)
from tltool.evaluation import plots
from tltool.evaluation.metrics import compute_metrics
from tltool.evaluation.sets import EvalSet, Probe
from tltool.evaluation.report import render_html
from tltool.recipe import load_recipe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_png(data: bytes) -> Image.Image:
    assert data[:8] == PNG_SIGNATURE
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="module")
def run(tmp_path_factory, image_folder):
    """A tiny finetune run with validation and test data, logged for TensorBoard.

    The backbone's random weights are calibrated, so the model's answers depend on the image; the test
    folder is its own, with other counts than the validation split (4 blue, 2 green, 2 red) and one red
    image filed as blue, which the model gets wrong: its accuracy differs from the validation accuracy.
    """
    root = tmp_path_factory.mktemp("report")
    weights = calibrated_backbone_weights(root / "backbone.weights.h5", images=image_folder)
    test = make_image_folder(root / "test", per_class=3, seed=1)
    (test / "green" / "green_002.jpg").unlink()
    (test / "red" / "red_000.jpg").rename(test / "blue" / "filed_wrongly.jpg")
    return tltool.finetune(data=image_folder, test_data=test, out=root / "run", verbose=0, tensorboard=True,
                           overrides=tiny_values(32) + ["frozen.epochs=6", "frozen.learning_rate=0.01",
                                                        f"backbone.weights={weights}"])


def test_finetune_writes_report_for_val_and_test(run):
    run_dir = run.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"val", "test", "probes"}
    test_folder = Path(load_recipe(run_dir / "recipe.yaml").data.test)
    files = {"val": validation_paths(run_dir), "test": [str(p) for p in image_paths(test_folder)]}
    # The test block is about the test folder: its images, its classes' counts.
    assert len(files["val"]) == 6 and len(files["test"]) == 8
    assert summary["images"] == {"train": 18, "val": 6, "test": 8}
    for key, paths in files.items():
        m = metrics[key]
        counts = [sum(Path(p).parent.name == name for p in paths) for name in summary["classes"]]
        assert m["num_images"] == len(paths)
        assert [sum(row) for row in m["confusion_matrix"]["matrix"]] == counts
        assert [m["per_class"][name]["support"] for name in summary["classes"]] == counts
        # summary.json, metrics.json and model.keras run here on the same files all agree.
        accuracy, loss = saved_model_accuracy(run_dir, paths)
        assert summary[f"{key}_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert m["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        assert summary[f"{key}_loss"] == pytest.approx(loss, abs=1e-4)
        assert m["log_loss"] == pytest.approx(loss, abs=1e-4)
    # So that the checks above can tell the two sets apart, and a constant model from this one.
    assert summary["val_accuracy"] != summary["test_accuracy"]
    probs, _ = saved_model_probabilities(run_dir, files["test"])
    assert np.ptp(probs, axis=0).max() > 0.1
    expected = {"training_curves"} | {f"{k}_{name}" for k in ("val", "test")
                                      for name in ("confusion_matrix", "per_class_recall", "reliability")}
    written = {p.stem for p in (run_dir / "plots").glob("*.png")}
    assert expected <= written
    for path in (run_dir / "plots").glob("*.png"):
        assert min(decode_png(path.read_bytes()).size) > 200, path.name


def test_report_html_is_self_contained(run):
    page = (run.run_dir / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    pictures = len(list((run.run_dir / "plots").glob("*.png")))
    assert len(images) == pictures + 4  # every picture, plus the four probe thumbnails
    for data in images:
        decode_png(base64.b64decode(data))
    # Nothing to fetch: no scripts, no external stylesheets, fonts or images.
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert re.findall(r'src="(?!data:)', page) == []
    for text in ("Sanity probes", "blank grey", "noise", "Validation set", "Test set", "Training",
                 "Confidence thresholds", "Images per class", "Timings", "Recipe", "mobilenet_v2",
                 "stage1_s"):
        assert text in page, text
    # The probes come first, before any metric.
    assert page.index("Sanity probes") < page.index("Validation set")


def test_tensorboard_logs_both_stages(run):
    for stage in ("stage1", "stage2"):
        events = list((run.run_dir / "tb" / stage).rglob("events.out.tfevents.*"))
        assert events, stage


def test_evaluate_a_finetuned_run_includes_its_training(run, image_folder, tmp_path):
    result = tltool.evaluate(run.run_dir, image_folder, out=tmp_path / "eval")
    assert result["num_images"] == 24
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Training" in page and "Recipe" in page
    assert (tmp_path / "eval" / "plots" / "training_curves.png").is_file()


# ------------------------------------------------------------------------------------------ pictures


def test_confusion_matrix_stays_readable_with_many_classes():
    n = 25
    labels = [f"class number {i} with a long name" for i in range(n)]
    matrix = np.eye(n, dtype=int) * 9 + 1
    small = decode_png(plots.confusion_matrix(np.eye(3, dtype=int), ["a", "b", "c"]))
    large = decode_png(plots.confusion_matrix(matrix, labels))
    # The figure grows with the classes (about 38 px per class at 100 dpi), instead of squeezing them.
    assert large.size[1] >= 38 * n > small.size[1]


def test_training_curves_and_empty_inputs():
    rows = [{"stage": 1, "epoch": 1, "loss": 1.0, "accuracy": 0.4, "val_loss": 1.1, "val_accuracy": 0.3},
            {"stage": 1, "epoch": 2, "loss": 0.8, "accuracy": 0.6, "val_loss": None, "val_accuracy": None},
            {"stage": 2, "epoch": 1, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.7, "val_accuracy": 0.7}]
    assert decode_png(plots.training_curves(rows)).size[0] > 500
    assert plots.training_curves([]) is None
    assert plots.wrong_predictions([]) is None


def test_report_escapes_labels_and_flags_overconfident_probes():
    labels = ["<cat>", "dog & co"]
    y = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    s = EvalSet("validation", "val", ["a.png", "b.png", "c.png"], y, probs, labels,
                compute_metrics(y, probs, labels))
    probe = Probe("noise", np.zeros((4, 4, 3), np.uint8), np.array([0.97, 0.03]))
    page = render_html("Run report", [s], [probe], {"val_confusion_matrix": plots.confusion_matrix(
        s.metrics["confusion_matrix"]["matrix"], labels)})
    assert "&lt;cat&gt;" in page and "dog &amp; co" in page and "<cat>" not in page
    assert "over-confident" in page and "noise &rarr; &lt;cat&gt;, 97.0%" in page


@pytest.mark.parametrize("probs, shown", [
    ([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]], "none needed (100.0% on all)"),  # every answer right
    ([[0.99, 0.01], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]], "0.7 (keeps 50.0%)"),        # the unsure ones wrong
    ([[0.99, 0.01], [0.01, 0.99], [0.99, 0.01], [0.45, 0.55]], "none reaches 95.0%"),   # a sure one wrong
])
def test_the_suggested_threshold_card_says_when_none_is_needed(probs, shown):
    from tltool.evaluation.report import _cards_html

    y_true = np.array([0, 1, 1, 0])
    metrics = compute_metrics(y_true, np.array(probs), ["a", "b"])
    card = _cards_html(EvalSet("test", "test", ["x"] * 4, y_true, np.array(probs), ["a", "b"], metrics))
    assert f"suggested threshold<b>{shown}</b>" in card
