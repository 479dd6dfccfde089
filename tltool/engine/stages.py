"""`finetune`: recipe -> checked data -> backbone -> stage 1 -> stage 2 -> evaluation -> run directory."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltool import rundir
from tltool.models.backbones import check_image_size, get_backbone_spec, resolve_weights
from tltool.data.folders import (ImageFolder, SkipLog, augmentation_layer, balanced_class_weights, image_dataset,
                         scan_folder, stratified_split)
from tltool.errors import DataError, RecipeError, RunDirError
from tltool.engine.features import FeatureCache, cache_dir, cached_features, extractor_key
from tltool.models.transfer import build_transfer_model, set_fine_tune_layers
from tltool.recipe import Recipe, load_recipe, save_recipe
from tltool.engine.fitting import compile_model, features_dataset, fit_stage, learning_rate_callback, stage_callbacks


@dataclass
class FinetuneResult:
    run_dir: Path
    summary: dict
    model: object = None        # the trained keras.Model (pixels -> probabilities)
    model_parts: object = None  # its TransferModel: feature_extractor, backbone, head


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
    resolved = load_recipe(recipe, overrides=overrides, values=flags)
    # Absolute paths make the saved recipe repeatable (and resumable) from any working directory.
    for section, key in (("data", "train"), ("data", "val"), ("data", "test"), ("train", "cache_dir")):
        value = getattr(getattr(resolved, section), key)
        if value is not None:
            setattr(getattr(resolved, section), key, str(Path(value).expanduser().resolve()))
    if resolved.backbone.weights not in ("imagenet", "none"):
        resolved.backbone.weights = str(Path(resolved.backbone.weights).expanduser().resolve())
    return resolved


def _path_or_none(value):
    return None if value is None else str(value)


def require_training_data(recipe: Recipe) -> None:
    if recipe.data.train is None:
        raise RecipeError("No training data: pass --data DIR (a folder with one sub-folder per class) or set "
                          "`data.train` in the recipe.")


def load_split_data(recipe: Recipe, skips: SkipLog | None = None) -> SplitData:
    """Scan the recipe's folders and split off validation data when no folder is given."""
    require_training_data(recipe)
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


