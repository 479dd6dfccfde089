"""`finetune`: recipe -> checked data -> backbone -> stage 1 -> stage 2 -> evaluation -> run directory."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltool import rundir
from tltool.backbones import check_image_size, get_backbone_spec, resolve_weights
from tltool.data import (ImageFolder, SkipLog, augmentation_layer, balanced_class_weights, image_dataset,
                         scan_folder, stratified_split)
from tltool.errors import DataError, RecipeError
from tltool.features import FeatureCache, cached_features, default_cache_dir, extractor_key
from tltool.model import build_transfer_model, set_fine_tune_layers
from tltool.recipe import Recipe, load_recipe, save_recipe
from tltool.train import compile_model, features_dataset, fit_stage, stage_callbacks


@dataclass
class FinetuneResult:
    run_dir: Path
    summary: dict
    model: object = None


@dataclass
class SplitData:
    train: ImageFolder
    val: ImageFolder
    test: ImageFolder | None
    skips: SkipLog


def resolve_recipe(recipe=None, *, data=None, val_data=None, test_data=None, backbone=None, weights=None,
                   image_size=None, epochs=None, fine_tune_epochs=None, batch_size=None, seed=None,
                   overrides=()) -> Recipe:
    """The recipe (path, `Recipe` or None for defaults) with `--set` overrides and explicit arguments applied."""
    flags = {
        "data": {"train": _path_or_none(data), "val": _path_or_none(val_data), "test": _path_or_none(test_data),
                 "image_size": image_size, "batch_size": batch_size},
        "backbone": {"name": backbone, "weights": weights},
        "frozen": {"epochs": epochs},
        "fine_tune": {"epochs": fine_tune_epochs},
        "seed": seed,
    }
    if isinstance(recipe, Recipe):
        base = recipe.to_dict()
        from tltool.recipe import _flatten, from_dict, parse_override, set_dotted

        for item in overrides:
            set_dotted(base, *parse_override(item))
        for key, value in _flatten(flags):
            if value is not None:
                set_dotted(base, key, value)
        resolved = from_dict(base)
    else:
        resolved = load_recipe(recipe, overrides=overrides, values=flags)
    for key in ("train", "val", "test"):  # absolute paths make the saved recipe repeatable from anywhere
        value = getattr(resolved.data, key)
        if value is not None:
            setattr(resolved.data, key, str(Path(value).expanduser().resolve()))
    return resolved


def _path_or_none(value):
    return None if value is None else str(value)


def load_split_data(recipe: Recipe, skips: SkipLog | None = None) -> SplitData:
    """Scan the recipe's folders and split off validation data when no folder is given."""
    if recipe.data.train is None:
        raise RecipeError("No training data: pass --data DIR (a folder with one sub-folder per class) or set "
                          "`data.train` in the recipe.")
    skips = skips if skips is not None else SkipLog()
    full = scan_folder(recipe.data.train, skips, role="training")
    if recipe.data.val:
        train = full
        val = scan_folder(recipe.data.val, skips, classes=full.classes, role="validation")
    else:
        train, val = stratified_split(full, recipe.data.val_split, recipe.seed, recipe.data.group_by)
        if len(val) == 0:
            raise DataError(f"Too few images in {full.root} to split off validation data; add images or pass "
                            f"--val-data DIR.")
    test = scan_folder(recipe.data.test, skips, classes=full.classes, role="test") if recipe.data.test else None
    return SplitData(train, val, test, skips)


