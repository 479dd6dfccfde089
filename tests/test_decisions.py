"""Decisions measured on the training images: kept when the data says so, reversed when it says otherwise."""

import re

import numpy as np
import yaml
from PIL import Image

import tltool
from helpers import tiny_values
from tltool.engine.decisions import (_in_row_space, cross_validated_accuracy, decide_flip, decide_views,
                                    softmax_regression, stratified_folds)


def _two_classes(rng, n: int = 30, d: int = 16):
    a, b = np.eye(d)[0] * 3, np.eye(d)[1] * 3
    x = np.concatenate([a + rng.normal(0, 0.5, (n, d)), b + rng.normal(0, 0.5, (n, d))])
    return x, np.repeat([0, 1], n)


def test_mirrored_copies_that_look_like_the_other_class_turn_the_flip_off():
    rng = np.random.default_rng(0)
    plain, labels = _two_classes(rng)
    mirrored = plain[:, [1, 0, *range(2, plain.shape[1])]]  # the mirror image of an A is a B, and back
    decision = decide_flip(plain, mirrored, labels, seed=0)
    assert not decision.keep and decision.accuracy_without > 0.95 and decision.accuracy_with < 0.8


def test_mirrored_copies_alike_keep_the_flip():
    rng = np.random.default_rng(1)
    plain, labels = _two_classes(rng)
    decision = decide_flip(plain, plain + rng.normal(0, 0.1, plain.shape), labels, seed=0)
    assert decision.keep and decision.accuracy_with >= decision.accuracy_without - 0.01


def test_views_that_blur_the_classes_are_dropped_and_faithful_ones_kept():
    rng = np.random.default_rng(3)
    plain, labels = _two_classes(rng)
    # Views that carry the other class's features half the time (as rotation does to classes that differ
    # by orientation), and views that are the image with a little noise.
    swapped = plain[:, [1, 0, *range(2, plain.shape[1])]]
    blurring = np.stack([np.where(rng.random((len(plain), 1)) < 0.5, swapped, plain) for _ in range(4)], axis=1)
    faithful = plain[:, None] + rng.normal(0, 0.1, (len(plain), 4, plain.shape[1]))

    dropped = decide_views(plain, blurring, labels, seed=0)
    kept = decide_views(plain, faithful, labels, seed=0)

    assert not dropped.keep and dropped.accuracy_with < dropped.accuracy_without - 0.1
    assert "frozen.feature_views: 0 (the 4 augmented views hurt)" in dropped.describe()
    assert kept.keep and kept.views == 4 and "frozen.feature_views: 4 (kept)" in kept.describe()


def test_too_few_images_keep_the_flip_unmeasured():
    decision = decide_flip(np.ones((4, 3)), np.ones((4, 3)), np.array([0, 0, 1, 1]), seed=0)
    assert decision.keep and decision.accuracy_without is None
    assert stratified_folds(np.array([0, 0, 1, 1]), 3, 0) is None


def test_cross_validated_accuracy_scores_held_out_images_only():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 8)), rng.integers(0, 2, 60)  # labels carry nothing: chance on held-out folds
    assert cross_validated_accuracy(x, y, stratified_folds(y, 3, 0)) < 0.75


def test_wide_features_are_fitted_in_the_training_rows_span_with_the_same_predictions():
    rng = np.random.default_rng(4)
    train, held = rng.normal(size=(40, 300)), rng.normal(size=(25, 300))  # wider than it has rows
    labels = rng.integers(0, 3, 40)
    w, b = softmax_regression(train, labels, 3)
    small_train, small_held = _in_row_space(train, held)
    small_w, small_b = softmax_regression(small_train, labels, 3)
    assert small_train.shape == (40, 40) and small_held.shape == (25, 40)
    np.testing.assert_allclose(small_held @ small_w + small_b, held @ w + b, atol=1e-4)


def _shapes(root, mirrored: bool, per_class: int = 12, size: int = 32):
    """Two classes that random backbone features tell apart easily: diagonal stripes running / and running \\
    (each other's mirror image, so a mirrored copy carries the other class's label), or two solid colours
    (a mirrored copy is the same image). A little noise and brightness jitter make the images differ."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    rising = (xx + yy) % 8 < 4
    falling = rising[:, ::-1]  # exactly the mirror image
    classes = {"rising": rising, "falling": falling} if mirrored else \
        {"reddish": np.ones((size, size), bool), "bluish": np.zeros((size, size), bool)}
    for name, on in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ground = (60, 60, 200) if not mirrored else (60, 60, 60)
            pixels = np.where(on[..., None], np.array((210, 80, 80), np.float32), np.array(ground, np.float32))
            pixels = pixels * rng.uniform(0.97, 1.03) + rng.normal(0, 2, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:02d}.png")
    return root


def test_finetune_measures_the_flip_and_records_it(tmp_path):
    for data, expected in ((_shapes(tmp_path / "mirrored", True), "none"),
                           (_shapes(tmp_path / "coloured", False), "horizontal")):
        # A random VGG16 (no BatchNorm to calibrate) keeps enough of the images in its features to tell
        # these classes apart.
        result = tltool.finetune(data=data, out=tmp_path / f"run-{data.name}", verbose=0, overrides=tiny_values(32) + [
            "backbone.name=vgg16", "augment.flip=auto", "frozen.feature_views=null", "fine_tune.epochs=0",
            "frozen.epochs=2"])
        saved = (result.run_dir / "recipe.yaml").read_text()
        # The views were measured too, and the number kept is what the recipe now says.
        views_line = next(line for line in saved.splitlines() if line.startswith("# Measured: frozen.feature_views"))
        assert yaml.safe_load(saved)["frozen"]["feature_views"] == int(views_line.split(": ")[2].split()[0])
        assert yaml.safe_load(saved)["augment"]["flip"] == expected, data.name
        line = next(line for line in saved.splitlines() if line.startswith("# Measured: augment.flip:"))
        without, with_flip = (float(w) for w in re.findall(r"(\d\.\d+) with", line.replace("without", "with")))
        assert without >= 0.75, line  # well above chance (0.5): the measurement means something
        assert (with_flip < without - 0.1) if expected == "none" else (with_flip >= without - 0.01), line


def test_a_kept_flip_reuses_the_measured_mirror_images_as_the_first_view(tmp_path):
    data = _shapes(tmp_path / "coloured", False)  # mirrored copies alike: the flip is kept
    result = tltool.finetune(data=data, out=tmp_path / "run", verbose=0, overrides=tiny_values(32) + [
        "backbone.name=vgg16", "augment.flip=auto", "frozen.feature_views=2", "fine_tune.epochs=0",
        "frozen.epochs=1"])
    assert yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["augment"]["flip"] == "horizontal"
    train, val = result.summary["images"]["train"], result.summary["images"]["val"]
    # The plain images, their mirror images (measured, then view 1), view 2, the validation images: the
    # mirror images are not extracted a second time.
    assert result.summary["timings"]["feature_images"] == 3 * train + val
