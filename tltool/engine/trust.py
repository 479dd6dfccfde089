"""What a run fits after training so that its answers can be trusted: a temperature and an OOD score.

Both are fitted in seconds on features the run already has (the feature cache, or the cached activations
of stage 2 run through the trained top blocks), never on the test images:

- **Temperature scaling** (Guo et al., 2017): one number T, fitted on the validation images by minimising
  the negative log-likelihood of softmax(logits / T), folded into the final Dense layer (kernel and bias
  divided by T). Accuracy is unchanged (the order of the classes is), every export inherits it, no new op.
  A prior on log T holds it near 1 when the validation images are few (see `fit_temperature`).
- **Out-of-distribution score**: cosine distance to the nearest training image's L2-normalised features
  (k = 1 nearest neighbour, Sun et al., 2022), thresholded to keep `trust.keep_rate` of the validation
  images. On real photos it separated other domains as well as a class-conditional Mahalanobis distance on
  the same normalised features (benchmarks/ood.py), with two practical advantages: its values are bounded
  (so quantized exports represent them), and its cost is one matrix product, where Mahalanobis needs a
  D x D precision matrix whose terms cancel at magnitudes of 1e4. Large training sets are summarised by
  spherical k-means centroids per class, so the bank (and the exported model) stays `trust.ood_bank` rows.
- **Images with nothing in them**: flat fields (greys, pure colours) and pixel noise (`blank_images`) go
  through the trained model too, and an image nearer to one of them than to any training image is out of
  distribution as well (see `models/ood.py`): distances alone called blank frames typical. One of them is
  left out when at least `BLANK_DATA_IMAGES` training images lie nearer to it than to any other training
  image: such data has images like it (a class of empty pages, of grainy textures), so it is not unknown
  there. A lone stray placeholder (an "image not found" picture scraped into a class) does not count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: log-temperatures searched, T from 1/4 to 20. Never sharper than 4x: on validation images the model gets
#: all right the likelihood rises without end as T -> 0, which would make every answer 100% sure.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.25, 20.0
_LOG_T_GRID = np.linspace(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE), 241)


def softmax_with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): log p differs from the logits by a per-row constant only."""
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    picked = np.asarray(probs, np.float64)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))


#: Standard deviation of the normal prior on log T that `fit_temperature` maximises the posterior under: T
#: within a factor 1.65 of 1 at one standard deviation. The likelihood alone, on a few dozen validation
#: images that the model gets nearly all right, sharpens every later answer (T -> 1/4). Measured with
#: benchmarks/calibration.py (T fitted on N random images of a run's held-out set, scored by the NLL of the
#: others, 200 draws): on ants vs bees (T 0.91 on all 153 images) T = 1 gave 0.121-0.126, the likelihood
#: alone 0.226 at N = 10, 0.154 at 50 and 0.138 at 100, this prior 0.125, 0.127 and 0.133. On two cats vs
#: dogs runs (T 0.53 and 0.42 on 1000 images), where calibration pays, the prior did as well or better: at
#: N = 50 0.094 and 0.208 against 0.098 and 0.210 (T = 1: 0.117 and 0.277).
TEMPERATURE_PRIOR_SD = 0.5


def fit_temperature(probs: np.ndarray, labels: np.ndarray, prior_sd: float | None = TEMPERATURE_PRIOR_SD) -> float:
    """The T maximising the posterior of softmax(logits / T) on (`probs`, `labels`) under a normal prior on
    log T centred on 0 (T = 1) with `prior_sd` (None: the likelihood alone): a grid over log T, refined.
    The prior weighs like a fixed number of images, so it matters on a few dozen and fades on thousands."""
    return fit_temperatures(probs, labels, [prior_sd])[0]


