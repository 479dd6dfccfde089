"""Decisions measured on the training images: kept when the data says so, reversed when it says otherwise."""

import re

import numpy as np
import pytest
import yaml
from PIL import Image

import tltool
from helpers import calibrated_backbone_weights, tiny_values
import tltool.engine.decisions as decisions
from tltool.engine.decisions import (L2_CANDIDATES, _in_row_space, clearly_better, cross_validated_accuracy,
                                     decide_flip, decide_l2, decide_views, decision_sample, descent_schedule, keras_l2,
                                     largest_curvature, softmax_regression, softmax_regressions,
                                     stratified_folds)


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


def test_a_difference_that_chance_explains_decides_nothing():
    """Two held-out images of 46 (4 points) are noise: the default (flip kept, views kept, the top layer)
    stands; the same share of a thousand images is not."""
    small_without, small_with = np.ones(46, bool), np.ones(46, bool)
    small_with[:2] = False                       # 0.957 against 1.0: the rule of a fixed 1% dropped the flip
    assert not clearly_better(small_with, small_without)
    large_without, large_with = np.ones(1000, bool), np.ones(1000, bool)
    large_with[:43] = False                      # the same share of a thousand images
    assert clearly_better(large_with, large_without)
    # Paired: when each option gets other images right, the net difference has to beat their count's noise.
    mixed_a, mixed_b = np.zeros(1000, bool), np.zeros(1000, bool)
    mixed_a[:100], mixed_b[100:215] = True, True  # b: 15 more of 215 that differ (2 sd: 29)
    assert not clearly_better(mixed_a, mixed_b)
    mixed_b[215:240] = True                       # 40 more of 240 (2 sd: 31)
    assert clearly_better(mixed_a, mixed_b)


def test_too_few_images_keep_the_flip_unmeasured():
    decision = decide_flip(np.ones((4, 3)), np.ones((4, 3)), np.array([0, 0, 1, 1]), seed=0)
    assert decision.keep and decision.accuracy_without is None
    assert stratified_folds(np.array([0, 0, 1, 1]), 3, 0) is None


def test_decisions_on_many_images_measure_a_sample_that_keeps_every_class(monkeypatch):
    rng = np.random.default_rng(6)
    plain, labels = _two_classes(rng, n=60)
    labels[:4] = 2  # a rare class: 4 of 120 images
    monkeypatch.setattr(decisions, "MAX_DECISION_IMAGES", 30)
    rows_fitted = []
    fit = decisions.softmax_regressions
    monkeypatch.setattr(decisions, "softmax_regressions",
                        lambda x, *a, **k: rows_fitted.append(len(x)) or fit(x, *a, **k))

    flip = decide_flip(plain, plain + rng.normal(0, 0.1, plain.shape), labels, seed=0)
    views = decide_views(plain, plain[:, None] + rng.normal(0, 0.1, (len(plain), 2, plain.shape[1])), labels, 0)
    l2 = decide_l2(plain, None, labels, seed=0)

    assert flip.accuracy_without is not None and views.accuracy_without is not None and l2.losses
    chosen = decision_sample(labels, 0, 30)
    assert np.bincount(labels[chosen]).tolist() == [14, 15, 3]  # the rare class keeps a fold's worth
    # the training folds: two thirds of the 32 sampled images, each with at most two copies
    assert 0 < max(rows_fitted) <= 32 * 3
    for decision in (flip.describe("horizontal"), views.describe(), l2.describe()):
        assert "on a sample of 32 of the 120 training images" in decision, decision
    assert decision_sample(labels, 0, 120) is None