@dataclass
class StageFeatures:
    """Stage 1's cached features of the training (views included) and validation images."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    seconds: float
    computed: int


@dataclass
class TrainingContext:
    """Everything the stages need besides the model: shared by `finetune` and `tune` trials."""

    recipe: Recipe
    split: SplitData
    image_size: int
    pretrained: bool
    verbose: int = 1
    log: object = print
    jit_compile: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.split.train.classes)

    def images(self, folder: ImageFolder, training: bool, augment=None):
        return image_dataset(folder.paths, folder.labels, self.image_size, self.recipe.data.batch_size,
                             self.split.skips, self.num_classes, shuffle=training, seed=self.recipe.seed,
                             augment=augment if training else None)

    def class_weight(self):
        if self.recipe.train.class_weights != "auto":
            return None
        return balanced_class_weights(self.split.train.labels, self.num_classes)


def stage1_features(ctx: TrainingContext, extractor, spec, weights_fingerprint: str) -> StageFeatures:
    """Features of the training and validation images, from the on-disk cache where possible."""
    recipe = ctx.recipe
    cache = FeatureCache(cache_dir(recipe.train.cache_dir) / extractor_key(
        spec.name, weights_fingerprint, ctx.image_size, spec.preprocessing, recipe.head.mode, recipe.head.pooling))
    bs = recipe.data.batch_size
    augment = augmentation_layer(recipe.augment, seed=recipe.seed)
    train_x, train_rows, s1 = cached_features(
        extractor, cache, ctx.split.train.paths, ctx.image_size, bs, ctx.split.skips,
        views=recipe.frozen.feature_views, augment=augment, augment_key=_augment_key(recipe), verbose=ctx.verbose,
        log=ctx.log, jit_compile=ctx.jit_compile)
    val_x, val_rows, s2 = cached_features(extractor, cache, ctx.split.val.paths, ctx.image_size, bs,
                                          ctx.split.skips, verbose=ctx.verbose, log=ctx.log,
                                          jit_compile=ctx.jit_compile)
    return StageFeatures(train_x, np.asarray(ctx.split.train.labels)[train_rows], val_x,
                         np.asarray(ctx.split.val.labels)[val_rows], s1.seconds + s2.seconds,
                         s1.computed + s2.computed)


def run_stage1(ctx: TrainingContext, tm, features: StageFeatures | None, history_path=None, backup_dir=None,
               extra_callbacks=()):
    """Train the head with the backbone frozen: on `features` if given, else on images. Returns the History."""
    recipe, n, bs = ctx.recipe, ctx.num_classes, ctx.recipe.data.batch_size
    callbacks = stage_callbacks(history_path, 1, recipe.frozen.early_stopping, backup_dir, extra_callbacks)
    if features is not None:
        model = tm.head
        train = features_dataset(features.train_x, features.train_y, n, bs, True, recipe.seed)
        val = features_dataset(features.val_x, features.val_y, n, bs, False, None)
    else:
        model = tm.model
        augment = augmentation_layer(recipe.augment, seed=recipe.seed)
        train, val = ctx.images(ctx.split.train, True, augment), ctx.images(ctx.split.val, False)
    compile_model(model, recipe.frozen.optimizer, recipe.frozen.learning_rate, recipe.train.label_smoothing,
                  jit_compile=ctx.jit_compile)
    return fit_stage(model, train, val, recipe.frozen.epochs, callbacks, ctx.class_weight(), verbose=ctx.verbose)


def run_stage2(ctx: TrainingContext, tm, history_path=None, backup_dir=None, extra_callbacks=()):
    """Unfreeze the backbone's top layers and train the whole model on augmented images. Returns the History."""
    recipe = ctx.recipe
    trainable = set_fine_tune_layers(tm.backbone, recipe.fine_tune.unfreeze, freeze_batchnorm=ctx.pretrained)
    if ctx.verbose:
        ctx.log(f"Stage 2: {trainable} backbone layers unfrozen, up to {recipe.fine_tune.epochs} epochs at "
                f"learning rate {recipe.fine_tune.learning_rate:g}"
                + (" (cosine decay)." if recipe.fine_tune.schedule == "cosine" else "."))
    compile_model(tm.model, recipe.fine_tune.optimizer, recipe.fine_tune.learning_rate,
                  recipe.train.label_smoothing, jit_compile=ctx.jit_compile)
    schedule = learning_rate_callback(recipe.fine_tune.learning_rate, recipe.fine_tune.schedule,
                                      recipe.fine_tune.epochs)
    callbacks = stage_callbacks(history_path, 2, recipe.fine_tune.early_stopping, backup_dir,
                                ([schedule] if schedule else []) + list(extra_callbacks))
    augment = augmentation_layer(recipe.augment, seed=recipe.seed)
    try:
        return fit_stage(tm.model, ctx.images(ctx.split.train, True, augment), ctx.images(ctx.split.val, False),
                         recipe.fine_tune.epochs, callbacks, ctx.class_weight(), verbose=ctx.verbose)
    finally:
        tm.backbone.trainable = False


def prepare_runtime(recipe: Recipe):
    """A fresh Keras session seeded from the recipe, with its precision and strategy: (strategy, jit_compile)."""
    import keras
    import tensorflow as tf

    # Keras warns about things tltool does on purpose (shuffling inside tf.data; datasets whose length is
    # unknown until the first epoch ends, because unreadable files are filtered out).
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed")
    warnings.filterwarnings("ignore", message=r"Your input ran out of data")
    keras.backend.clear_session()
    keras.utils.set_random_seed(recipe.seed)
    if recipe.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    _configure_precision(recipe, gpus)
    if recipe.train.xla and not gpus:
        warnings.warn("train.xla is ignored: no GPU is visible.", UserWarning, stacklevel=2)
    return _strategy(recipe, gpus), bool(recipe.train.xla and gpus)


