"""Out-of-distribution scores side by side, on a trained run and images from other domains.

For each score, the threshold is set to keep --keep-rate of the run's validation images (as tltool sets its
own), then the script prints the share of held-out in-domain images kept (--test) and, for each folder of
images from another domain, the share rejected and the AUROC of the score against the in-domain images.

Scores compared, all on the run's own backbone features (after stage 2):

    max-softmax    1 - the largest (calibrated) class probability: the usual confidence threshold
    maha-raw       class-conditional Gaussian, shared covariance (Mahalanobis distance), raw features
    maha-l2        the same on L2-normalised features
    knn1-cos       cosine distance to the nearest training image (what tltool builds into the model)
    knn10-cos      to the 10th nearest
    tltool         the run's own `ood_score` output (knn1-cos, on centroids for large training sets)

Usage:
    python benchmarks/ood.py RUN --train DIR --val DIR --test DIR --ood sprites=DIR --ood digits=DIR ...

RUN is a run directory from `tltool finetune` trained on --train with --val; the sanity probes (blank
grey, black, white and noise images) are always added.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def image_files(folder: str, limit: int | None, seed: int = 0) -> list[str]:
    from tltool.data.images import is_image_name

    files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and is_image_name(p))
    if limit and len(files) > limit:
        files = sorted(np.random.default_rng(seed).choice(files, limit, replace=False).tolist())
    return files


def run_model(model, files: list[str], size: int, batch: int = 64) -> dict:
    """Pooled features, probabilities and the model's ood_score of every readable file."""
    import tensorflow as tf

    from tltool.data.images import ImageReadError, load_image

    extractor = model.get_layer("feature_extractor")
    forward = tf.function(lambda x: (extractor(x, training=False), model(x, training=False)), reduce_retracing=True)
    out = {"features": [], "probabilities": [], "ood_score": []}
    for i in range(0, len(files), batch):
        pixels = []
        for path in files[i:i + batch]:
            try:
                pixels.append(load_image(path, size))
            except ImageReadError:
                continue
        if not pixels:
            continue
        features, outputs = forward(tf.constant(np.stack(pixels), tf.float32))
        out["features"].append(features.numpy())
        out["probabilities"].append(outputs["probabilities"].numpy())
        out["ood_score"].append(outputs["ood_score"].numpy().ravel())
    return {k: np.concatenate(v) for k, v in out.items()}


def probes(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([np.full((size, size, 3), 128), np.zeros((size, size, 3)), np.full((size, size, 3), 255),
                     rng.integers(0, 256, (size, size, 3))]).astype(np.float32)


def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mahalanobis(train, labels, normalise: bool, shrinkage: float = 0.1):
    x = unit(train) if normalise else train
    means = np.stack([x[labels == c].mean(0) for c in np.unique(labels)])
    centred = x - means[labels]
    cov = centred.T @ centred / len(x)
    cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(cov)

    def score(f, _probs):
        f = unit(f) if normalise else f
        return np.min([np.einsum("nd,de,ne->n", f - m, precision, f - m) for m in means], axis=0)
    return score


def knn(train, k: int):
    bank = unit(train)

    def score(f, _probs):
        similarity = unit(f) @ bank.T
        return 1 - np.sort(similarity, axis=1)[:, -k]
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--train", required=True, help="the run's training folder")
    parser.add_argument("--val", required=True, help="the run's validation folder (thresholds are set on it)")
    parser.add_argument("--test", help="held-out in-domain images: the keep rate is measured on them")
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=DIR",
                        help="a folder of images from another domain (repeatable)")
    parser.add_argument("--keep-rate", type=float, default=0.95)
    parser.add_argument("--limit", type=int, default=500, help="most images read from each folder")
    args = parser.parse_args()

    import keras

    from tltool import rundir
    from tltool.evaluation.metrics import auroc

    model = keras.models.load_model(Path(args.run) / rundir.MODEL_FILE, compile=False)
    size = int(model.input_shape[1])
    classes = rundir.read_labels(args.run)
    train_files = image_files(args.train, None)
    train = run_model(model, train_files, size)
    train_labels = np.array([classes.index(Path(p).parent.name) for p in train_files])
    val = run_model(model, image_files(args.val, args.limit), size)
    inside = run_model(model, image_files(args.test, args.limit), size) if args.test else val
    others = {}
    for item in args.ood:
        name, _, folder = item.partition("=")
        others[name] = run_model(model, image_files(folder, args.limit), size)
    extractor = model.get_layer("feature_extractor")
    probe_pixels = probes(size)
    probe_out = model(probe_pixels, training=False)
    others["probes"] = {"features": np.asarray(extractor(probe_pixels, training=False)),
                        "probabilities": np.asarray(probe_out["probabilities"]),
                        "ood_score": np.asarray(probe_out["ood_score"]).ravel()}

    scores = {
        "max-softmax": lambda f, p: 1 - p.max(axis=1),
        "maha-raw": mahalanobis(train["features"], train_labels, normalise=False),
        "maha-l2": mahalanobis(train["features"], train_labels, normalise=True),
        "knn1-cos": knn(train["features"], 1),
        "knn10-cos": knn(train["features"], 10),
        "tltool": None,
    }
    print(f"run {args.run}: {len(train_files)} training, {len(val['features'])} validation, "
          f"{len(inside['features'])} held-out in-domain images; threshold keeps {args.keep_rate:.0%} of validation")
    names = list(others)
    header = f"{'score':<12} {'kept':>6} " + " ".join(f"{n[:14]:>22}" for n in names)
    print(header + "\n" + " " * 20 + " ".join(f"{'rejected / AUROC':>22}" for _ in names))
    for name, fn in scores.items():
        def of(d, fn=fn):
            return d["ood_score"] if fn is None else fn(d["features"], d["probabilities"])
        threshold = 1.0 if fn is None else np.quantile(of(val), args.keep_rate, method="higher")
        ins = of(inside)
        cells = []
        for other in names:
            out = of(others[other])
            area = auroc(ins, out) if other != "probes" else float("nan")
            cells.append(f"{(out > threshold).mean():>12.1%} / {area:.3f}" if other != "probes"
                         else f"{int((out > threshold).sum())}/{len(out)} rejected".rjust(22))
        print(f"{name:<12} {(ins <= threshold).mean():>6.1%} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
