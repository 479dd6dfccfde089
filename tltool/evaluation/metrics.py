"""`evaluate`: a model's metrics on a labelled image folder, with plots and an HTML report.

The metric functions at the top are pure (numpy in, plain Python out) so they can be checked against
hand-computed values. `evaluate` reads the images, runs the model, and hands everything to report.py.

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

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltool import rundir
from tltool.errors import DataError

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


def log_loss(y_true, probs) -> float:
    """Mean cross-entropy of the true classes (the training loss without label smoothing)."""
    if len(y_true) == 0:
        return 0.0
    picked = np.asarray(probs, dtype=np.float64)[np.arange(len(y_true)), np.asarray(y_true)]
    return float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))


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


# ------------------------------------------------------------------------------------------ models


def _load_model(path):
    """A run directory or an exported model, behind the predictor interface (see `tltool.exporting.predictors`)."""
    from tltool.exporting.predictors import load_predictor

    return load_predictor(path)


def _is_predictor(model) -> bool:
    return all(hasattr(model, name) for name in ("labels", "image_size", "predict"))


# ------------------------------------------------------------------------------------------ data


@dataclass
class EvalSet:
    """One labelled image set run through a model: what the metrics and the report are made from."""

    name: str                # shown in the report: "validation", "test", or the folder's name
    key: str                 # prefix of its picture files ("val_", "test_", or "")
    paths: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    labels: list[str]
    metrics: dict = field(default_factory=dict)

    def most_confident_wrong(self, count: int = 16) -> list[int]:
        """Indices of misclassified images, most confident first."""
        pred = np.argmax(self.probs, axis=1)
        wrong = np.flatnonzero(pred != self.y_true)
        order = np.argsort(-self.probs[wrong].max(axis=1), kind="stable")
        return wrong[order][:count].tolist()


def predict_images(predictor, paths, skips, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities for the images that decode; returns (probs, indices of those images in `paths`).

    Images are decoded in parallel and in order, `batch_size` at a time, so memory stays flat however
    large the folder; files that fail to decode are recorded in `skips` and left out.
    """
    from tltool.data.folders import decoded_batches

    chunks, kept = [], []
    offset = 0
    for pixels, ok in decoded_batches(paths, predictor.image_size, batch_size, skips):
        if ok.any():
            chunks.append(predictor.predict(pixels[ok]))
            kept.append(offset + np.flatnonzero(ok))
        offset += len(ok)
    if not chunks:
        return np.zeros((0, len(predictor.labels))), np.zeros(0, np.int64)
    return np.concatenate(chunks), np.concatenate(kept)


def evaluate_folder(predictor, folder, skips, name: str, key: str = "", top_k: int = 5) -> EvalSet:
    """Run `predictor` over an `ImageFolder` and compute its metrics."""
    probs, kept = predict_images(predictor, folder.paths, skips)
    if len(kept) == 0:
        raise DataError(f"None of the {len(folder.paths)} images in {folder.root} could be decoded; see the "
                        f"skipped files for why.")
    paths = [folder.paths[i] for i in kept]
    y_true = np.asarray(folder.labels, dtype=np.int64)[kept]
    result = EvalSet(name, key, paths, y_true, probs, predictor.labels)
    result.metrics = compute_metrics(y_true, probs, predictor.labels, top_k=top_k)
    return result


# ------------------------------------------------------------------------------------------ probes

PROBE_WARN_CONFIDENCE = 0.8


@dataclass
class Probe:
    """An image with no class in it; a model that is sure about it will be sure about anything."""

    name: str
    pixels: np.ndarray
    probs: np.ndarray = None

    def as_dict(self, labels: list[str]) -> dict:
        order = np.argsort(-self.probs, kind="stable")[:3]
        confidence = float(self.probs[order[0]])
        if confidence >= PROBE_WARN_CONFIDENCE:
            verdict = "over-confident"
        elif confidence >= max(0.5, 2.0 / len(labels)):  # well above a uniform guess, but not sure
            verdict = "leaning"
        else:
            verdict = "unsure"
        return {"name": self.name, "predicted": labels[order[0]], "confidence": confidence,
                "top": [{"label": labels[i], "probability": float(self.probs[i])} for i in order],
                "verdict": verdict, "overconfident": verdict == "over-confident"}


def sanity_probes(predictor, seed: int = 0) -> list[Probe]:
    """The model's predictions on blank grey, black and white images and on uniform noise."""
    size = predictor.image_size
    probes = [Probe("blank grey", np.full((size, size, 3), 128, np.uint8)),
              Probe("blank black", np.zeros((size, size, 3), np.uint8)),
              Probe("blank white", np.full((size, size, 3), 255, np.uint8)),
              Probe("noise", np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))]
    probs = predictor.predict(np.stack([p.pixels for p in probes]))
    for probe, row in zip(probes, probs):
        probe.probs = np.asarray(row, dtype=np.float64)
    return probes