def train_stages(ctx: TrainingContext, tm, strategy, spec, weights, features: StageFeatures | None = None,
                 progress: "RunProgress | None" = None, run_dir: Path | None = None, extra_callbacks=(),
                 tensorboard: bool = False) -> dict:
    """Stage 1 then stage 2 of `ctx.recipe` on `tm`: the training of `finetune` and of every `tune` trial.

    Args:
        ctx: recipe, data and settings.
        tm: the TransferModel to train (a head-only one when `features` is given and stage 2 is off).
        strategy: the distribution strategy models were built under.
        spec, weights: the backbone's spec and resolved weights (for the feature cache's key).
        features: stage-1 features computed beforehand (tune computes them once per search); None
            computes them here when `frozen.cache_features` is on.
        progress: resume state of a run directory; stages it lists as done are skipped.
        run_dir: where history.csv (and TensorBoard logs) go; None for none.
        extra_callbacks: more Keras callbacks for both stages.
        tensorboard: log both stages under RUN/tb.

    Returns:
        timings: features_s, feature_images, stage1_s, stage2_s.
    """
    recipe = ctx.recipe
    history_path = Path(run_dir) / rundir.HISTORY_FILE if run_dir is not None else None
    timings = dict(progress.state.get("timings", {}) if progress else {})
    for key, zero in (("features_s", 0.0), ("feature_images", 0), ("stage1_s", 0.0), ("stage2_s", 0.0)):
        timings.setdefault(key, zero)

    def callbacks(stage: int) -> list:
        return list(extra_callbacks) + (_tensorboard(tensorboard, run_dir, stage) if run_dir else [])

    if recipe.frozen.epochs > 0 and not (progress and progress.done(1)):
        if ctx.verbose:
            ctx.log(f"Stage 1: frozen backbone, training the head for up to {recipe.frozen.epochs} epochs.")
        if progress:
            progress.trim_history(1, history_path)
        t0 = time.perf_counter()
        with strategy.scope():
            if features is None and recipe.frozen.cache_features:
                features = stage1_features(ctx, tm.feature_extractor, spec, weights.fingerprint)
                timings["features_s"] = round(features.seconds, 3)
                timings["feature_images"] = features.computed
            run_stage1(ctx, tm, features, history_path, progress.backup_dir(1) if progress else None,
                       callbacks(1))
        timings["stage1_s"] = round(timings["stage1_s"] + time.perf_counter() - t0, 3)
        if progress:
            progress.finish_stage(1, tm.model, timings)

    if recipe.fine_tune.epochs > 0 and not (progress and progress.done(2)):
        if progress:
            progress.trim_history(2, history_path)
        t0 = time.perf_counter()
        with strategy.scope():
            run_stage2(ctx, tm, history_path, progress.backup_dir(2) if progress else None, callbacks(2))
        timings["stage2_s"] = round(timings["stage2_s"] + time.perf_counter() - t0, 3)
        if progress:
            progress.finish_stage(2, tm.model, timings)
    return timings


