"""Running a model over labelled image sets: predictions, metrics, sanity probes, and a run's report.

`finetune` evaluates its just-trained model here (one prediction pass gives the summary's figures and
the report's), and the `evaluate` command any model `load_predictor` loads.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltool.data.folders import image_files
from tltool.errors import DataError
from tltool.evaluation.metrics import calibration_change, compute_metrics, ood_metrics
from tltool.models.ood import UNKNOWN_ABOVE, Scores, scores_of


@dataclass
class EvalSet:
    """One labelled image set run through a model: what the metrics and the report are made from."""

    name: str                # shown in the report: "validation", "test", or the folder's name
    key: str                 # "val" or "test" in a run's metrics.json, "" for a lone evaluation
    paths: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    labels: list[str]
    metrics: dict = field(default_factory=dict)
    ood_score: np.ndarray | None = None  # the model's OOD score of each image (None: the model has none)

    @property
    def picture_prefix(self) -> str:
        """Prefix of its picture files: "val_", "test_", or none."""
        return f"{self.key}_" if self.key else ""

    def most_confident_wrong(self, count: int = 16) -> list[int]:
        """Indices of misclassified images, most confident first."""
        pred = np.argmax(self.probs, axis=1)
        wrong = np.flatnonzero(pred != self.y_true)
        order = np.argsort(-self.probs[wrong].max(axis=1), kind="stable")
        return wrong[order][:count].tolist()


def predict_images(predictor, paths, skips, batch_size: int = 64) -> tuple[Scores, np.ndarray]:
    """Scores of the images that decode; returns (Scores, indices of those images in `paths`).

    Images are decoded in parallel and in order, `batch_size` at a time, so memory stays flat however
    large the folder; files that fail to decode are recorded in `skips` and left out.
    """
    from tltool.data.pipelines import decoded_batches

    chunks, kept = [], []
    offset = 0
    for pixels, ok in decoded_batches(paths, predictor.image_size, batch_size, skips):
        if ok.any():
            chunks.append(scores_of(predictor, pixels[ok]))
            kept.append(offset + np.flatnonzero(ok))
        offset += len(ok)
    if not chunks:
        return Scores(np.zeros((0, len(predictor.labels))), None), np.zeros(0, np.int64)
    ood = None if chunks[0].ood_score is None else np.concatenate([c.ood_score for c in chunks])
    return Scores(np.concatenate([c.probabilities for c in chunks]), ood), np.concatenate(kept)


@dataclass
class KnownScores:
    """A model's scores of a folder's images computed another way than running it over the image files (a
    run's validation images, from the activations it cached while training)."""

    rows: np.ndarray  # each score's image: an index into the folder's paths
    scores: Scores


#: The most a probability or an OOD score of `KnownScores` may differ from the model's own answer for the same
#: image file. Scores from a run's float16 cached activations differ by about 1e-4 (measured: 2e-4 on ants vs
#: bees photos, 1e-4 on cats vs dogs); more means they are not the model's, and every image is run instead.
KNOWN_SCORES_TOLERANCE = 0.02
#: Images of a folder with known scores that the model itself scores, to check them.
KNOWN_SCORES_CHECKED = 32


def known_scores_difference(predictor, folder, known: KnownScores, skips) -> float:
    """The largest difference between `known` and the model's own scores of an even sample of the images
    (KNOWN_SCORES_CHECKED): probabilities, and OOD scores relative to the threshold (1.0)."""
    if len(known.rows) == 0:
        return float("inf")
    picked = np.unique(np.linspace(0, len(known.rows) - 1, min(KNOWN_SCORES_CHECKED, len(known.rows))).astype(int))
    own, kept = predict_images(predictor, [folder.paths[i] for i in known.rows[picked]], skips)
    if len(kept) < len(picked):  # a file that changed since it was scored
        return float("inf")
    gaps = [np.abs(own.probabilities - known.scores.probabilities[picked]).max()]
    if own.ood_score is not None and known.scores.ood_score is not None:
        gaps.append(np.abs(own.ood_score - known.scores.ood_score[picked]).max())
    return float(max(gaps))


def evaluate_folder(predictor, folder, skips, name: str, key: str = "", top_k: int = 5,
                    known: KnownScores | None = None) -> EvalSet:
    """Run `predictor` over an `ImageFolder` (or take its `known` scores) and compute its metrics."""
    scores, kept = (known.scores, known.rows) if known is not None else predict_images(predictor, folder.paths,
                                                                                        skips)
    if len(kept) == 0:
        raise DataError(f"None of the {len(folder.paths)} images in {folder.root} could be decoded; see the "
                        f"skipped files for why.")
    paths = [folder.paths[i] for i in kept]
    y_true = np.asarray(folder.labels, dtype=np.int64)[kept]
    result = EvalSet(name, key, paths, y_true, scores.probabilities, predictor.labels, ood_score=scores.ood_score)
    result.metrics = compute_metrics(y_true, scores.probabilities, predictor.labels, top_k=top_k)
    if scores.ood_score is not None:
        result.metrics["kept_in_distribution"] = float((~scores.out_of_distribution()).mean())
    return result


@dataclass
class OodSet:
    """An unlabelled folder of images from other domains, run through a model with an OOD score."""

    name: str
    paths: list[str]
    probs: np.ndarray
    ood_score: np.ndarray
    labels: list[str]
    metrics: dict = field(default_factory=dict)

    def examples(self, count: int = 8) -> list[int]:
        """Indices of the images the model accepted (most in-distribution first), then of rejected ones."""
        order = np.argsort(self.ood_score, kind="stable")
        accepted = [int(i) for i in order if self.ood_score[i] <= UNKNOWN_ABOVE][:count // 2]
        rejected = [int(i) for i in order[::-1] if self.ood_score[i] > UNKNOWN_ABOVE][:count - len(accepted)]
        return accepted + rejected


def check_ood_folder(predictor, folder: Path) -> None:
    """Raise DataError unless `folder` is a folder and the model has an OOD score to measure on it: checked
    before the output folder is claimed, so that `--force` does not empty it for an evaluation that cannot run."""
    if not Path(folder).is_dir():
        raise DataError(f"--ood-data {folder} is not a folder. Pass a folder of images from other domains.")
    if not getattr(predictor, "has_ood", False):
        raise DataError(f"{getattr(predictor, 'source', 'The model')} has no out-of-distribution score (it was "
                        f"trained or exported before tltool had one, or with trust.ood: false). Train it again "
                        f"with `tltool finetune` to measure --ood-data.")


def evaluate_ood_folder(predictor, folder: Path, inside: EvalSet, skips) -> OodSet:
    """Score every image under `folder` (no classes needed) and measure the separation from `inside`."""
    root = Path(folder)
    check_ood_folder(predictor, root)
    paths = [str(p) for p in image_files(root)]
    scores, kept = predict_images(predictor, paths, skips)
    if len(kept) == 0:
        raise DataError(f"No readable images under --ood-data {root}. Pass a folder of image files.")
    result = OodSet(root.resolve().name or "ood", [paths[i] for i in kept], scores.probabilities, scores.ood_score,
                    predictor.labels)
    result.metrics = {"data": str(root), **ood_metrics(inside.ood_score, scores.ood_score, UNKNOWN_ABOVE)}
    return result


# ------------------------------------------------------------------------------------------ probes

PROBE_WARN_CONFIDENCE = 0.8


@dataclass
class Probe:
    """An image with no class in it; a model that is sure about it will be sure about anything."""

    name: str
    pixels: np.ndarray
    probs: np.ndarray = None
    ood_score: float | None = None  # None: the model has no OOD score

    @property
    def rejected(self) -> bool:
        return self.ood_score is not None and self.ood_score > UNKNOWN_ABOVE

    def as_dict(self, labels: list[str]) -> dict:
        order = np.argsort(-self.probs, kind="stable")[:3]
        confidence = float(self.probs[order[0]])
        if self.rejected:
            verdict = "rejected"  # the model answers "unknown", whatever its softmax says
        elif confidence >= PROBE_WARN_CONFIDENCE:
            verdict = "over-confident"
        elif confidence >= max(0.5, 2.0 / len(labels)):  # well above a uniform guess, but not sure
            verdict = "leaning"
        else:
            verdict = "unsure"
        return {"name": self.name, "predicted": labels[order[0]], "confidence": confidence,
                "top": [{"label": labels[i], "probability": float(self.probs[i])} for i in order],
                "ood_score": self.ood_score, "rejected": self.rejected,
                "verdict": verdict, "overconfident": verdict == "over-confident"}


def sanity_probes(predictor, seed: int = 0) -> list[Probe]:
    """The model's predictions on blank grey, black and white images and on uniform noise."""
    size = predictor.image_size
    probes = [Probe("blank grey", np.full((size, size, 3), 128, np.uint8)),
              Probe("blank black", np.zeros((size, size, 3), np.uint8)),
              Probe("blank white", np.full((size, size, 3), 255, np.uint8)),
              Probe("noise", np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))]
    scores = scores_of(predictor, np.stack([p.pixels for p in probes]))
    for i, probe in enumerate(probes):
        probe.probs = np.asarray(scores.probabilities[i], dtype=np.float64)
        probe.ood_score = None if scores.ood_score is None else float(scores.ood_score[i])
    return probes


def evaluate_run_sets(predictor, datasets: dict, skips, top_k: int = 5, robustness: bool = False,
                      known: dict | None = None):
    """Predictions and metrics of a just-trained model on its validation (and test) images, and probes.

    Args:
        predictor: the trained model behind the predictor interface (`labels`, `image_size`, `predict`).
        datasets: {"val": ImageFolder, "test": ImageFolder or None}.
        skips: the run's SkipLog.
        robustness: also measure the validation accuracy under small perturbations (`robustness` in its
            metrics; see robustness.py).
        known: {key: KnownScores} of sets whose scores are known already (checked by the caller).

    Returns:
        (list of EvalSet, list of Probe): what `write_run_report` turns into the report.
    """
    # Training leaves much garbage behind (traced functions, graphs). Collected now it takes well under
    # 2 s; left to a collection that the plotting triggers, it took 5-10 s (measured on a 2-core CPU).
    gc.collect()
    names = {"val": "validation", "test": "test"}
    known = known or {}
    sets = [evaluate_folder(predictor, folder, skips, name=names.get(key, key), key=key, top_k=top_k,
                            known=known.get(key))
            for key, folder in datasets.items() if folder is not None]
    for s in sets[:1] if robustness else ():
        s.metrics["robustness"] = measure_robustness(predictor, s)
    return sets, sanity_probes(predictor)


def measure_robustness(predictor, s: EvalSet) -> dict | None:
    """Accuracy of a Keras model on (a sample of) `s` under FGSM and noise (see robustness.py); None for a
    model without gradients here (TFLite, ONNX, SavedModel)."""
    from tltool.data.images import ImageReadError, load_image
    from tltool.evaluation.robustness import perturbed_accuracy, sample

    model = getattr(predictor, "model", None)
    if model is None:
        return None
    pixels, labels = [], []
    for i in sample(len(s.paths)):
        try:
            pixels.append(load_image(s.paths[i], predictor.image_size))
            labels.append(s.y_true[i])
        except ImageReadError:  # a file changed since it was scored
            continue
    if not pixels:
        return None
    return perturbed_accuracy(model, np.stack(pixels), np.asarray(labels))


def add_calibration(sets, temperature: float | None) -> None:
    """Each set's ECE and NLL before and after the run's temperature, in its metrics (`calibration`)."""
    if temperature is None:
        return
    for s in sets:
        s.metrics["calibration"] = calibration_change(s.y_true, s.probs, temperature)


def write_run_report(run_dir, sets, probes, labels: list[str], temperature: float | None = None) -> dict:
    """The end-of-run report of `finetune`: metrics.json, pictures and report.html inside the run directory.

    Returns:
        metrics.json's content: {"val": {...}, "test": {...}, "probes": [...]} for the sets given.
    """
    from tltool.evaluation.report import write_report

    add_calibration(sets, temperature)
    metrics = {s.key: s.metrics for s in sets}
    metrics["probes"] = [p.as_dict(labels) for p in probes]
    write_report(Path(run_dir), sets, probes, metrics, run_dir=Path(run_dir), title="Run report")
    return metrics