def finetune(recipe=None, *, data=None, val_data=None, test_data=None, backbone=None, weights=None,
             image_size=None, epochs=None, fine_tune_epochs=None, batch_size=None, seed=None, out=None,
             overrides=(), force=False, verbose: int = 1, log=print) -> FinetuneResult:
    """Fine-tune a pretrained backbone on an image folder and write a run directory.

    Args:
        recipe: path of a YAML recipe, a `Recipe`, or None for the defaults.
        data, val_data, test_data: image folders (one sub-folder per class); override the recipe's.
        backbone, weights, image_size, epochs, fine_tune_epochs, batch_size, seed: override the recipe.
            `epochs` is stage 1 (frozen backbone), `fine_tune_epochs` stage 2 (0 skips it).
        out: run directory; default runs/NAME-TIMESTAMP. Must be new or empty unless `force`.
        overrides: `dotted.key=value` strings, as `--set`.
        force: overwrite a non-empty `out`.
        verbose: 0 silent, 1 progress bars and messages.
        log: where messages go.

    Returns:
        FinetuneResult with the run directory and the summary written to its summary.json.
    """
    t_start = time.perf_counter()
    recipe = resolve_recipe(recipe, data=data, val_data=val_data, test_data=test_data, backbone=backbone,
                            weights=weights, image_size=image_size, epochs=epochs,
                            fine_tune_epochs=fine_tune_epochs, batch_size=batch_size, seed=seed,
                            overrides=overrides)
    say = log if verbose else (lambda *a, **k: None)
    spec = get_backbone_spec(recipe.backbone.name)
    size = recipe.data.image_size or spec.default_size
    check_image_size(spec, size)
    if recipe.data.train is None:
        raise RecipeError("No training data: pass --data DIR (a folder with one sub-folder per class) or set "
                          "`data.train` in the recipe.")
    run_dir = Path(out) if out else Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and run_dir.is_dir() and any(run_dir.iterdir()) and not force:
        rundir.prepare_output_dir(run_dir, force=False)  # raises the standard message
    # Weights before data: an offline machine must learn at once that it cannot get them.
    resolved_weights = resolve_weights(spec, recipe.backbone.weights, recipe.backbone.fallback,
                                       classic=recipe.head.mode == "classic")
    split = load_split_data(recipe)
    run_dir = rundir.prepare_output_dir(run_dir, force=force)
    classes = split.train.classes
    say(f"tltool: {spec.name} at {size}px, {len(classes)} classes, {len(split.train)} training / "
        f"{len(split.val)} validation" + (f" / {len(split.test)} test" if split.test else "") + " images.")
    if len(split.skips):
        say(f"Skipping {len(split.skips)} unreadable file(s); see skipped_files in summary.json.")

    strategy, jit = prepare_runtime(recipe)
    with strategy.scope():
        tm = build_transfer_model(spec, resolved_weights, len(classes), size, recipe.head, seed=recipe.seed)
    save_recipe(recipe, run_dir / rundir.RECIPE_FILE)
    rundir.write_labels(run_dir, classes)
    history_path = run_dir / rundir.HISTORY_FILE
    n = len(classes)

    def images(folder: ImageFolder, training: bool):
        return image_batches(recipe, split, folder, size, training=training)

    timings = train_stages(recipe, tm, split, spec=spec, weights=resolved_weights, size=size, strategy=strategy,
                           jit=jit, history_path=history_path, verbose=verbose, log=say)

    # ---- evaluation of the full image-level model
    t0 = time.perf_counter()
    compile_model(tm.model, "adam", 1e-3, 0.0)
    val_loss, val_acc = tm.model.evaluate(images(split.val, False), verbose=0)
    test_loss = test_acc = None
    if split.test is not None:
        test_loss, test_acc = tm.model.evaluate(images(split.test, False), verbose=0)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 3)
    rundir.atomic_save_model(tm.model, run_dir / rundir.MODEL_FILE)
    timings["total_s"] = round(time.perf_counter() - t_start, 3)

    summary = {
        "name": recipe.name,
        "backbone": spec.name,
        "weights": recipe.backbone.weights if not resolved_weights.fell_back else "none (fallback)",
        "image_size": size,
        "classes": classes,
        "num_classes": n,
        "images": {"train": len(split.train), "val": len(split.val),
                   "test": len(split.test) if split.test else None},
        "class_counts": {"train": split.train.counts(), "val": split.val.counts(),
                         "test": split.test.counts() if split.test else None},
        "val_accuracy": round(float(val_acc), 6),
        "val_loss": round(float(val_loss), 6),
        "test_accuracy": None if test_acc is None else round(float(test_acc), 6),
        "test_loss": None if test_loss is None else round(float(test_loss), 6),
        "skipped_files": split.skips.as_list(),
        "timings": timings,
        "versions": _versions(),
    }
    rundir.atomic_write_json(run_dir / rundir.SUMMARY_FILE, summary)
    say(f"Done in {timings['total_s']:.1f}s: val_accuracy {val_acc:.4f}"
        + (f", test_accuracy {test_acc:.4f}" if test_acc is not None else "") + f". Run directory: {run_dir}")
    return FinetuneResult(run_dir, summary, tm.model)