def fit_temperatures(probs: np.ndarray, labels: np.ndarray, prior_sds: list) -> list[float]:
    """`fit_temperature` under each of `prior_sds`, the likelihood over the grid computed once for all."""
    nll = _summed_nll(probs, labels)
    on_grid = np.array([nll(v) for v in _LOG_T_GRID])
    found = []
    for sd in prior_sds:
        def prior(log_t):  # minus the log of the prior's density, up to a constant
            return 0.0 if sd is None else log_t ** 2 / (2 * sd ** 2)

        best = int(np.argmin(on_grid + prior(_LOG_T_GRID)))
        lo, hi = _LOG_T_GRID[max(best - 1, 0)], _LOG_T_GRID[min(best + 1, len(_LOG_T_GRID) - 1)]
        for _ in range(30):  # golden-section search within the bracketing grid cells
            a, b = hi - (hi - lo) / 1.618034, lo + (hi - lo) / 1.618034
            lo, hi = (lo, b) if nll(a) + prior(a) < nll(b) + prior(b) else (a, hi)
        found.append(float(np.exp((lo + hi) / 2)))
    return found


def _summed_nll(probs: np.ndarray, labels: np.ndarray):
    """log T -> the summed negative log-likelihood of softmax(log(probs) / T), as `negative_log_likelihood`
    of `softmax_with_temperature` computes it (each image's term at most -log 1e-12), the logs taken once."""
    logits = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, 1.0))
    picked = logits[np.arange(len(labels)), np.asarray(labels)]
    top = logits.max(axis=1)

    def nll(log_t: float) -> float:
        t = float(np.exp(log_t))
        z = (logits - top[:, None]) / t
        terms = np.log(np.exp(z).sum(axis=1)) - (picked - top) / t
        return float(np.minimum(terms, -np.log(1e-12)).sum())

    return nll


def _held_by_the_prior(temperature: float, alone: float) -> str:
    """A note when the prior moved T by more than 10% from `alone`, what the validation images alone give."""
    if abs(np.log(alone / temperature)) <= np.log(1.1):
        return ""
    return f"; held toward 1 by its prior, as the images are few (they alone would give {alone:.3f})"


def fold_temperature(head, temperature: float) -> None:
    """Divide the head's final layer (`predictions`: Dense + softmax) by T: softmax(z / T) from then on."""
    layer = head.get_layer("predictions")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / temperature, bias / temperature])


#: Flat fields whose features mark where images with nothing in them land: greys from black to white and
#: the pure colours (RGB).
BLANK_COLOURS = tuple((v, v, v) for v in (0, 32, 64, 96, 128, 160, 192, 224, 255)) + (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255))
#: Fields of pixel noise of each kind (uniform over 0..255; Gaussian around mid-grey), beside the flat fields.
NOISE_FIELDS = 2
#: One of them is dropped when this many training images are nearer to it than to any other training
#: image (see the module docstring).
BLANK_DATA_IMAGES = 2


def blank_images(size: int) -> np.ndarray:
    """uint8 [N, size, size, 3]: the flat fields of BLANK_COLOURS, then NOISE_FIELDS uniform and NOISE_FIELDS
    Gaussian noise fields (seeded: every run has the same)."""
    rng = np.random.default_rng(0)
    flat = [np.full((size, size, 3), colour, np.float32) for colour in BLANK_COLOURS]
    uniform = [rng.integers(0, 256, (size, size, 3)).astype(np.float32) for _ in range(NOISE_FIELDS)]
    gaussian = [128 + 40 * rng.normal(size=(size, size, 3)) for _ in range(NOISE_FIELDS)]
    return np.clip(np.round(np.stack(flat + uniform + gaussian)), 0, 255).astype(np.uint8)


