"""Decisions a careful practitioner makes by looking at the data, made by measuring it on cached features.

Each one is scored by k-fold cross-validation on the training images alone, so the validation figure stays
an honest estimate, and costs seconds: a softmax regression on cached features trains in milliseconds, and
beyond MAX_DECISION_IMAGES training images a decision is measured on a sample of them.

- Flip (`augment.flip: auto`): mirrored images are good augmentation for most photos and wrong for digits,
  text, many scans and any classes that are mirror images of each other. Train on the plain images with
  and without their mirrored copies, score both on the held-out folds' plain images, and keep the flip
  unless it costs accuracy.
- Augmented views (`frozen.feature_views: null`): rotated (and flipped) copies help most photo sets and
  hurt data whose classes differ by orientation or fine geometry. Once the views are cached, train on
  the plain images with and without them, score on the held-out folds' plain images, and drop the views
  (train on the plain images only) if they cost accuracy.
- Feature layer (`head.layer: auto`, `head.grid: null`): the backbone's top suits photos like those it was
  trained on; on far domains (digit scans, text, textures, sprites) an earlier block is often better, and a
  pooling grid that keeps the coarse layout (where a stroke is) better still. Each candidate's pooled features
  of the plain images are scored the same way; the top is kept unless the best of the others is more
  accurate by more than the tolerance and by more than chance explains in the best of that many.
- Head regularisation (`head.l2: null`): an L2 penalty on the classifier's weights makes a head trade
  confidence for stability. Score a softmax regression with each candidate strength by its held-out log
  loss and keep none unless a penalty is clearly better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

FOLDS = 3
#: The most training images a decision is measured on; beyond that, a sample that keeps every class in
#: its share (see `decision_sample`). A decision costs a softmax regression per fold and option, each step
#: reading images x features x classes: on 3000 images of 100 classes the flip, views and L2 decisions took
#: 66 s, and grow with the data, while ranking two options needs no more images than this.
MAX_DECISION_IMAGES = 2000
#: An augmentation (flip, views) is kept, and the top layer read, unless the other option is more accurate by
#: more than this share of the images, and by more than chance explains (see `clearly_better`).
TOLERANCE = 0.01
#: "More than chance explains": a paired difference over this many of its standard deviations when one
#: alternative is compared with the default (a one-sided chance of 2.3% when neither is better).
CHANCE_SDS = 2.0


@dataclass
class FlipDecision:
    keep: bool
    accuracy_without: float | None  # cross-validated accuracy, plain images only
    accuracy_with: float | None     # the same, with the mirrored copies added to the training folds
    measured_on: str = "the training images"

    def describe(self, mode: str) -> str:
        if self.accuracy_without is None:
            return f"augment.flip: {mode} (auto: too few images per class to measure; flip kept)"
        verdict = f"{mode} (kept)" if self.keep else "none (mirrored images hurt)"
        return (f"augment.flip: {verdict}: {FOLDS}-fold accuracy on {self.measured_on} "
                f"{self.accuracy_without:.3f} without, {self.accuracy_with:.3f} with mirrored copies")


@dataclass
class ViewsDecision:
    keep: bool
    accuracy_without: float | None  # cross-validated accuracy, plain images only
    accuracy_with: float | None     # the same, with the augmented views added to the training folds
    views: int
    measured_on: str = "the training images"

    def describe(self) -> str:
        if self.accuracy_without is None:
            return (f"frozen.feature_views: {self.views} (auto: too few images per class to measure whether "
                    f"they help; kept)")
        verdict = f"{self.views} (kept)" if self.keep else f"0 (the {self.views} augmented views hurt)"
        return (f"frozen.feature_views: {verdict}: {FOLDS}-fold accuracy on {self.measured_on} "
                f"{self.accuracy_without:.3f} without, {self.accuracy_with:.3f} with augmented views")


def decide_views(plain: np.ndarray, views: np.ndarray, labels: np.ndarray, seed: int) -> ViewsDecision:
    """Whether training on augmented views helps: features of the plain images [N, D] and of their views
    [N, V, D]."""
    (plain, views), labels, measured_on = _sampled(labels, seed, plain, views)
    folds = stratified_folds(labels, FOLDS, seed)
    if folds is None:
        return ViewsDecision(True, None, None, views.shape[1])
    without = cross_validated_hits(plain, labels, folds)
    with_views = cross_validated_hits(plain, labels, folds, extra=views)
    return ViewsDecision(not clearly_better(with_views, without), float(without.mean()), float(with_views.mean()),
                         views.shape[1], measured_on)


def decide_flip(plain: np.ndarray, mirrored: np.ndarray, labels: np.ndarray, seed: int) -> FlipDecision:
    """Whether training on mirrored copies helps: features of the plain and the mirrored training images."""
    (plain, mirrored), labels, measured_on = _sampled(labels, seed, plain, mirrored)
    folds = stratified_folds(labels, FOLDS, seed)
    if folds is None:
        return FlipDecision(True, None, None)
    without = cross_validated_hits(plain, labels, folds)
    with_flip = cross_validated_hits(plain, labels, folds, extra=mirrored)
    return FlipDecision(not clearly_better(with_flip, without), float(without.mean()), float(with_flip.mean()),
                        measured_on)


@dataclass
class LayerDecision:
    layer: str
    grid: int
    scores: dict  # (layer, grid) -> cross-validated accuracy; empty when not measured
    blocks: dict  # layer -> its block number (1 = the first), for the log
    why_not: str = ""  # why it was not measured
    # When the first candidate (the top, under `head.layer: auto`) is kept though another scored higher:
    # (images only the kept one got right, images only that other got right), for the log.
    kept_over: tuple[int, int] | None = None

    def describe(self) -> str:
        chosen = f"head.layer: {self.layer}, head.grid: {self.grid}"
        if not self.scores:
            return f"{chosen} (auto: {self.why_not})"
        ranked = sorted(self.scores.items(), key=lambda item: -item[1])
        shown = ranked[:4] + [item for item in ranked[4:] if item[0][0] == "top"]  # the top's score always
        shown = ", ".join(f"{self._name(layer)} grid {grid} {score:.3f}" for (layer, grid), score in shown)
        where = "the backbone's output" if self.layer == "top" else \
            f"the end of block {self.blocks[self.layer]} of {len(self.blocks)}"
        text = (f"{chosen} ({where}): {FOLDS}-fold accuracy on the training images, best first: {shown}"
                + (f" (of {len(ranked)})" if len(ranked) > 4 else ""))
        if self.kept_over is not None:
            (layer, grid), _ = ranked[0]
            only_kept, only_best = self.kept_over
            alternatives = len(ranked) - 1
            kept, other = f"{self._name(self.layer)} grid {self.grid}", f"{self._name(layer)} grid {grid}"
            text += (f"; {kept} is kept: {other} gets {only_best} images right that it gets wrong, and "
                     f"{only_kept} the other way, not clearly better"
                     + (f" for the best of {alternatives}" if alternatives > 1 else ""))
        return text

    def _name(self, layer: str) -> str:
        return "top" if layer == "top" else f"block {self.blocks[layer]}"


def decide_layer(features: np.ndarray, spans: list, candidates: list, labels: np.ndarray, seed: int,
                 blocks: dict) -> LayerDecision:
    """The (layer, grid) whose pooled features a softmax regression tells the classes apart best with:
    `features` [N, sum of widths] hold every candidate's side by side, at `spans`. The first candidate (the
    top, read globally) is kept unless the best of the others is clearly better, allowing for its being the
    best of several (see `clearly_better`)."""
    folds = stratified_folds(labels, FOLDS, seed)
    if folds is None:
        return LayerDecision(*candidates[0], {}, blocks,
                             f"too few images of a class to measure: {FOLDS} needed")
    hits = {pair: cross_validated_hits(features[:, start:end], labels, folds)
            for pair, (start, end) in zip(candidates, spans)}
    scores = {pair: float(found.mean()) for pair, found in hits.items()}
    first, best = candidates[0], max(candidates, key=lambda pair: scores[pair])
    if best == first or clearly_better(hits[first], hits[best], comparisons=len(candidates) - 1):
        return LayerDecision(*best, scores, blocks)
    return LayerDecision(*first, scores, blocks, kept_over=disagreements(hits[first], hits[best]))


#: The strengths of the head's L2 penalty the decision chooses among, in the units of `softmax_regression` (on
#: unit-length features); 0 is none.
L2_CANDIDATES = (0.0, 1e-4, 1e-3, 1e-2)
#: A penalty is taken only when it lowers the cross-validated log loss by more than this fraction of none's.
L2_MARGIN = 0.01


def keras_l2(l2: float, width: int) -> float:
    """The factor of `keras.regularizers.L2` on a normalised head's classifier (its input scaled to length
    sqrt(width), see build_head) that equals strength `l2` on unit-length features: the logits w.(sqrt(D) u)
    are (sqrt(D) w).u, whose penalty l2/2 |sqrt(D) w|^2 is (l2 D / 2) |w|^2."""
    return l2 * width / 2


@dataclass
class L2Decision:
    l2: float     # the factor of keras.regularizers.L2 on the head's classifier
    losses: dict  # each candidate's factor -> cross-validated log loss; empty when not measured
    why_not: str = ""
    measured_on: str = "the training images"

    def describe(self) -> str:
        if not self.losses:
            return f"head.l2: 0 (auto: {self.why_not})"
        shown = ", ".join(f"{loss:.3f} at {l2:.3g}" for l2, loss in self.losses.items())
        return f"head.l2: {self.l2:.3g} ({FOLDS}-fold log loss on {self.measured_on} {shown})"


def decide_l2(plain: np.ndarray, views: np.ndarray | None, labels: np.ndarray, seed: int) -> L2Decision:
    """How strongly to penalise the head's classifier weights: features of the plain training images [N, D]
    and of the augmented views the head also trains on [N, V, D] (or None).

    Scored by log loss, not accuracy: a penalty trades confidence for stability, which the held-out
    accuracy of a few hundred images hardly sees (measured: README) and the log loss does."""
    (plain, views), labels, measured_on = _sampled(labels, seed, plain, views)
    folds = stratified_folds(labels, FOLDS, seed)
    if folds is None:
        return L2Decision(0.0, {}, f"too few images of a class to measure: {FOLDS} needed")
    losses = cross_validated_log_losses(plain, labels, folds, L2_CANDIDATES, extra=views)
    best = int(np.argmin(losses))
    if losses[best] > losses[0] * (1 - L2_MARGIN):
        best = 0
    width = plain.shape[1]
    return L2Decision(keras_l2(L2_CANDIDATES[best], width),
                      {keras_l2(l2, width): loss for l2, loss in zip(L2_CANDIDATES, losses)},
                      measured_on=measured_on)


def decision_sample(labels: np.ndarray, seed: int, limit: int | None = None) -> np.ndarray | None:
    """Sorted indices of about `limit` (default MAX_DECISION_IMAGES) of the images, each class in its share
    and with at least FOLDS images where it has them (a rare class is still measured); None when there are
    no more than `limit`."""
    labels = np.asarray(labels)
    limit = MAX_DECISION_IMAGES if limit is None else limit
    if len(labels) <= limit:
        return None
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = max(min(len(members), FOLDS), round(len(members) * limit / len(labels)))
        chosen.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(chosen))


def _sampled(labels: np.ndarray, seed: int, *rows):
    """(`rows` and the labels of `decision_sample`'s images, and the words naming what was measured)."""
    chosen = decision_sample(labels, seed)
    if chosen is None:
        return rows, np.asarray(labels), "the training images"
    picked = [None if r is None else np.asarray(r)[chosen] for r in rows]
    words = f"a sample of {len(chosen)} of the {len(labels)} training images"
    return picked, np.asarray(labels)[chosen], words


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray | None:
    """A fold number per image, each class spread evenly over the folds; None when a class has fewer than k."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if len(counts) < 2 or counts[counts > 0].min() < k:
        return None
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        folds[rng.permutation(members)] = np.arange(len(members)) % k
    return folds


def cross_validated_hits(x: np.ndarray, y: np.ndarray, folds: np.ndarray,
                         extra: np.ndarray | None = None) -> np.ndarray:
    """[N] bool: whether each image is classified right by the softmax regression of the folds it was held out
    of; `extra` rows (one per image [N, D], or several [N, V, D], with the image's label) join the training
    folds only."""
    hits = np.zeros(len(y), bool)
    classes = int(np.max(y)) + 1
    for fold, (tx, ty, hx, hy) in zip(np.unique(folds), _fold_sets(x, y, folds, extra, classes)):
        w, b = softmax_regression(tx, ty, classes)
        hits[folds == fold] = np.argmax(hx @ w + b, axis=1) == hy
    return hits


def cross_validated_accuracy(x: np.ndarray, y: np.ndarray, folds: np.ndarray,
                             extra: np.ndarray | None = None) -> float:
    """Held-out accuracy of a softmax regression over the folds (see `cross_validated_hits`)."""
    return float(cross_validated_hits(x, y, folds, extra).mean())


def clearly_better(hits_a: np.ndarray, hits_b: np.ndarray, comparisons: int = 1) -> bool:
    """Whether option b classifies clearly more of the same held-out images right than option a.

    The images only b gets right must outnumber those only a gets right by more than TOLERANCE of the images
    and by more than CHANCE_SDS standard deviations of that difference when neither is better (McNemar's
    paired comparison: sqrt(only_a + only_b)). On 46 photos, 2 images (4 points) more for one option is
    chance; on a thousand digit scans, mirrored copies cost dozens of images.

    `comparisons`: how many alternatives b is the best of. The best of several beats a by chance more often
    than one does, so the bar is raised to keep the same chance of a wrong switch (Bonferroni): 2.8 standard
    deviations for the best of 9. (Measured on 300 flower photos: the best of 9 earlier candidates beat the
    top by 23 images to 10, 2.3 sd, and then scored below the top on held-out images: 0.833 against 0.860.)"""
    only_a, only_b = disagreements(hits_a, hits_b)
    chance = chance_sds(comparisons) * math.sqrt(only_a + only_b)
    return only_b - only_a > max(TOLERANCE * len(hits_a), chance)


def disagreements(hits_a: np.ndarray, hits_b: np.ndarray) -> tuple[int, int]:
    """(images only a gets right, images only b gets right), of the same held-out images."""
    return int(np.sum(hits_a & ~hits_b)), int(np.sum(hits_b & ~hits_a))


def chance_sds(comparisons: int) -> float:
    """The standard deviations a difference must exceed to be called clear when it is the largest of
    `comparisons` (CHANCE_SDS for one)."""
    alone = NormalDist().cdf(-CHANCE_SDS)
    return -NormalDist().inv_cdf(alone / max(comparisons, 1))


def cross_validated_log_losses(x: np.ndarray, y: np.ndarray, folds: np.ndarray, l2s,
                               extra=None) -> list[float]:
    """Mean held-out log loss of a softmax regression over the folds, for each L2 strength in `l2s` (the
    units of `softmax_regression`); `extra` as in cross_validated_accuracy."""
    losses, classes = np.zeros(len(l2s)), int(np.max(y)) + 1
    for tx, ty, hx, hy in _fold_sets(x, y, folds, extra, classes * len(l2s)):
        for i, (w, b) in enumerate(softmax_regressions(tx, ty, classes, l2s)):
            logits = hx @ w + b
            logits = logits - logits.max(axis=1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            losses[i] += -float(np.mean(log_p[np.arange(len(hy)), hy]))
    return list(losses / len(np.unique(folds)))


def _fold_sets(x: np.ndarray, y: np.ndarray, folds: np.ndarray, extra: np.ndarray | None, columns: int):
    """(training rows, their labels, held-out rows, their labels) of each fold, every row centred on the
    images' mean and of unit length (the head's own normalisation), in the training rows' span where that
    pays (`columns`: the outputs fitted side by side, see `_in_row_space`)."""
    center = np.asarray(x, np.float64).mean(axis=0)  # features of a ReLU network share a large common part
    x, y = _normalised(x, center), np.asarray(y)
    copies = 1
    if extra is not None:
        extra = np.asarray(extra)
        copies = extra.shape[1] if extra.ndim == 3 else 1
        extra = _normalised(extra.reshape(len(x), copies, -1).reshape(len(x) * copies, -1), center)
        extra = extra.reshape(len(x), copies, -1)
    for fold in np.unique(folds):
        train, held = folds != fold, folds == fold
        tx, ty, hx = x[train], y[train], x[held]
        if extra is not None:
            tx = np.concatenate([tx, extra[train].reshape(-1, tx.shape[1])])
            ty = np.concatenate([ty, np.repeat(y[train], copies)])
        tx, hx = _in_row_space(tx, hx, columns)
        yield tx, ty, hx, y[held]


#: A QR of training rows [n, d] costs about as much as this many gradient steps of one output column over
#: them (measured on two cores: 0.6 to 2.1 for n 163-815, d 1280-2880).
QR_COST_IN_STEPS = 1.5


def _in_row_space(train: np.ndarray, held: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sets in an orthonormal basis of the training rows' span, when the fits it speeds up save more
    than the basis costs.

    Gradient descent from zero with an L2 penalty never leaves that span, and the basis keeps lengths and
    dot products, so the regression's iterates (and the held-out predictions) are the same; each step then
    costs rows x rows instead of rows x features for each of the `columns` outputs fitted (classes, times
    the penalties fitted side by side). The basis takes a QR of the rows, so it pays only for many steps and
    columns on features much wider than the rows: on 245 photos (1280 features, 2 classes) the measured
    decisions took 1.6 s with it and 0.8 s without."""
    rows, width = train.shape
    if width <= rows:
        return train, held
    steps, _ = descent_schedule(np.asarray(train, np.float32))
    if steps * columns * (width - rows) <= QR_COST_IN_STEPS * width * rows:
        return train, held
    basis, triangle = np.linalg.qr(train.T)  # train.T = basis @ triangle, basis [D, rows] orthonormal
    return triangle.T, held @ basis


#: Gradient descent starts from zero and stops early: how far it goes (steps x learning rate) is its
#: regularisation, so each fit runs this far whatever its step size (first measured as 300 steps of 2.0).
DESCENT_DURATION = 600.0
#: The weights' step size is this over the largest curvature of the inputs (the top eigenvalue of x'x / n):
#: at 0.5 the fits followed the 300 small steps to 3 decimals on every score measured, in a fifth to two
#: thirds of the steps (unit-length features centred on their mean spread over many directions).
STEP_PER_CURVATURE = 0.5
#: The biases' step size (their input, a constant 1, has curvature 1: larger steps would oscillate).
BIAS_STEP = 2.0


def softmax_regression(x: np.ndarray, y: np.ndarray, classes: int,
                       l2: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent (inputs of unit length: stable steps).
    In float32: the scores rank candidates, and float64 doubles the time for the same ranking."""
    return softmax_regressions(x, y, classes, (l2,))[0]


def softmax_regressions(x: np.ndarray, y: np.ndarray, classes: int,
                        l2s) -> list[tuple[np.ndarray, np.ndarray]]:
    """`softmax_regression` for each L2 strength in `l2s`, side by side: every step reads `x` once for all of
    them (the cost of a step is reading `x`)."""
    x = np.asarray(x, np.float32)
    n, d = x.shape
    k = len(l2s)
    steps, step = descent_schedule(x)
    w, b = np.zeros((d, k * classes), np.float32), np.zeros((k, classes), np.float32)
    decay = np.repeat(np.asarray(l2s, np.float32), classes)  # each column's strength
    onehot = np.eye(classes, dtype=np.float32)[y][:, None, :]
    for _ in range(steps):
        logits = (x @ w).reshape(n, k, classes) + b
        logits -= logits.max(axis=2, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=2, keepdims=True)
        grad = (p - onehot) / n
        w -= step * (x.T @ grad.reshape(n, k * classes) + decay * w)
        b -= BIAS_STEP * grad.sum(axis=0)
    return [(w[:, i * classes:(i + 1) * classes], b[i]) for i in range(k)]


def descent_schedule(x: np.ndarray) -> tuple[int, float]:
    """(steps, the weights' step size) of a fit on `x`: DESCENT_DURATION in steps as large as its curvature
    allows, never smaller than the biases'."""
    step = max(BIAS_STEP, STEP_PER_CURVATURE / max(largest_curvature(x), 1e-6))
    steps = math.ceil(DESCENT_DURATION / step)
    return steps, DESCENT_DURATION / steps


def largest_curvature(x: np.ndarray, iterations: int = 20) -> float:
    """The top eigenvalue of x'x / n, by power iteration (an estimate from below). The start is a seeded mix
    of the rows, so the estimate is the same in any orthonormal basis of their span (see `_in_row_space`)."""
    v = x.T @ np.random.default_rng(0).standard_normal(len(x)).astype(x.dtype)
    value = 0.0
    for _ in range(iterations):
        norm = float(np.linalg.norm(v))
        if norm == 0.0:
            return 0.0
        v = x.T @ (x @ (v / norm)) / len(x)
        value = float(np.linalg.norm(v))
    return value


def _normalised(x: np.ndarray, center: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64) - center
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