@dataclass
class StageFeatures:
    """Backbone features of the training and validation images, for training the head (stage 1)."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    seconds: float = 0.0   # time spent computing (not reading from the cache)
    computed: int = 0      # images (views included) run through the extractor


def prepare_runtime(recipe: Recipe):
    """Fresh Keras session, seeds, precision and distribution strategy for one training run.

    Returns:
        (strategy, jit): the `tf.distribute` strategy to build and train under, and whether to XLA-compile.
    """
    import keras
    import tensorflow as tf

    keras.backend.clear_session()
    keras.utils.set_random_seed(recipe.seed)
    if recipe.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    jit = bool(recipe.train.xla and gpus)
    _configure_precision(recipe, gpus)
    return _strategy(recipe, gpus), jit


def image_batches(recipe: Recipe, split: SplitData, folder: ImageFolder, size: int, training: bool, augment=None):
    """Batches of (pixels, one-hot labels) of `folder`; shuffled (and augmented, if given) when training."""
    return image_dataset(folder.paths, folder.labels, size, recipe.data.batch_size, split.skips,
                         len(split.train.classes), shuffle=training, seed=recipe.seed,
                         augment=augment if training else None)


def frozen_features(recipe: Recipe, extractor, split: SplitData, *, spec, weights, size: int, augment=None,
                    jit: bool = False, verbose: int = 1, log=print) -> StageFeatures:
    """Features of the training (plus `frozen.feature_views` augmented views) and validation images.

    Read from the on-disk feature cache where present; the rest is computed with `extractor` and stored.
    """
    cache = FeatureCache(_cache_root(recipe) / extractor_key(
        spec.name, weights.fingerprint, size, spec.preprocessing, recipe.head.mode, recipe.head.pooling))
    bs = recipe.data.batch_size
    train_x, train_rows, s1 = cached_features(
        extractor, cache, split.train.paths, size, bs, split.skips,
        views=recipe.frozen.feature_views, augment=augment,
        augment_key=_augment_key(recipe), verbose=verbose, log=log, jit_compile=jit)
    val_x, val_rows, s2 = cached_features(extractor, cache, split.val.paths, size, bs,
                                          split.skips, verbose=verbose, log=log, jit_compile=jit)
    return StageFeatures(train_x, np.asarray(split.train.labels)[train_rows], val_x,
                         np.asarray(split.val.labels)[val_rows], s1.seconds + s2.seconds, s1.computed + s2.computed)


def train_stages(recipe: Recipe, tm, split: SplitData, *, spec, weights, size: int, strategy, jit: bool = False,
                 history_path: Path | None = None, features: StageFeatures | None = None, extra_callbacks=(),
                 verbose: int = 1, log=print) -> dict:
    """Stage 1 (frozen backbone) then stage 2 (top layers unfrozen) of `recipe` on the model `tm`.

    The one training code path of `finetune` and of every `tune` trial.

    Args:
        recipe: the resolved recipe; its `frozen` and `fine_tune` sections say what trains and how long.
        tm: the `TransferModel` to train in place. With `features` given and no stage 2, only `tm.head`
            is used.
        split: the training / validation images.
        spec, weights, size: the backbone spec, its resolved weights and the input size.
        strategy, jit: from `prepare_runtime`.
        history_path: `history.csv` to append epochs to; None keeps no history.
        features: stage-1 features computed beforehand (see `frozen_features`); None computes them here
            when `frozen.cache_features` is on.
        extra_callbacks: more Keras callbacks for both stages.
        verbose: 0 silent, 1 progress bars.
        log: where messages go.

    Returns:
        Timings in seconds: features_s, feature_images, stage1_s, stage2_s.
    """
    say = log
    classes = split.train.classes
    class_weight = (balanced_class_weights(split.train.labels, len(classes))
                    if recipe.train.class_weights == "auto" else None)
    augment = augmentation_layer(recipe.augment, seed=recipe.seed)
    timings = {"features_s": 0.0, "feature_images": 0, "stage1_s": 0.0, "stage2_s": 0.0}
    bs = recipe.data.batch_size
    n = len(classes)

    def images(folder: ImageFolder, training: bool):
        return image_batches(recipe, split, folder, size, training=training, augment=augment)

    # ---- stage 1: frozen backbone, head only
    if recipe.frozen.epochs > 0:
        say(f"Stage 1: frozen backbone, training the head for up to {recipe.frozen.epochs} epochs.")
        t0 = time.perf_counter()
        with strategy.scope():
            if recipe.frozen.cache_features:
                if features is None:
                    features = frozen_features(recipe, tm.feature_extractor, split, spec=spec, weights=weights,
                                               size=size, augment=augment, jit=jit, verbose=verbose, log=say)
                    timings["features_s"] = round(features.seconds, 3)
                    timings["feature_images"] = features.computed
                compile_model(tm.head, recipe.frozen.optimizer, recipe.frozen.learning_rate,
                              recipe.train.label_smoothing, jit_compile=jit)
                fit_stage(tm.head, features_dataset(features.train_x, features.train_y, n, bs, True, recipe.seed),
                          features_dataset(features.val_x, features.val_y, n, bs, False, None), recipe.frozen.epochs,
                          stage_callbacks(history_path, 1, recipe.frozen.early_stopping, extra_callbacks),
                          class_weight, verbose=verbose)
            else:
                compile_model(tm.model, recipe.frozen.optimizer, recipe.frozen.learning_rate,
                              recipe.train.label_smoothing, jit_compile=jit)
                fit_stage(tm.model, images(split.train, True), images(split.val, False), recipe.frozen.epochs,
                          stage_callbacks(history_path, 1, recipe.frozen.early_stopping, extra_callbacks),
                          class_weight, verbose=verbose)
        timings["stage1_s"] = round(time.perf_counter() - t0, 3)

    # ---- stage 2: top layers unfrozen, low learning rate, augmented images
    if recipe.fine_tune.epochs > 0:
        t0 = time.perf_counter()
        with strategy.scope():
            trainable = set_fine_tune_layers(tm.backbone, recipe.fine_tune.unfreeze,
                                            freeze_batchnorm=weights.pretrained)
            say(f"Stage 2: {trainable} backbone layers unfrozen, up to {recipe.fine_tune.epochs} epochs at "
                f"learning rate {recipe.fine_tune.learning_rate:g}.")
            compile_model(tm.model, recipe.fine_tune.optimizer, recipe.fine_tune.learning_rate,
                          recipe.train.label_smoothing, jit_compile=jit)
            fit_stage(tm.model, images(split.train, True), images(split.val, False), recipe.fine_tune.epochs,
                      stage_callbacks(history_path, 2, recipe.fine_tune.early_stopping, extra_callbacks),
                      class_weight, verbose=verbose)
        timings["stage2_s"] = round(time.perf_counter() - t0, 3)
        tm.backbone.trainable = False
    return timings


def _cache_root(recipe: Recipe) -> Path:
    return Path(recipe.train.cache_dir).expanduser() if recipe.train.cache_dir else default_cache_dir()


def _augment_key(recipe: Recipe) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps([recipe.augment.__dict__, recipe.seed], sort_keys=True).encode()).hexdigest()[:12]


def _configure_precision(recipe: Recipe, gpus) -> None:
    import keras

    if recipe.train.mixed_precision and gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
    else:
        if recipe.train.mixed_precision:
            warnings.warn("train.mixed_precision is ignored: no GPU is visible.", UserWarning, stacklevel=3)
        keras.mixed_precision.set_global_policy("float32")


def _strategy(recipe: Recipe, gpus):
    import tensorflow as tf

    if recipe.train.strategy == "mirrored":
        if len(gpus) < 2:
            warnings.warn(f"train.strategy mirrored with {len(gpus)} GPU(s): training on one device.",
                          UserWarning, stacklevel=3)
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _versions() -> dict:
    import keras
    import tensorflow as tf

    from tltool import __version__

    return {"tltool": __version__, "tensorflow": tf.__version__, "keras": keras.__version__}