@dataclass
class OodFit:
    """The fitted out-of-distribution score: its bank of unit feature rows and its threshold."""

    bank: np.ndarray       # [rows, D] L2-normalised training features (or centroids)
    threshold: float       # the cosine distance above which an image is out of distribution
    keep_rate: float       # the share of validation images the threshold was set to keep
    val_kept: float        # the share it keeps (at least keep_rate; ties and small sets round up)
    training_images: int
    centroids: bool        # the bank holds centroids rather than every training image
    blanks: np.ndarray | None = None  # [rows, D] unit features of the blank images kept (None: not measured)
    val_nearer_blank: float = 0.0     # the share of validation images nearer a blank image than the bank

    def describe(self) -> str:
        bank = (f"{len(self.bank)} centroids of {self.training_images} training images" if self.centroids
                else f"{len(self.bank)} training images")
        blanks = ""
        if self.blanks is not None:
            blanks = (f"; images nearer one of {len(self.blanks)} blank or noise images than to any training image "
                      f"are unknown too ({100 * self.val_nearer_blank:.1f}% of the validation images)")
        return (f"out-of-distribution score: cosine distance to the nearest of {bank}, threshold "
                f"{self.threshold:.4f} keeps {100 * self.val_kept:.1f}% of the validation images{blanks}")

    def as_dict(self) -> dict:
        return {"method": "knn-cosine", "threshold_distance": round(self.threshold, 6),
                "keep_rate": self.keep_rate, "val_kept": round(self.val_kept, 6),
                "bank_rows": int(len(self.bank)), "training_images": self.training_images,
                "centroids": self.centroids, "blank_rows": None if self.blanks is None else int(len(self.blanks)),
                "val_nearer_blank": round(self.val_nearer_blank, 6)}


def unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def nearest_distance(bank: np.ndarray, features: np.ndarray, batch: int = 4096) -> np.ndarray:
    """1 - the largest cosine similarity of each feature row to a bank row (numpy; the model does the same)."""
    unit = unit_rows(features)
    return np.concatenate([1.0 - (unit[i:i + batch] @ bank.T).max(axis=1) for i in range(0, len(unit), batch)]
                          or [np.zeros(0, np.float32)])


def fit_ood(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray, keep_rate: float,
            bank_size: int, seed: int = 0, blank_features: np.ndarray | None = None) -> OodFit:
    """Bank from the training features, threshold from the validation features, and the blank images kept of
    `blank_features` (the model's features of `blank_images`; see the module docstring).

    The validation images nearer a blank image count as rejected: the threshold keeps `keep_rate` of all."""
    unit = unit_rows(train_features)
    centroids = len(unit) > bank_size
    bank = _class_centroids(unit, np.asarray(train_labels), bank_size, seed) if centroids else unit
    blanks = None if blank_features is None else _blanks_unknown_to(unit, bank, unit_rows(blank_features))
    val = nearest_distance(bank, val_features)
    blank = nearer_blank(bank, blanks, val_features)
    rest = val[~blank]
    share = min(1.0, keep_rate * len(val) / len(rest)) if len(rest) else 1.0
    threshold = _keeping_threshold(rest, share)
    kept = float(((val <= threshold) & ~blank).mean()) if len(val) else 1.0
    return OodFit(bank, threshold, keep_rate, kept, len(unit), centroids, blanks,
                  float(blank.mean()) if len(val) else 0.0)


def nearer_blank(bank: np.ndarray, blanks: np.ndarray | None, features: np.ndarray) -> np.ndarray:
    """[N] bool: the feature rows nearer (cosine) to a blank image than to any bank row."""
    if blanks is None or not len(blanks) or not len(features):
        return np.zeros(len(features), bool)
    unit = unit_rows(features)
    return (unit @ blanks.T).max(axis=1) > (unit @ bank.T).max(axis=1)