def finetune(recipe=None, *, data=None, val_data=None, test_data=None, backbone=None, weights=None,
             image_size=None, epochs=None, fine_tune_epochs=None, batch_size=None, seed=None, out=None,
             overrides=(), force=False, resume=False, verbose: int = 1, log=print,
             tensorboard: bool = False) -> FinetuneResult:
    """Fine-tune a pretrained backbone on an image folder and write a run directory.

    Args:
        recipe: path of a YAML recipe, a `Recipe`, or None for the defaults.
        data, val_data, test_data: image folders (one sub-folder per class); override the recipe's.
        backbone, weights, image_size, epochs, fine_tune_epochs, batch_size, seed: override the recipe.
            `epochs` is stage 1 (frozen backbone), `fine_tune_epochs` stage 2 (0 skips it).
        out: run directory; default runs/NAME-TIMESTAMP. Must be new or empty unless `force` or `resume`.
        overrides: `dotted.key=value` strings, as `--set`.
        force: overwrite a non-empty `out`.
        resume: continue the interrupted run in `out` from its last finished epoch, with the settings
            of its recipe.yaml (no other recipe argument may be given).
        verbose: 0 silent, 1 progress bars and messages.
        log: where messages go.
        tensorboard: also log both stages for TensorBoard under RUN/tb/stage1 and RUN/tb/stage2.

    Returns:
        FinetuneResult with the run directory and the summary written to its summary.json.
    """
    t_start = time.perf_counter()
    if resume:
        run_dir = _check_resumable(out, recipe, dict(data=data, val_data=val_data, test_data=test_data,
                                                      backbone=backbone, weights=weights, image_size=image_size,
                                                      epochs=epochs, fine_tune_epochs=fine_tune_epochs,
                                                      batch_size=batch_size, seed=seed, overrides=overrides,
                                                      force=force))
        recipe = load_recipe(run_dir / rundir.RECIPE_FILE)
    else:
        recipe = resolve_recipe(recipe, data=data, val_data=val_data, test_data=test_data, backbone=backbone,
                                weights=weights, image_size=image_size, epochs=epochs,
                                fine_tune_epochs=fine_tune_epochs, batch_size=batch_size, seed=seed,
                                overrides=overrides)
        run_dir = Path(out) if out else Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    say = log if verbose else (lambda *a, **k: None)
    spec = get_backbone_spec(recipe.backbone.name)
    size = recipe.data.image_size or spec.default_size
    check_image_size(spec, size)
    require_training_data(recipe)
    rundir.check_output_dir(run_dir, force, resume, resumable=True)  # before any heavy work
    # Weights before data: an offline machine must learn at once that it cannot get them.
    resolved_weights = resolve_weights(spec, recipe.backbone.weights, recipe.backbone.fallback,
                                       classic=recipe.head.mode == "classic", image_size=size)
    split = load_split_data(recipe)
    run_dir = rundir.prepare_output_dir(run_dir, force=force, resume=resume, resumable=True)
    classes = split.train.classes
    say(f"tltool: {spec.name} at {size}px, {len(classes)} classes, {len(split.train)} training / "
        f"{len(split.val)} validation" + (f" / {len(split.test)} test" if split.test else "") + " images. "
        f"Run directory: {run_dir}")
    if len(split.skips):
        say(f"Skipping {len(split.skips)} unreadable file(s); see skipped_files in summary.json.")

    import keras

    strategy, jit = prepare_runtime(recipe)
    ctx = TrainingContext(recipe, split, size, resolved_weights.pretrained, verbose, say, jit_compile=jit)
    with strategy.scope():
        tm = build_transfer_model(spec, resolved_weights, len(classes), size, recipe.head, seed=recipe.seed)
    if not resume:
        save_recipe(recipe, run_dir / rundir.RECIPE_FILE)
        rundir.write_labels(run_dir, classes)
    progress = RunProgress(run_dir)
    if resume:
        progress.restore(tm.model, say)
    timings = train_stages(ctx, tm, strategy, spec, resolved_weights, progress=progress, run_dir=run_dir,
                           tensorboard=tensorboard)

    # ---- evaluation of the full image-level model: one prediction pass gives the summary and the report
    t0 = time.perf_counter()
    from tltool.evaluation.metrics import evaluate_run_sets

    eval_sets, probes = evaluate_run_sets(tm.model, classes, {"val": split.val, "test": split.test}, split.skips)
    by_key = {s.key.rstrip("_"): s.metrics for s in eval_sets}
    val_acc, val_loss = by_key["val"]["accuracy"], by_key["val"]["log_loss"]
    test_acc = by_key["test"]["accuracy"] if "test" in by_key else None
    test_loss = by_key["test"]["log_loss"] if "test" in by_key else None
    timings["evaluate_s"] = round(time.perf_counter() - t0, 3)
    # Saved uncompiled (a fresh functional wrapper over the same layers): users load it for inference or
    # their own training, and a stale optimizer state would only cause warnings on load.
    rundir.atomic_save_model(keras.Model(tm.model.inputs, tm.model.outputs, name=tm.model.name),
                             run_dir / rundir.MODEL_FILE)
    timings["total_s"] = round(progress.elapsed_before + time.perf_counter() - t_start, 3)

    # Files found broken only while decoding (a truncated JPEG passes the header check) are not counted.
    used = SplitData(split.train.without(split.skips), split.val.without(split.skips),
                     split.test.without(split.skips) if split.test else None, split.skips)
    summary = {
        "name": recipe.name,
        "backbone": spec.name,
        "weights": recipe.backbone.weights if not resolved_weights.fell_back else "none (fallback)",
        "image_size": size,
        "classes": classes,
        "num_classes": len(classes),
        "images": {"train": len(used.train), "val": len(used.val),
                   "test": len(used.test) if used.test else None},
        "class_counts": {"train": used.train.counts(), "val": used.val.counts(),
                         "test": used.test.counts() if used.test else None},
        "val_accuracy": round(float(val_acc), 6),
        "val_loss": round(float(val_loss), 6),
        "test_accuracy": None if test_acc is None else round(float(test_acc), 6),
        "test_loss": None if test_loss is None else round(float(test_loss), 6),
        "skipped_files": split.skips.as_list(),
        "timings": timings,
        "resumed": bool(resume),
        "versions": _versions(),
    }
    rundir.atomic_write_json(run_dir / rundir.SUMMARY_FILE, summary)
    _write_report(run_dir, eval_sets, probes, classes, say)
    progress.finish_run()
    say(f"Done in {timings['total_s']:.1f}s: val_accuracy {val_acc:.4f}"
        + (f", test_accuracy {test_acc:.4f}" if test_acc is not None else "")
        + (f"; {len(split.skips)} unreadable file(s) skipped" if len(split.skips) else "")
        + f". Run directory: {run_dir}")
    return FinetuneResult(run_dir, summary, tm.model, tm)


def _tensorboard(enabled: bool, run_dir: Path, stage: int) -> list:
    import keras

    return [keras.callbacks.TensorBoard(str(run_dir / "tb" / f"stage{stage}"))] if enabled else []


