"""The TFLite export's second reader: MediaPipe Tasks' ImageClassifier, the runtime of Android, iOS and Web apps.

`export` loads every TFLite file it writes in MediaPipe as an app would (the file alone: labels and input
normalisation from its metadata) and holds it to naming the same classes as LiteRT does, image by image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tltool.models.ood import Scores
from tltool.native_logs import filtered_native_stderr

#: Images classified through MediaPipe, one call each (a few ms per image on a CPU).
MAX_IMAGES = 200


def classify(path: Path, pixels: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """MediaPipe's answers for uint8 images at the model's size (so MediaPipe resizes nothing).

    Returns (category names of output 0 by index, scores N x classes, OOD scores N or None).
    """
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions

    options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1)
    names: dict[int, str] = {}
    scores, ood = [], []
    # MediaPipe's graph start-up writes INFO/WARNING lines of its own (kept with --verbose).
    with filtered_native_stderr(), ImageClassifier.create_from_options(options) as classifier:
        for image in pixels:
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB,
                                                  data=np.ascontiguousarray(image, np.uint8)))
            heads = result.classifications
            row = np.zeros(len(heads[0].categories), np.float32)
            for category in heads[0].categories:
                row[category.index] = category.score
                names[category.index] = category.category_name
            scores.append(row)
            if len(heads) > 1:
                ood.append(heads[1].categories[0].score)
    return [names.get(i) for i in range(len(names))], np.stack(scores), np.asarray(ood) if ood else None


def check(path: Path, labels: list[str], pixels: np.ndarray, litert: Scores, output_step: float) -> dict:
    """MediaPipe against LiteRT on the same images: category names, top-1 and scores.

    A top-1 "agrees" when MediaPipe's first class has LiteRT's highest probability, within `output_step`
    (the step of a uint8 output, 0 for float: two classes can round to the same step, and the two runtimes
    may list either first).
    """
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return {"checked": False, "reason": "mediapipe is not installed"}
    pixels, probs = pixels[:MAX_IMAGES], litert.probabilities[:MAX_IMAGES]
    try:
        names, scores, ood = classify(path, pixels)
    except (RuntimeError, ValueError, OSError) as exc:  # MediaPipe raises these when it refuses a file
        message = " ".join(str(exc).split())  # MediaPipe's messages span lines (status, then a source trace)
        return {"checked": True, "error": f"{type(exc).__name__}: {message[:200]}"}
    step = output_step + 1e-5
    top = scores.argmax(1)
    agrees = probs[np.arange(len(top)), top] >= probs.max(1) - step
    report = {"checked": True, "n_images": int(len(pixels)), "labels_match": names == list(labels),
              "top1_agreement": round(float(agrees.mean()), 6),
              "max_abs_prob_diff": float(np.abs(scores - probs).max())}
    if litert.ood_score is not None:
        report["max_abs_ood_diff"] = (float(np.abs(ood - litert.ood_score[:MAX_IMAGES]).max())
                                      if ood is not None else None)
    return report


def problems(report: dict) -> list[str]:
    """What the export check holds against a MediaPipe report (nothing when MediaPipe is not installed)."""
    if not report.get("checked"):
        return []
    if "error" in report:
        return [f"MediaPipe's ImageClassifier cannot load it ({report['error']})"]
    found = []
    if not report["labels_match"]:
        found.append("MediaPipe's ImageClassifier does not read the class names from the file")
    if report["top1_agreement"] < 1.0:
        found.append(f"MediaPipe's ImageClassifier names another class than LiteRT for "
                     f"{100 * (1 - report['top1_agreement']):.1f}% of the images")
    if "max_abs_ood_diff" in report and report["max_abs_ood_diff"] is None:
        found.append("MediaPipe's ImageClassifier does not return the OOD score")
    return found