def test_large_steps_on_spread_features_follow_the_300_small_steps_in_far_fewer():
    rng = np.random.default_rng(7)
    # Features as the decisions see them: centred on their mean, of unit length, spread over many directions.
    centers = rng.normal(size=(5, 128))
    labels = rng.integers(0, 5, 400)
    x = centers[labels] * 0.05 + rng.normal(size=(400, 128)) * 0.1
    x -= x.mean(axis=0)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    train, held = x[:300], x[300:]

    def small_steps(x, y, classes, steps=300, step=2.0):  # the fit as first measured
        w, b = np.zeros((x.shape[1], classes), np.float32), np.zeros(classes, np.float32)
        onehot = np.eye(classes, dtype=np.float32)[y]
        for _ in range(steps):
            logits = x @ w + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            grad = (p / p.sum(axis=1, keepdims=True) - onehot) / len(x)
            w -= step * (x.T @ grad + 1e-4 * w)
            b -= step * grad.sum(axis=0)
        return w, b

    def probabilities(w, b):
        logits = held @ w + b
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    steps, step = descent_schedule(train)
    assert steps <= 100 and steps * step == pytest.approx(600)
    assert largest_curvature(train) == pytest.approx(np.linalg.eigvalsh(train.T @ train / 300)[-1], rel=0.05)
    np.testing.assert_allclose(probabilities(*softmax_regression(train, labels[:300], 5)),
                               probabilities(*small_steps(train, labels[:300], 5)), atol=0.01)


def test_cross_validated_accuracy_scores_held_out_images_only():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 8)), rng.integers(0, 2, 60)  # labels carry nothing: chance on held-out folds
    assert cross_validated_accuracy(x, y, stratified_folds(y, 3, 0)) < 0.75


def test_wide_features_are_fitted_in_the_training_rows_span_with_the_same_predictions():
    rng = np.random.default_rng(4)
    train, held = rng.normal(size=(40, 300)), rng.normal(size=(25, 300))  # wider than it has rows
    labels = rng.integers(0, 3, 40)
    w, b = softmax_regression(train, labels, 3)
    small_train, small_held = _in_row_space(train, held, columns=3)
    small_w, small_b = softmax_regression(small_train, labels, 3)
    assert small_train.shape == (40, 40) and small_held.shape == (25, 40)
    np.testing.assert_allclose(small_held @ small_w + small_b, held @ w + b, atol=1e-4)


def test_the_rows_span_is_taken_only_where_its_qr_costs_less_than_the_steps_it_saves():
    """A QR of the rows costs about 1.5 gradient steps over them: fits of few steps (features spread over many
    directions take large ones) or of few columns stay in the features' own space."""
    rng = np.random.default_rng(5)
    wide = rng.normal(size=(40, 300))  # rows of length ~17: the largest steps allowed, 300 of them
    spread = wide / np.linalg.norm(wide, axis=1, keepdims=True) / 10  # short rows: 2 large steps
    held = rng.normal(size=(25, 300))
    assert descent_schedule(wide)[0] == 300 and descent_schedule(spread.astype(np.float32))[0] < 5
    assert _in_row_space(wide, held, columns=3)[0].shape == (40, 40)
    kept, kept_held = _in_row_space(spread, held, columns=3)
    assert kept is spread and kept_held is held
    assert _in_row_space(rng.normal(size=(40, 41)), held[:, :41], columns=3)[0].shape == (40, 41)  # 1 column saved


def test_a_penalty_is_chosen_where_the_classes_are_noise_and_none_where_they_are_clear():
    rng = np.random.default_rng(5)
    # Many dimensions of noise, few images, labels only weakly tied to one of the dimensions: an unpenalised
    # regression fits the noise and is confidently wrong on held-out images.
    noisy_labels = np.repeat([0, 1], 30)
    noisy = rng.normal(size=(60, 200)) + 0.3 * np.eye(200)[0] * (2 * noisy_labels[:, None] - 1)
    chosen = decide_l2(noisy, None, noisy_labels, seed=0)
    clear, clear_labels = _two_classes(rng)
    views = clear[:, None] + rng.normal(0, 0.1, (len(clear), 2, clear.shape[1]))
    none = decide_l2(clear, views, clear_labels, seed=0)

    assert chosen.l2 > 0 and chosen.l2 == keras_l2(L2_CANDIDATES[-1], 200)
    assert chosen.losses[chosen.l2] < chosen.losses[0] * 0.99
    assert none.l2 == 0 and min(none.losses, key=none.losses.get) == 0
    assert none.describe().startswith("head.l2: 0 (3-fold log loss on the training images ")
    too_few = decide_l2(np.ones((4, 3)), None, np.array([0, 0, 1, 1]), seed=0)
    assert too_few.describe().startswith("head.l2: 0 (auto:")


