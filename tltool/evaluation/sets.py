"""Running a model over labelled image sets: predictions, metrics, sanity probes, and a run's report.

`finetune` evaluates its just-trained model here (one prediction pass gives the summary's figures and
the report's), and the `evaluate` command any model `load_predictor` loads.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltool.errors import DataError
from tltool.evaluation.metrics import compute_metrics


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


def predict_images(predictor, paths, skips, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities for the images that decode; returns (probs, indices of those images in `paths`).

    Images are decoded in parallel and in order, `batch_size` at a time, so memory stays flat however
    large the folder; files that fail to decode are recorded in `skips` and left out.
    """
    from tltool.data.pipelines import decoded_batches

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


def evaluate_run_sets(predictor, datasets: dict, skips, top_k: int = 5):
    """Predictions and metrics of a just-trained model on its validation (and test) images, and probes.

    Args:
        predictor: the trained model behind the predictor interface (`labels`, `image_size`, `predict`).
        datasets: {"val": ImageFolder, "test": ImageFolder or None}.
        skips: the run's SkipLog.

    Returns:
        (list of EvalSet, list of Probe): what `write_run_report` turns into the report.
    """
    # Training leaves much garbage behind (traced functions, graphs). Collected now it takes well under
    # 2 s; left to a collection that the plotting triggers, it took 5-10 s (measured on a 2-core CPU).
    gc.collect()
    names = {"val": "validation", "test": "test"}
    sets = [evaluate_folder(predictor, folder, skips, name=names.get(key, key), key=key, top_k=top_k)
            for key, folder in datasets.items() if folder is not None]
    return sets, sanity_probes(predictor)


def write_run_report(run_dir, sets, probes, labels: list[str]) -> dict:
    """The end-of-run report of `finetune`: metrics.json, pictures and report.html inside the run directory.

    Returns:
        metrics.json's content: {"val": {...}, "test": {...}, "probes": [...]} for the sets given.
    """
    from tltool.evaluation.report import write_report

    metrics = {s.key: s.metrics for s in sets}
    metrics["probes"] = [p.as_dict(labels) for p in probes]
    write_report(Path(run_dir), sets, probes, metrics, run_dir=Path(run_dir), title="Run report")
    return metrics
