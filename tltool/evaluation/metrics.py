"""The metrics of a labelled image set: accuracy, top-k, per class, confusion, calibration, thresholds.

Pure functions (numpy in, plain Python out), so they can be checked against hand-computed values;
sets.py runs models over image folders, and the `evaluate` command writes the report.

Conventions, chosen once here so that every number in metrics.json means one thing:

- A prediction is the class of highest probability (the first one on ties); its probability is the
  prediction's *confidence*.
- Precision of a class never predicted, and recall of a class absent from the data, are 0. Macro averages
  run over the classes that occur in the data or in the predictions (scikit-learn's default);
  weighted averages weigh each class by its support.
- Calibration uses 15 equal-width confidence bins, (0, 1/15], (1/15, 2/15], ...
- The suggested confidence threshold is the lowest one at which the accuracy on the accepted images
  (confidence >= threshold) reaches the target accuracy (default 0.95); None when none does.
"""

from __future__ import annotations


import numpy as np


ECE_BINS = 15
THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
TARGET_ACCURACY = 0.95


# ------------------------------------------------------------------------------------------ metrics


def _check(y_true, probs, labels) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != y_true.shape[0] or probs.shape[1] != len(labels):
        raise ValueError(f"Expected probs of shape ({len(y_true)}, {len(labels)}). Received: {probs.shape}")
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= len(labels)):
        raise ValueError(f"Expected labels in 0..{len(labels) - 1}. Received: {sorted(set(y_true.tolist()))}")
    return y_true, probs


def accuracy(y_true, probs) -> float:
    """Fraction of samples whose highest-probability class is the true one."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return 0.0
    return float(np.mean(np.argmax(probs, axis=1) == y_true))


def top_k_accuracy(y_true, probs, k: int) -> float:
    """Fraction of samples whose true class is among the `k` highest probabilities (ties: lower index first)."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    if len(y_true) == 0:
        return 0.0
    k = max(1, min(int(k), probs.shape[1]))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y_true[:, None], axis=1)))


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def per_class_metrics(matrix: np.ndarray, labels: list[str]) -> tuple[dict, dict, dict]:
    """Precision, recall, F1 and support per class, and their macro and weighted averages.

    Returns:
        (per_class, macro_avg, weighted_avg); per_class maps each label to its four numbers.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    per_class = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                        "support": int(support[i])} for i, name in enumerate(labels)}
    present = (support > 0) | (predicted > 0)
    total = support.sum()

    def macro(values):
        return float(values[present].mean()) if present.any() else 0.0

    def weighted(values):
        return float((values * support).sum() / total) if total else 0.0

    macro_avg = {"precision": macro(precision), "recall": macro(recall), "f1": macro(f1),
                 "support": int(total)}
    weighted_avg = {"precision": weighted(precision), "recall": weighted(recall), "f1": weighted(f1),
                    "support": int(total)}
    return per_class, macro_avg, weighted_avg


def calibration(confidence, correct, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error and the per-bin numbers behind it (for the reliability diagram).

    ECE = sum over bins of |accuracy - mean confidence| * (images in bin / all images), with `bins`
    equal-width bins (0, 1/bins], (1/bins, 2/bins], ... (a confidence of exactly 0 goes into the first).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = len(confidence)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    ece = 0.0
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": count, "accuracy": None, "confidence": None}
        if count:
            acc = float(correct[members].mean())
            conf = float(confidence[members].mean())
            row.update(accuracy=acc, confidence=conf)
            ece += abs(acc - conf) * count / n
        table.append(row)
    return float(ece), table


def threshold_table(confidence, correct, thresholds=THRESHOLDS, target_accuracy: float = TARGET_ACCURACY) -> dict:
    """Coverage and accuracy when only predictions with confidence >= threshold are accepted.

    Returns:
        {"rows": [{threshold, coverage, accuracy, accepted}], "target_accuracy", "suggested", "rule"}.
        `accuracy` is over the accepted images (None if none is accepted); `suggested` is the lowest
        threshold whose accuracy reaches `target_accuracy`, or None when no threshold does.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    n = len(confidence)
    rows = []
    suggested = None
    for t in thresholds:
        accepted = confidence >= t
        count = int(accepted.sum())
        acc = float(correct[accepted].mean()) if count else None
        rows.append({"threshold": float(t), "coverage": count / n if n else 0.0, "accuracy": acc,
                     "accepted": count})
        if suggested is None and acc is not None and acc >= target_accuracy:
            suggested = float(t)
    coverage = next((r["coverage"] for r in rows if r["threshold"] == suggested), None)
    return {"rows": rows, "target_accuracy": target_accuracy, "suggested": suggested, "suggested_coverage": coverage,
            "rule": f"lowest threshold whose accuracy on the accepted images is at least {target_accuracy:g}"}