def test_the_penalty_in_keras_units_penalises_the_normalised_head_as_the_regression_does():
    from tltool.models.transfer import build_head, set_classifier_l2
    from tltool.recipe import HeadConfig

    # The head scales unit-length features to a length of sqrt(D), so the regression's weights w give the
    # same logits as head weights w / sqrt(D); the penalty must be the same for both.
    d, l2 = 64, 1e-3
    rng = np.random.default_rng(6)
    w, b = rng.normal(size=(d, 3)), rng.normal(size=3)
    features = rng.normal(size=(5, d))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    head = build_head(d, 3, HeadConfig())
    head.get_layer("predictions").set_weights([(w / np.sqrt(d)).astype(np.float32), b.astype(np.float32)])
    set_classifier_l2(head, keras_l2(l2, d))

    logits = features @ w + b
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(head(features.astype(np.float32))), expected, atol=1e-4)
    assert np.isclose(float(sum(head.losses)), l2 / 2 * np.sum(w ** 2), rtol=1e-4)
    set_classifier_l2(head, 0.0)
    assert not head.losses


def test_regressions_side_by_side_are_each_the_single_one():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 10))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 3, 50)
    for (w, b), l2 in zip(softmax_regressions(x, y, 3, (0.0, 1e-2, 1.0)), (0.0, 1e-2, 1.0)):
        single_w, single_b = softmax_regression(x, y, 3, l2=l2)
        np.testing.assert_allclose(w, single_w, atol=1e-6)
        np.testing.assert_allclose(b, single_b, atol=1e-6)


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


def test_finetune_measures_the_head_penalty_and_trains_with_the_one_it_is_given(tmp_path):
    data = _shapes(tmp_path / "coloured", False)
    # A weights file: a random backbone's penalty is not measured.
    weights = calibrated_backbone_weights(tmp_path / "vgg16.weights.h5", "vgg16")
    common = tiny_values(32) + ["backbone.name=vgg16", f"backbone.weights={weights}", "fine_tune.epochs=0",
                                "frozen.epochs=3"]
    measured = tltool.finetune(data=data, out=tmp_path / "measured", verbose=0,
                               overrides=common + ["head.l2=null"])
    saved = (measured.run_dir / "recipe.yaml").read_text()
    line = next(line for line in saved.splitlines() if line.startswith("# Measured: head.l2: "))
    assert "3-fold log loss on the training images" in line
    assert np.isclose(yaml.safe_load(saved)["head"]["l2"], float(line.split()[3]), rtol=0.01)

    random = tltool.finetune(data=data, out=tmp_path / "random", verbose=0, overrides=tiny_values(32) + [
        "backbone.name=vgg16", "fine_tune.epochs=0", "frozen.epochs=1", "head.l2=null"])
    saved = (random.run_dir / "recipe.yaml").read_text()
    assert "head.l2: 0 (auto: not measured on a random backbone" in saved

    # The penalty reaches training: a huge one keeps the classifier's weights small, its answers unsure (with
    # none, these easy classes end at a validation loss of about 0).
    runs = {l2: tltool.finetune(data=data, out=tmp_path / f"l2-{l2}", verbose=0,
                                overrides=common + [f"head.l2={l2}"]) for l2 in (0, 1000)}
    assert runs[1000].summary["val_loss"] > runs[0].summary["val_loss"] + 0.3
