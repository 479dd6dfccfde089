"""`predict`: classify image files with any model tltool wrote; a file that cannot be read is reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tltool.data.folders import image_files
from tltool.data.images import ImageReadError, load_image
from tltool.exporting.predictors import Predictor, load_predictor, mirror_tta
from tltool.models.ood import UNKNOWN_LABEL

OUT_OF_DISTRIBUTION = "out_of_distribution"  # the model's OOD score is above 1 (see models/ood.py)
LOW_CONFIDENCE = "low_confidence"            # the top probability is below --threshold


def collect_files(paths_or_dirs) -> list[tuple[Path, str | None]]:
    """Expand folders (recursively, image files only, sorted; hidden files and folders left out, as training
    does; a dangling link is listed, and reported as unreadable) and keep files as given.

    Returns (path, error) pairs: error is None, or why the path cannot be used at all.
    """
    items: list[tuple[Path, str | None]] = []
    for raw in paths_or_dirs:
        path = Path(raw)
        if path.is_dir():
            found = image_files(path)
            items.extend((p, None) for p in found)
            if not found:
                items.append((path, "folder holds no image files"))
        elif path.is_file():
            items.append((path, None))
        else:
            items.append((path, "file not found"))
    return items


def predict_files(model, paths_or_dirs, top_k: int = 3, threshold: float | None = None,
                  batch_size: int = 32, tta: bool = False, reject: bool = True) -> list[dict]:
    """Classify image files; a file that cannot be read gets its reason and the others go on.

    Args:
        model: a `Predictor`, or a path for `load_predictor`.
        paths_or_dirs: image files and folders (searched recursively for image files).
        top_k: how many of the most likely classes to list per image (at most the number of classes).
        threshold: below this top probability the label is `unknown` (`top_k` still lists the classes).
        batch_size: images per forward pass.
        tta: average each image's probabilities with its mirror image's (see `MirrorAveraged`).
        reject: answer `unknown` for images the model's OOD score puts out of distribution (models
            exported before tltool had the score never reject).

    Returns:
        One dict per file, in input order: {path, label, predicted, score, reason, ood_score,
        top_k: [{label, score}], error}. `predicted` is the most likely class; `label` is it or `unknown`,
        with `reason` `out_of_distribution` or `low_confidence` (else None); `ood_score` is None for a
        model without the score. For a failed file label, predicted and score are None, top_k is empty
        and error says why.
    """
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    if tta:
        predictor = mirror_tta(predictor, model)
    k = max(1, min(int(top_k), len(predictor.labels)))
    results: list[dict] = []
    pending: list[tuple[dict, np.ndarray]] = []

    def flush():
        if not pending:
            return
        scores = predictor.scores(np.stack([pixels for _, pixels in pending]), batch_size=batch_size)
        unknown = scores.out_of_distribution()
        for i, (row, _) in enumerate(pending):
            p = scores.probabilities[i]
            order = np.argsort(-p, kind="stable")[:k]
            score = float(p[order[0]])
            row["predicted"] = predictor.labels[order[0]]
            if reject and unknown[i]:
                row["reason"] = OUT_OF_DISTRIBUTION
            elif threshold is not None and score < threshold:
                row["reason"] = LOW_CONFIDENCE
            row["label"] = UNKNOWN_LABEL if row["reason"] else row["predicted"]
            row["score"] = round(score, 6)
            row["ood_score"] = None if scores.ood_score is None else round(float(scores.ood_score[i]), 6)
            row["top_k"] = [{"label": predictor.labels[i], "score": round(float(p[i]), 6)} for i in order]
        pending.clear()

    for path, error in collect_files(paths_or_dirs):
        row = {"path": str(path), "label": None, "predicted": None, "score": None, "reason": None,
               "ood_score": None, "top_k": [], "error": error}
        results.append(row)
        if error is not None:
            continue
        try:
            pending.append((row, load_image(path, predictor.image_size)))
        except ImageReadError as exc:
            row["error"] = str(exc)
        if len(pending) >= batch_size:
            flush()
    flush()
    return results


def results_to_csv_rows(results: list[dict]) -> tuple[list[str], list[list]]:
    """The results flattened: path, label, score, error, predicted, reason, ood_score, then label_i / score_i
    for each of the top k."""
    k = max((len(r["top_k"]) for r in results), default=0)
    header = ["path", "label", "score", "error", "predicted", "reason", "ood_score"]
    for i in range(1, k + 1):
        header += [f"label_{i}", f"score_{i}"]
    rows = []
    for r in results:
        row = [r["path"], r["label"] or "", "" if r["score"] is None else r["score"], r["error"] or "",
               r["predicted"] or "", r["reason"] or "", "" if r["ood_score"] is None else r["ood_score"]]
        for i in range(k):
            entry = r["top_k"][i] if i < len(r["top_k"]) else {"label": "", "score": ""}
            row += [entry["label"], entry["score"]]
        rows.append(row)
    return header, rows