def _blanks_unknown_to(unit: np.ndarray, bank: np.ndarray, blanks: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The blank images (unit rows of their features) that fewer than BLANK_DATA_IMAGES training images are
    nearer to than to their nearest other training image (a bank of centroids: their nearest centroid)."""
    near = np.zeros(len(blanks), int)
    for start in range(0, len(unit), batch):
        rows = unit[start:start + batch]
        similarity = rows @ bank.T
        if bank is unit:  # not its own neighbour
            similarity[np.arange(len(rows)), np.arange(start, start + len(rows))] = -np.inf
        to_blanks = rows @ blanks.T
        near += (to_blanks >= similarity.max(axis=1, keepdims=True)).sum(axis=0)
    return blanks[near < BLANK_DATA_IMAGES]


def _keeping_threshold(distances: np.ndarray, keep_rate: float) -> float:
    """A distance that keeps at least `keep_rate` of `distances`: halfway between the last one kept and the
    next, and at least 0.1% above the last one kept. The features fitted on are float16 (the cache's), the
    model's float32, so an image exactly at the threshold must not fall out by rounding."""
    if not len(distances):
        return 1.0
    ordered = np.sort(distances)
    count = min(len(ordered), int(np.ceil(keep_rate * len(ordered) - 1e-9)))
    last = float(ordered[count - 1])
    floor = last + max(abs(last), 1e-6) * 1e-3
    return max(floor, (last + float(ordered[count])) / 2) if count < len(ordered) else floor


def _class_centroids(unit: np.ndarray, labels: np.ndarray, total: int, seed: int, iterations: int = 15) -> np.ndarray:
    """Spherical k-means within each class, `total` centroids in all, shared in proportion to class size."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = np.maximum(1, np.floor(total * counts / counts.sum()).astype(int))
    rng = np.random.default_rng(seed)
    out = []
    for c, k in zip(classes, per_class):
        rows = unit[labels == c]
        centres = rows[rng.choice(len(rows), size=min(k, len(rows)), replace=False)]
        for _ in range(iterations):
            nearest = (rows @ centres.T).argmax(axis=1)
            sums = np.zeros_like(centres)
            np.add.at(sums, nearest, rows)
            used = np.bincount(nearest, minlength=len(centres)) > 0
            centres[used] = unit_rows(sums[used])  # an unused centre keeps its place
        out.append(centres)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------- fitting a run


@dataclass
class Trust:
    """What `fit_trust` fitted for a run (None where the recipe turned it off)."""

    temperature: float | None
    ood: OodFit | None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"temperature": None if self.temperature is None else round(self.temperature, 6),
                "ood": self.ood.as_dict() if self.ood is not None else None, "seconds": round(self.seconds, 3)}


#: fewer validation images than this make the threshold a rough estimate (said in the log)
FEW_VALIDATION_IMAGES = 50


def fit_trust(ctx, tm, final: FinalFeatures | None = None) -> Trust:
    """Fit the temperature (folded into `tm`'s head) and the OOD score of a trained run (see the module
    docstring), on the final model's features of the training and validation images (`final`, or computed
    here: `final_features`)."""
    import time

    cfg, say = ctx.recipe.trust, (ctx.log if ctx.verbose else (lambda *a, **k: None))
    if not (cfg.calibrate or cfg.ood):
        return Trust(None, None)
    t0 = time.perf_counter()
    final = final or final_features(ctx, tm)
    train_x, train_y, val_x, val_y = final.train_x, final.train_y, final.val_x, final.val_y
    if ctx.cluster is not None:  # a multi-worker run: each worker has its shard's; the chief fits on all
        train_x, train_y, val_x, val_y = (ctx.cluster.gather_rows(np.asarray(a)) for a in (train_x, train_y,
                                                                                           val_x, val_y))
        if not ctx.cluster.is_chief:
            return Trust(None, None)
    temperature = ood = None
    if cfg.calibrate:
        probs = on_features(tm.head, val_x)
        temperature, alone = fit_temperatures(probs, val_y, [TEMPERATURE_PRIOR_SD, None])
        fold_temperature(tm.head, temperature)
        after = softmax_with_temperature(probs, temperature)
        say(f"Calibrated: temperature {temperature:.3f} fitted on the {len(val_y)} validation images (negative "
            f"log-likelihood {negative_log_likelihood(probs, val_y):.4f} -> "
            f"{negative_log_likelihood(after, val_y):.4f}){_held_by_the_prior(temperature, alone)}.")
    if cfg.ood:
        blank_x = _features_of_pixels(tm, blank_images(ctx.setup.image_size))
        ood = fit_ood(train_x, train_y, val_x, cfg.keep_rate, cfg.ood_bank, seed=ctx.recipe.seed,
                      blank_features=blank_x)
        say(f"Fitted the {ood.describe()}."
            + (f" With {len(val_x)} validation images the threshold is a rough estimate."
               if len(val_x) < FEW_VALIDATION_IMAGES else ""))
    return Trust(temperature, ood, time.perf_counter() - t0)


@dataclass
class FinalFeatures:
    """The trained model's features of the plain training images and of the validation images."""

    train_x: np.ndarray  # [N, D]
    train_y: np.ndarray
    val_x: np.ndarray    # [M, D]
    val_y: np.ndarray
    #: each validation row's image (an index into the split's val paths), where they came from cached rows
    val_rows: np.ndarray | None = None


def final_features(ctx, tm) -> FinalFeatures:
    """The trained model's features (`cached_final_features`, else, when stage 2 streamed images, from one
    more pass over the images)."""
    from tltool.engine.features import compute_features, progress_bar

    found = cached_final_features(ctx, tm)
    if found is not None:
        return found
    if ctx.verbose:
        ctx.log("Computing the trained model's features of the training and validation images (for calibration "
                "and the out-of-distribution score).")
    out = []
    for folder in (ctx.split.train, ctx.split.val):
        feats, ok = compute_features(tm.feature_extractor, folder.paths, ctx.setup.image_size,
                                     ctx.recipe.data.batch_size, ctx.split.skips,
                                     jit_compile=ctx.runtime.jit_compile, progress=progress_bar(len(folder),
                                                                                               ctx.verbose))
        out += [feats[ok], np.asarray(folder.labels)[ok]]
    return FinalFeatures(*out)


def cached_final_features(ctx, tm) -> FinalFeatures | None:
    """The trained model's features from the rows the run cached, where they give them (else None): when
    stage 2 trained on cached activations, those activations through the trained top blocks; when the
    backbone did not train, stage 1's features. (Stage 2 on streamed images, or a run resumed after its
    stages, leave only the frozen backbone's rows.)"""
    from tltool.engine.activations import pooled_features, split_at_cut

    found = ctx.features
    if found is not None and found.train_acts is not None:
        top = split_at_cut(tm, found.cut).features
        return FinalFeatures(pooled_features(top, found.train_acts[:, 0]), found.train_y,
                             pooled_features(top, found.val_acts), found.val_y, found.val_rows)
    if found is not None and ctx.recipe.fine_tune.epochs == 0:
        return FinalFeatures(found.train_x[:, 0], found.train_y, found.val_x, found.val_y, found.val_rows)
    return None


#: Pixels per eager call of `_features_of_pixels`: 4 images at 600 px (a large backbone holds gigabytes of
#: activations for a batch of 19 there), all 19 blank and noise images at up to 275 px in one call.
PIXELS_PER_CALL = 4 * 600 * 600


def _features_of_pixels(tm, pixels: np.ndarray) -> np.ndarray:
    """The trained model's features of a few uint8 images, in eager calls of as many images as fit
    PIXELS_PER_CALL (each call runs the backbone op by op: one call of 19 small images took 0.25-0.39 s,
    five of 4 took 0.67-0.75 s, MobileNetV2 at 160 px)."""
    batch = max(1, PIXELS_PER_CALL // (pixels.shape[1] * pixels.shape[2]))
    return np.concatenate([np.asarray(tm.feature_extractor(pixels[i:i + batch].astype(np.float32), training=False),
                                      np.float32) for i in range(0, len(pixels), batch)])


def on_features(model, features: np.ndarray, batch: int = 1024) -> np.ndarray:
    """What `model` (the head, the OOD scorer: small models over feature rows) gives for `features` [N, D], in
    eager calls (no traced function to build for a single pass)."""
    rows = np.asarray(features, np.float32)
    return np.concatenate([np.asarray(model(rows[i:i + batch], training=False), np.float32)
                           for i in range(0, len(rows), batch)])