# ------------------------------------------------------------------------------------------ entry points


def evaluate(model, data, out=None, top_k: int = 5, force: bool = False, log=None) -> dict:
    """Evaluate a model on a labelled image folder; write metrics.json, pictures and report.html.

    Args:
        model: a run directory written by `tltool finetune`, a model written by `tltool export` (anything
            `load_predictor` loads), or a predictor object (with `labels`, `image_size` and
            `predict(uint8 images) -> probabilities`).
        data: image folder with one sub-folder per class; its classes must be among the model's.
        out: folder for the results; default `MODEL/eval-DATA` for a run directory, else `./eval-DATA`.
        top_k: k of the top-k accuracy (clipped to the number of classes). Default 5.
        force: replace `out` if it exists and is not empty (default: refuse).
        log: callable for progress messages, or None for silence.

    Returns:
        The content of metrics.json, plus `out`: the folder written.

    Raises:
        RunDirError: `model` is not a finished run directory.
        DataError: `data` is missing, has unknown classes or no readable images.
    """
    from tltool.data.folders import SkipLog, scan_folder
    from tltool.evaluation.report import write_report

    say = log or (lambda *a, **k: None)
    if top_k < 1:
        raise DataError(f"Expected `top_k` to be at least 1. Received: top_k={top_k}")
    t0 = time.perf_counter()
    run_dir = None
    if _is_predictor(model):
        predictor = model
    else:
        predictor = _load_model(model)
        if (Path(model) / rundir.MODEL_FILE).is_file():  # a run directory, not an exported model
            run_dir = Path(model)
    t_load = time.perf_counter() - t0
    skips = SkipLog()
    folder = scan_folder(data, skips, classes=predictor.labels, role="evaluation")
    data_name = Path(folder.root).resolve().name or "data"
    out = Path(out) if out is not None else (run_dir if run_dir is not None else Path.cwd()) / f"eval-{data_name}"
    out = rundir.prepare_output_dir(out, force=force)
    say(f"Evaluating on {len(folder)} images of {len(predictor.labels)} classes from {folder.root}.")
    t1 = time.perf_counter()
    result = evaluate_folder(predictor, folder, skips, name=data_name, top_k=top_k)
    probes = sanity_probes(predictor)
    t_predict = time.perf_counter() - t1
    metrics = {"model": str(model if run_dir is None else run_dir), "data": str(folder.root),
               **result.metrics,
               "probes": [p.as_dict(predictor.labels) for p in probes],
               "skipped_files": skips.as_list(),
               "timings": {"load_s": round(t_load, 3), "predict_s": round(t_predict, 3)}}
    result.metrics = metrics
    write_report(out, [result], probes, metrics, run_dir=run_dir, title=f"Evaluation on {data_name}")
    say(f"accuracy {metrics['accuracy']:.4f}, top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f}, "
        f"macro F1 {metrics['macro_avg']['f1']:.4f}. Report: {out / 'report.html'}")
    return {**metrics, "out": str(out)}


def evaluate_run_sets(model, labels: list[str], datasets: dict, skips, top_k: int = 5):
    """Predictions and metrics of a just-trained model on its validation (and test) images, and probes.

    Args:
        model: the trained Keras model (pixels in, probabilities out).
        labels: its classes, in output order.
        datasets: {"val": ImageFolder, "test": ImageFolder or None}.
        skips: the run's SkipLog.

    Returns:
        (list of EvalSet, list of Probe): what `write_run_report` turns into the report.
    """
    import gc

    from tltool.exporting.predictors import KerasPredictor

    # Training leaves much garbage behind (traced functions, graphs). Collected now it takes well under
    # 2 s; left to a collection that the plotting triggers, it took 5-10 s (measured on a 2-core CPU).
    gc.collect()
    predictor = KerasPredictor(model, labels)
    names = {"val": "validation", "test": "test"}
    sets = [evaluate_folder(predictor, folder, skips, name=names.get(key, key), key=f"{key}_", top_k=top_k)
            for key, folder in datasets.items() if folder is not None]
    return sets, sanity_probes(predictor)


def write_run_report(run_dir, sets, probes, labels: list[str]) -> dict:
    """The end-of-run report of `finetune`: metrics.json, pictures and report.html inside the run directory.

    Returns:
        metrics.json's content: {"val": {...}, "test": {...}, "probes": [...]} for the sets given.
    """
    from tltool.evaluation.report import write_report

    metrics = {s.key.rstrip("_"): s.metrics for s in sets}
    metrics["probes"] = [p.as_dict(labels) for p in probes]
    write_report(Path(run_dir), sets, probes, metrics, run_dir=Path(run_dir), title="Run report")
    return metrics
