"""Calibration and the out-of-distribution score: fitted after training, carried by the model and its exports."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_image_folder, tiny_trained_run, tiny_values
from PIL import Image

import tltool
from tltool import rundir
from tltool.cli import main
from tltool.engine.trust import (TEMPERATURE_PRIOR_SD, _summed_nll, fit_ood, fit_temperature, fit_temperatures,
                                 fold_temperature, nearer_blank, nearest_distance, negative_log_likelihood,
                                 softmax_with_temperature)
from tltool.errors import DataError
from tltool.evaluation.metrics import auroc, ood_metrics

LABELS = ["blue", "green", "red"]


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ temperature


def test_folding_the_temperature_divides_the_logits():
    from tltool.models.transfer import build_head
    from tltool.recipe import HeadConfig

    head = build_head(8, 3, HeadConfig(dropout=0.0), seed=0)
    features = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    kernel, bias = head.get_layer("predictions").get_weights()
    logits = features @ kernel + bias
    fold_temperature(head, 2.5)
    np.testing.assert_allclose(np.asarray(head(features)), softmax(logits / 2.5), rtol=1e-5, atol=1e-7)
    # The same from probabilities alone: what calibration and the report compute before and after.
    np.testing.assert_allclose(softmax_with_temperature(softmax(logits), 2.5), softmax(logits / 2.5), rtol=1e-6)


def test_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (5000, 5))
    truth = softmax(logits / 2.0)  # the model is over-confident by a factor 2
    labels = np.array([rng.choice(5, p=p) for p in truth])
    probs = softmax(logits)
    temperature = fit_temperature(probs, labels)
    assert temperature == pytest.approx(2.0, rel=0.08)
    assert negative_log_likelihood(softmax_with_temperature(probs, temperature), labels) \
        < negative_log_likelihood(probs, labels)


def test_the_fits_likelihood_is_the_nll_of_the_tempered_probabilities():
    # fit_temperature computes the likelihood its own, faster way (the logs taken once); it must stay the
    # negative log-likelihood of softmax_with_temperature, extreme probabilities (the 1e-12 floor) included.
    rng = np.random.default_rng(1)
    probs = softmax(rng.normal(0, 8, (300, 4)))
    probs[0] = [1.0, 0.0, 0.0, 0.0]
    labels = rng.integers(0, 4, 300)
    labels[0] = 3
    summed = _summed_nll(probs, labels)
    for temperature in (0.25, 0.7, 1.0, 3.0, 20.0):
        expected = negative_log_likelihood(softmax_with_temperature(probs, temperature), labels) * len(labels)
        assert summed(np.log(temperature)) == pytest.approx(expected, rel=1e-9)


def test_few_validation_images_hold_the_temperature_near_1():
    # Ten images the model gets all right, 90% sure: the likelihood alone sharpens as far as it may (4x),
    # which would make every later answer near certain. The prior keeps T within its reach of 1; on
    # thousands of images (the test above) it changes nothing that matters.
    probs = np.tile([[0.9, 0.1]], (10, 1))
    labels = np.zeros(10, np.int64)
    assert fit_temperature(probs, labels, prior_sd=None) == pytest.approx(0.25, rel=0.01)
    held = fit_temperature(probs, labels)
    assert 0.6 < held < 1.0
    assert fit_temperatures(probs, labels, [TEMPERATURE_PRIOR_SD, None]) == pytest.approx([held, 0.25], rel=1e-6)
    # More such images move it further: the prior weighs like a fixed number of images.
    assert fit_temperature(np.tile([[0.9, 0.1]], (200, 1)), np.zeros(200, np.int64)) < held


# ------------------------------------------------------------------------------------------ OOD score


def clusters(rng, n, centres, spread=0.3):
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + spread * rng.normal(size=(n, centres.shape[1])), labels


def test_threshold_keeps_the_validation_share_and_far_features_are_rejected():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64))
    train, train_y = clusters(rng, 300, centres)
    val, _ = clusters(rng, 200, centres)
    far = rng.normal(size=(200, 64))  # other directions altogether
    fit = fit_ood(train, train_y, val, keep_rate=0.95, bank_size=2048)
    assert not fit.centroids and fit.bank.shape == (300, 64)
    assert (nearest_distance(fit.bank, val) <= fit.threshold).mean() >= 0.95
    assert fit.val_kept >= 0.95
    assert (nearest_distance(fit.bank, far) > fit.threshold).mean() >= 0.95


def test_large_training_sets_are_summarised_by_centroids_per_class():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 32))
    train, train_y = clusters(rng, 900, centres)
    val, _ = clusters(rng, 200, centres)
    fit = fit_ood(train, train_y, val, keep_rate=0.95, bank_size=30)
    assert fit.centroids and len(fit.bank) <= 30
    np.testing.assert_allclose(np.linalg.norm(fit.bank, axis=1), 1.0, rtol=1e-5)
    assert (nearest_distance(fit.bank, rng.normal(size=(100, 32))) > fit.threshold).mean() >= 0.95


@pytest.mark.parametrize("with_blanks", [False, True])
def test_the_model_tflite_ops_and_numpy_compute_the_same_score(with_blanks):
    from tltool.models.ood import BLANK_CAP, BLANK_GATE, build_ood_scorer, tflite_friendly_score

    rng = np.random.default_rng(2)
    train, train_y, val, blank_features = relu_like_features(rng, 50, 40, 3)
    fit = fit_ood(train, train_y, val, keep_rate=0.9, bank_size=2048,
                  blank_features=blank_features if with_blanks else None)
    probe = np.concatenate([relu_like_features(rng, 10, 1)[0], rng.normal(size=(10, 64)),
                            blank_features + 0.01 * rng.normal(size=(3, 64))]).astype(np.float32)
    expected = nearest_distance(fit.bank, probe) / fit.threshold
    if with_blanks:
        assert len(fit.blanks) == 3 and (expected[-3:] < 1).all()  # the distance alone calls them typical
        unit = probe / np.linalg.norm(probe, axis=1, keepdims=True)
        margin = (unit @ fit.blanks.T).max(1) - (unit @ fit.bank.T).max(1)
        expected = np.maximum(expected, np.clip(1 + BLANK_GATE * margin, 0, BLANK_CAP))
        assert (expected[-3:] > 1).all()
    scorer = build_ood_scorer(fit.bank, fit.threshold, fit.blanks)
    np.testing.assert_allclose(np.asarray(scorer(probe)).ravel(), expected, rtol=1e-5, atol=1e-5)
    by_ops = tflite_friendly_score(probe, fit.bank.T, 1.0 / fit.threshold,
                                   None if fit.blanks is None else fit.blanks.T)
    np.testing.assert_allclose(np.asarray(by_ops).ravel(), expected, rtol=1e-5, atol=1e-5)


def relu_like_features(rng, n_train=120, n_val=100, n_blanks=4):
    """(train, train labels, val, blank features) shaped like a ReLU backbone's features: a component every
    image shares, a class part and the image's own; a flat field has the shared part alone, which a
    distance calls typical."""
    def directions(n):
        v = rng.normal(size=(n, 64))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    common = np.eye(64)[0]
    centres = directions(3) * np.sqrt(0.2)

    def images(n):
        labels = rng.integers(0, 3, n)
        return common + centres[labels] + directions(n) * np.sqrt(0.2), labels

    (train, train_y), (val, _) = images(n_train), images(n_val)
    return train, train_y, val, common + 0.05 * directions(n_blanks)


def test_flat_fields_are_unknown_unless_the_training_data_has_images_like_them():
    """A blank frame that a distance calls typical is still rejected; a flat field that two training images
    are nearer to than to any other training image (a class of empty pages) is not, and a lone stray
    placeholder does not count."""
    rng = np.random.default_rng(5)
    train, train_y, val, blank_features = relu_like_features(rng)
    fit = fit_ood(train, train_y, val, keep_rate=0.95, bank_size=2048, blank_features=blank_features)
    assert len(fit.blanks) == 4 and fit.val_kept >= 0.95 and fit.val_nearer_blank == 0
    assert (nearest_distance(fit.bank, blank_features) < fit.threshold).all()  # the distance misses them
    assert nearer_blank(fit.bank, fit.blanks, blank_features).all()            # the flat fields do not

    def near(row, n):
        return row + 0.01 * rng.normal(size=(n, 64)) / 8

    lone = fit_ood(np.concatenate([train, near(blank_features[0], 1)]), np.append(train_y, 0), val, 0.95, 2048,
                   blank_features=blank_features)                               # one stray placeholder
    assert len(lone.blanks) == 4
    known = fit_ood(np.concatenate([train, near(blank_features[0], 3)]), np.append(train_y, [0, 0, 0]), val,
                    0.95, 2048, blank_features=blank_features)                  # a few: blanks are known data
    assert len(known.blanks) == 3
    assert not nearer_blank(known.bank, known.blanks, blank_features[:1]).any()


def test_the_bank_is_saved_as_weights_only_and_survives_a_keras_round_trip(tmp_path):
    """The bank lives in the weights file, not also in config.json as an initializer's value (a 2048-row
    bank wrote, and every load parsed, tens of megabytes of JSON)."""
    import json
    import zipfile

    import keras

    from tltool.models.ood import build_ood_scorer

    rng = np.random.default_rng(3)
    sizes = {}
    for rows in (4, 400):
        bank = rng.normal(size=(rows, 64)).astype(np.float32)
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        path = tmp_path / f"scorer-{rows}.keras"
        build_ood_scorer(bank, 0.5).save(path)
        sizes[rows] = len(zipfile.ZipFile(path).read("config.json"))
        probe = rng.normal(size=(5, 64)).astype(np.float32)
        loaded = keras.saving.load_model(path)
        np.testing.assert_allclose(np.asarray(loaded(probe)).ravel(), nearest_distance(bank, probe) / 0.5,
                                   rtol=1e-5, atol=1e-6)
        assert json.loads(zipfile.ZipFile(path).read("config.json"))  # still a plain Keras model
    assert abs(sizes[400] - sizes[4]) < 100, sizes  # only the layer's width differs


def test_auroc_and_the_claim_of_a_separation():
    assert auroc([1, 2, 3], [4, 5, 6]) == 1.0 and auroc([4, 5, 6], [1, 2, 3]) == 0.0
    assert auroc([1, 2], [2, 3]) == 0.875  # ties count half
    rng = np.random.default_rng(0)
    same = ood_metrics(rng.normal(size=100), rng.normal(size=100))
    assert not same["separated"] and same["auroc_low"] < 0.5 < same["auroc_high"]
    apart = ood_metrics(rng.normal(size=100), rng.normal(size=100) + 3)
    assert apart["separated"] and apart["auroc"] > 0.95


# ------------------------------------------------------------------------------------------ a real run


def checkerboards(folder, count=12, size=40):
    """Black-and-white checkerboards: nothing like the smooth colour fields the tiny runs learn."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cell = 2 + i % 5
        grid = (np.indices((size, size)) // cell).sum(axis=0) % 2
        Image.fromarray((grid * 255).astype(np.uint8)).convert("RGB").save(folder / f"board_{i}.png")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # BatchNorm calibrated on noise, not on the training images: calibrated on near-alike images it divides
    # by their tiny spread, and the random features change completely with every pixel (no structure).
    # So the colour fields land close together in feature space and checkerboards far from them.
    return tiny_trained_run(tmp_path_factory.mktemp("trust-run"), calibrate_on_noise=True)


def test_run_is_calibrated_and_carries_the_ood_score(run):
    summary = json.loads((run / "summary.json").read_text())
    trust = summary["trust"]
    assert trust["temperature"] > 0 and trust["ood"]["method"] == "knn-cosine"
    assert trust["ood"]["val_kept"] >= 0.95 and trust["ood"]["bank_rows"] == summary["images"]["train"]
    metrics = json.loads((run / "metrics.json").read_text())
    calibration = metrics["val"]["calibration"]
    assert calibration["temperature"] == pytest.approx(trust["temperature"], rel=1e-5)
    assert trust["temperature"] >= 0.25  # all validation images right: sharpened at most 4x
    assert calibration["nll_after"] <= calibration["nll_before"] + 1e-9  # T minimises the validation NLL
    assert metrics["val"]["kept_in_distribution"] >= 0.95
    assert all(isinstance(p["rejected"], bool) and p["ood_score"] > 0 for p in metrics["probes"])
    assert "Calibration" in (run / "report.html").read_text()


def test_predict_answers_unknown_out_of_distribution_unless_told_not_to(run, tmp_path):
    boards = checkerboards(tmp_path / "boards", count=4)
    inside = sorted((run.parent / "images" / "red").iterdir())[:2]
    rows = tltool.predict_files(run, [boards, *inside])
    for row in rows[:4]:
        assert row["label"] == "unknown" and row["reason"] == "out_of_distribution"
        assert row["ood_score"] > 1 and row["predicted"] in LABELS
    for row in rows[4:]:
        assert row["label"] == row["predicted"] == "red" and row["reason"] is None and row["ood_score"] <= 1
    kept = tltool.predict_files(run, [boards], reject=False)
    assert all(r["label"] == r["predicted"] and r["reason"] is None for r in kept)
    cli = CliRunner().invoke(main, ["predict", str(run), str(boards)])
    assert cli.exit_code == 0 and cli.output.count("unknown (out of distribution, ood_score") == 4


def test_evaluate_ood_data_measures_rejection_and_accuracy_under_perturbations(run, tmp_path):
    images = run.parent / "images"
    boards = checkerboards(tmp_path / "boards")
    result = tltool.evaluate(run, images, out=tmp_path / "eval", ood_data=boards)
    ood = result["ood_data"]
    assert ood["images"] == 12 and ood["rejected"] >= 0.9 and ood["separated"] and ood["auroc"] > 0.9
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "Other domains: boards" in page and "The score separates these images" in page
    robustness = result["robustness"]
    assert robustness["images"] == 24 and set(robustness["fgsm"]) == {"1/255", "4/255"}
    assert robustness["clean"] == pytest.approx(result["accuracy"])
    # FGSM moves every pixel the way that raises the loss: it cannot help on average.
    assert robustness["fgsm"]["4/255"] <= robustness["clean"]
    assert "Small perturbations" in page


def test_evaluate_does_not_claim_a_separation_it_cannot_measure(run, tmp_path):
    # New images of the very same colour fields, as --data and as --ood-data: nothing tells them apart.
    fresh = make_image_folder(tmp_path / "fresh", per_class=6, seed=6)
    lookalikes = make_image_folder(tmp_path / "lookalikes", per_class=6, seed=5)
    logs = []
    result = tltool.evaluate(run, fresh, out=tmp_path / "eval", ood_data=lookalikes, robustness=False,
                             log=logs.append)
    assert not result["ood_data"]["separated"]
    assert "no measurable separation" in logs[-1]
    assert "No measurable separation" in (tmp_path / "eval" / "report.html").read_text()


def test_models_without_the_score_still_load_export_and_predict(run, tmp_path, image_folder):
    """What every model trained before the score existed saved: probabilities alone (as `trust.ood: false`
    saves, `test_trust_can_be_turned_off`)."""
    import keras

    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    full = keras.models.load_model(old / rundir.MODEL_FILE, compile=False)
    rundir.save_inference_model(keras.Model(full.input, full.output["probabilities"]), old / rundir.MODEL_FILE)
    run = old
    tltool.export(run, "tflite")
    for model in (run, run / "export" / "tflite" / "model.tflite"):
        predictor = tltool.load_predictor(model)
        assert not predictor.has_ood
        rows = tltool.predict_files(predictor, [image_folder / "red"])
        assert all(r["ood_score"] is None and r["reason"] is None and r["label"] in LABELS for r in rows)
    with pytest.raises(DataError, match="has no out-of-distribution score"):
        tltool.evaluate(run, image_folder, out=tmp_path / "eval", ood_data=image_folder, robustness=False)


def test_trust_can_be_turned_off(tmp_path, image_folder):
    run = tltool.finetune(data=image_folder, out=tmp_path / "run", verbose=0,
                          overrides=tiny_values(32) + ["fine_tune.epochs=0", "trust.ood=false", "trust.calibrate=false"])
    assert run.summary["trust"] == {"temperature": None, "ood": None, "seconds": 0.0}
    assert not tltool.load_predictor(run.run_dir).has_ood


def test_blank_images_go_through_the_model_in_calls_bounded_by_pixels():
    # Eager calls cost per call: small images go in one; large ones a few at a time (memory).
    from types import SimpleNamespace

    from tltool.engine.trust import _features_of_pixels

    sizes = []

    def extractor(pixels, training=False):
        sizes.append(len(pixels))
        return pixels.reshape(len(pixels), -1)[:, :2]

    tm = SimpleNamespace(feature_extractor=extractor)
    for side, calls in ((160, [19]), (600, [4, 4, 4, 4, 3])):
        sizes.clear()
        pixels = np.arange(19, dtype=np.uint8)[:, None, None, None] * np.ones((1, side, side, 3), np.uint8)
        features = _features_of_pixels(tm, pixels)
        assert sizes == calls
        np.testing.assert_array_equal(features[:, 0], np.arange(19))  # every image, in order