#: The least probability a log loss takes the log of: one confidently wrong image costs at most
#: -log(1e-7), 16.1.
PROBABILITY_FLOOR = 1e-7


def log_loss(y_true, probs) -> float:
    """Mean cross-entropy of the true classes (the training loss without label smoothing)."""
    if len(y_true) == 0:
        return 0.0
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.mean(np.log(np.clip(picked, PROBABILITY_FLOOR, 1.0))))


def compute_metrics(y_true, probs, labels: list[str], top_k: int = 5,
                    target_accuracy: float = TARGET_ACCURACY) -> dict:
    """Every number of metrics.json for one labelled set: accuracy, top-k, per class, confusion, calibration."""
    y_true, probs = _check(y_true, probs, labels)
    n_classes = len(labels)
    y_pred = np.argmax(probs, axis=1) if len(y_true) else np.zeros(0, np.int64)
    confidence = probs.max(axis=1) if len(y_true) else np.zeros(0)
    correct = y_pred == y_true
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    per_class, macro_avg, weighted_avg = per_class_metrics(matrix, labels)
    k = max(1, min(int(top_k), n_classes))
    ece, bins = calibration(confidence, correct)
    return {
        "num_images": int(len(y_true)),
        "accuracy": accuracy(y_true, probs),
        "log_loss": log_loss(y_true, probs),
        "top_k": k,
        "top_k_accuracy": top_k_accuracy(y_true, probs, k),
        "per_class": per_class,
        "macro_avg": macro_avg,
        "weighted_avg": weighted_avg,
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
        "expected_calibration_error": ece,
        "calibration_bins": bins,
        "thresholds": threshold_table(confidence, correct, target_accuracy=target_accuracy),
        "mean_confidence": float(confidence.mean()) if len(confidence) else 0.0,
    }


# ---------------------------------------------------------------------------- calibration and OOD


def calibration_change(y_true, probs, temperature: float) -> dict:
    """ECE and negative log-likelihood of a calibrated model's `probs` and of the same model before its
    temperature was folded in (softmax(T * log p) undoes softmax(logits / T) exactly)."""
    from tltool.engine.trust import softmax_with_temperature

    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    before = softmax_with_temperature(probs, 1.0 / temperature)

    def ece(p):
        return calibration(p.max(axis=1), p.argmax(axis=1) == y_true)[0] if len(y_true) else 0.0

    return {"temperature": float(temperature), "ece_before": ece(before), "ece_after": ece(probs),
            "nll_before": log_loss(y_true, before), "nll_after": log_loss(y_true, probs)}


def auroc(inside, outside) -> float:
    """Area under the ROC curve of a score meant to be higher `outside` the training distribution than
    `inside` it: the chance that a random outside image scores above a random inside one (ties count half)."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    if not len(inside) or not len(outside):
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([inside, outside]), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # tied scores share their mean rank
    n_out = len(outside)
    return float((ranks[len(inside):].sum() - n_out * (n_out + 1) / 2) / (len(inside) * n_out))


def auroc_interval(area: float, n_inside: int, n_outside: int, z: float = 1.96) -> tuple[float, float]:
    """A 95% interval of an AUROC from the counts behind it (Hanley & McNeil, 1982)."""
    q1, q2 = area / (2 - area), 2 * area ** 2 / (1 + area)
    var = (area * (1 - area) + (n_outside - 1) * (q1 - area ** 2) + (n_inside - 1) * (q2 - area ** 2)) \
        / max(1, n_inside * n_outside)
    half = z * float(np.sqrt(max(var, 0.0)))
    return max(0.0, area - half), min(1.0, area + half)


def ood_metrics(inside, outside, limit: float = 1.0) -> dict:
    """How an OOD score (above `limit`: rejected) separates images from other domains (`outside`) from the
    in-domain ones (`inside`): the share of each rejected, the AUROC with its 95% interval, and whether the
    separation is measurable at all (the interval's lower end above chance, 0.5)."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    area = auroc(inside, outside)
    low, high = auroc_interval(area, len(inside), len(outside)) if np.isfinite(area) else (float("nan"),) * 2
    return {"images": int(len(outside)), "rejected": float((outside > limit).mean()) if len(outside) else 0.0,
            "inside_images": int(len(inside)),
            "inside_rejected": float((inside > limit).mean()) if len(inside) else 0.0,
            "auroc": area, "auroc_low": low, "auroc_high": high, "separated": bool(low > 0.5)}