def _write_report(run_dir: Path, eval_sets, probes, classes, say) -> None:
    """metrics.json, plots/ and report.html; a failure only warns, since the run itself is complete by now."""
    from tltool.evaluation.metrics import write_run_report

    try:
        t0 = time.perf_counter()
        write_run_report(run_dir, eval_sets, probes, classes)
        say(f"Report ({time.perf_counter() - t0:.1f}s): {run_dir / 'report.html'}")
    except Exception as exc:  # noqa: BLE001 - a report bug must not cost a finished training run
        warnings.warn(f"The run report could not be written ({type(exc).__name__}: {exc}). Write it with "
                      f"`tltool evaluate {run_dir} --data DIR`.", UserWarning, stacklevel=2)


def _check_resumable(out, recipe, other_args: dict) -> Path:
    if out is None:
        raise RecipeError("--resume needs --out: the run directory of the interrupted run.")
    given = [name for name, value in other_args.items() if value not in (None, (), [], False)]
    if recipe is not None or given:
        flags = {"overrides": "--set", "epochs": "--epochs", "fine_tune_epochs": "--fine-tune-epochs"}
        names = ", ".join(["RECIPE"] * (recipe is not None)
                          + [flags.get(n, f"--{n.replace('_', '-')}") for n in given])
        raise RecipeError(f"--resume continues a run with the settings saved in its recipe.yaml; drop {names}.")
    run_dir = Path(out)
    if not (run_dir / rundir.RECIPE_FILE).is_file():
        raise RunDirError(f"Nothing to resume in {run_dir}: it has no recipe.yaml. Start a new run instead.")
    if (run_dir / rundir.SUMMARY_FILE).is_file() and RunProgress(run_dir).state.get("finished"):
        raise RunDirError(f"The run in {run_dir} has already finished; nothing to resume.")
    return run_dir


class RunProgress:
    """Which stages of a run are done, kept in RUN/checkpoints/state.json so that `--resume` can continue.

    Within a stage, Keras's BackupAndRestore keeps the last finished epoch (weights and optimizer state);
    after a stage, the full model's weights are saved, so a resumed run never trains an epoch twice.
    """

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "checkpoints"
        path = self.dir / "state.json"
        self.state = json.loads(path.read_text()) if path.is_file() else {"stages_done": []}
        self._t0 = time.perf_counter()
        #: seconds spent on this run before this process started (earlier, interrupted attempts)
        self.elapsed_before = self.state.get("elapsed_s", 0.0)

    def done(self, stage: int) -> bool:
        return stage in self.state["stages_done"]

    def backup_dir(self, stage: int) -> Path:
        return self.dir / f"stage{stage}"

    def restore(self, model, say) -> None:
        weights = self.dir / "after_stage.weights.h5"
        if self.state["stages_done"] and weights.is_file():
            model.load_weights(weights)
        last = self.state["stages_done"][-1] if self.state["stages_done"] else 0
        say(f"Resuming: stage(s) {self.state['stages_done'] or 'none'} done; continuing from stage {last + 1}.")

    def trim_history(self, stage: int, history_path: Path) -> None:
        """Drop history rows of `stage` after the epoch its backup holds, so no epoch appears twice."""
        from tltool.engine.callbacks import HISTORY_COLUMNS, read_history

        meta = self.backup_dir(stage) / "training_metadata.json"
        kept_epochs = json.loads(meta.read_text())["epoch"] if meta.is_file() else 0
        rows = read_history(history_path)
        keep = [r for r in rows if r["stage"] < stage or (r["stage"] == stage and r["epoch"] <= kept_epochs)]
        if len(keep) != len(rows):
            lines = [",".join(HISTORY_COLUMNS)]
            lines += [",".join("" if r.get(c) is None else str(r[c]) for c in HISTORY_COLUMNS) for r in keep]
            rundir.atomic_write_text(history_path, "\n".join(lines) + "\n")

    def finish_stage(self, stage: int, model, timings: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / ".after_stage.tmp.weights.h5"
        model.save_weights(tmp)
        os.replace(tmp, self.dir / "after_stage.weights.h5")
        self.state["stages_done"].append(stage)
        self.state["timings"] = timings
        self._save()
        shutil.rmtree(self.backup_dir(stage), ignore_errors=True)

    def finish_run(self) -> None:
        self.state["finished"] = True
        self._save()
        for path in self.dir.glob("*.weights.h5"):
            path.unlink()

    def _save(self) -> None:
        self.state["elapsed_s"] = round(self.elapsed_before + time.perf_counter() - self._t0, 3)
        rundir.atomic_write_json(self.dir / "state.json", self.state)


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
