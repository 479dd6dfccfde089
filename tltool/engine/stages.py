"""The two training stages, shared by `finetune` and every `tune` trial.

Stage 1 trains the head with the backbone frozen, on cached backbone features (see features.py) or on
images. Stage 2 unfreezes the backbone's top layers and trains the whole model on augmented images at a
low learning rate, starting from the stage-1 head. `train_stages` runs both, skipping what a resumed
run's `RunProgress` lists as done.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from tltool import rundir
from tltool.data.folders import ImageFolder, balanced_class_weights
from tltool.data.pipelines import DecodedImages, augmentation_layer, image_dataset
from tltool.engine.activations import CutModels, PooledRows, activation_megabytes, split_at_cut
from tltool.engine.decisions import L2Decision, decide_flip, decide_l2, decide_views
from tltool.engine.feature_layer import POOLED
from tltool.engine.features import (FeatureCache, augmentation_key, cache_dir, cached_features, extractor_key,
                                   views_by_image)
from tltool.engine.fitting import (compile_model, features_dataset, fit_stage, learning_rate_callback,
                                   stage_callbacks)
from tltool.engine.history import read_history
from tltool.engine.progress import RunProgress
from tltool.engine.setup import RunSetup, Runtime
from tltool.models.transfer import (TransferModel, build_transfer_model, center_head, fine_tune_cut,
                                    reads_top_globally, set_classifier_l2, set_fine_tune_layers)


@dataclass
class StageFeatures:
    """Stage 1's cached features: of the training images [N, views, D] (view 0 the plain image, the others
    augmented) and of the validation images [M, D]."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    seconds: float
    computed: int
    train_acts: np.ndarray | None = None  # the activations at stage 2's cut they came from, when cached
    val_acts: np.ndarray | None = None
    cut: str = ""  # the layer those activations were taken at
    val_rows: np.ndarray | None = None  # each validation row's image: an index into the split's val paths

    @property
    def width(self) -> int:
        return self.train_x.shape[-1]


#: Feature extractions a run spends on augmented views when the recipe leaves `frozen.feature_views` to
#: tltool: about this many training images in all, at most MAX_AUTO_VIEWS views of each.
AUTO_VIEW_IMAGES = 1000
MAX_AUTO_VIEWS = 8


def feature_views(recipe, train_images: int, augment) -> int:
    """How many augmented views of each training image stage 1 caches: the recipe's number, or (null) as
    many as the data size calls for, so that small datasets get the augmentation they need most."""
    if augment is None:
        return 0
    if recipe.frozen.feature_views is not None:
        return recipe.frozen.feature_views
    return int(min(MAX_AUTO_VIEWS, max(1, round(AUTO_VIEW_IMAGES / max(1, train_images)))))


@dataclass
class TrainingContext:
    """Everything the stages need besides the model: shared by `finetune` and `tune` trials."""

    setup: RunSetup
    runtime: Runtime
    verbose: int = 1
    log: object = print
    #: what the run measured instead of taking it from the recipe (see decisions.py), one line each
    decisions: list = field(default_factory=list)
    #: the cached features (and activations) the stages trained on, for what is fitted after training
    features: "StageFeatures | None" = None
    #: the history row (stage, epoch, loss, val_loss, val_accuracy, ...) of the epoch whose weights the model
    #: ended training with; None when no epoch was validated
    kept_epoch: dict | None = None
    #: rows of the plain training images the layer measurement computed, for stage 1 (see feature_layer.py):
    #: "pooled" or a stage-2 cut -> (the images' cache keys, rows)
    probe_rows: dict = field(default_factory=dict)
    #: the training images decoded by the passes over them so far (the layer measurement's, the mirror
    #: images'), for the next passes (the augmented views); emptied once stage 1's features are computed
    decoded: DecodedImages = field(default_factory=DecodedImages)
    #: the backbone network the layer measurement built, for the run's model (see `build_model`)
    probe_network: object = None
    _shard: object = field(default=None, repr=False)

    @property
    def recipe(self):
        return self.setup.recipe

    @property
    def cluster(self):
        """The workers of a multi-worker run (see cluster.py), or None."""
        return self.runtime.cluster

    @property
    def split(self):
        """The images this process trains on: all of them, or this worker's shard in a multi-worker run."""
        if self.cluster is None:
            return self.setup.split
        if self._shard is None:
            self._shard = self.cluster.shard_split(self.setup.split)
        return self._shard

    def images_per_worker(self, folder: ImageFolder) -> int:
        """The most images of `folder` one worker trains on (all of them on one machine): what sizes are
        decided by, the same on every worker."""
        workers = self.cluster.num_workers if self.cluster is not None else 1
        return -(-len(folder) // workers)

    def batches(self, rows: int) -> int:
        return -(-rows // self.recipe.data.batch_size)

    @property
    def num_classes(self) -> int:
        return len(self.setup.classes)

    def images(self, folder: ImageFolder, training: bool, augment=None):
        return image_dataset(folder.paths, folder.labels, self.setup.image_size, self.recipe.data.batch_size,
                             self.split.skips, self.num_classes, shuffle=training, seed=self.recipe.seed,
                             augment=augment if training else None)

    def class_weight(self):
        if self.recipe.train.class_weights != "auto":
            return None
        return balanced_class_weights(self.setup.split.train.labels, self.num_classes)  # all workers' images

    def compile(self, model, stage_cfg) -> None:
        compile_model(model, stage_cfg.optimizer, stage_cfg.learning_rate, self.recipe.train.label_smoothing,
                      jit_compile=self.runtime.jit_compile)

    def cut_models(self, tm, cut: str) -> CutModels:
        """`tm` split at `cut`, for stage 2 on the activations there (tune's trials reuse theirs)."""
        return split_at_cut(tm, cut)


def build_model(setup: RunSetup, runtime: Runtime, network=None) -> TransferModel:
    """The run's backbone with its weights and a fresh head, built under the run's strategy. `network`: the
    backbone the layer measurement built (`TrainingContext.probe_network`), taken instead of building it
    again where the strategy is the default one (another's variables must be made under its scope)."""
    import tensorflow as tf

    if network is not None and runtime.strategy is not tf.distribute.get_strategy():
        network = None
    with runtime.strategy.scope():
        return build_transfer_model(setup.spec, setup.weights, len(setup.classes), setup.image_size,
                                    setup.recipe.head, seed=setup.recipe.seed, network=network)


def stage1_features(ctx: TrainingContext, extractor) -> StageFeatures:
    """Pooled features of the training images (and their augmented views) and of the validation images, from
    the on-disk cache where possible."""
    return _extract(ctx, extractor)


def cut_features(ctx: TrainingContext, cut: CutModels) -> StageFeatures:
    """Activations at stage 2's cut (cached like features), and stage 1's pooled features computed from them."""
    pooled_rows = PooledRows(cut.features)

    def pooled(activations):
        with ctx.runtime.strategy.scope():
            return pooled_rows(activations)

    acts = _extract(ctx, cut.extractor, cut.cut, pooled)
    return replace(acts, train_x=pooled(acts.train_x), val_x=pooled(acts.val_x), train_acts=acts.train_x,
                   val_acts=acts.val_x, cut=cut.cut)


def weights_identity(setup: RunSetup) -> str:
    """What decides the backbone's weights, for the feature cache's key: the weights' fingerprint, and for
    a random backbone (`weights: none`, or the fallback) the seed it was drawn with as well, since two seeds
    give two different networks."""
    if setup.pretrained:
        return setup.weights.fingerprint
    return f"{setup.weights.fingerprint}:seed={setup.recipe.seed}"


def _extract(ctx: TrainingContext, extractor, cut: str = "", to_features=lambda rows: rows) -> StageFeatures:
    """Rows of `extractor` for the training images [N, views, D] and the validation images [M, D] (as the
    StageFeatures' train_x and val_x), with their labels, the seconds spent computing, the images computed
    (not read from the cache) and the validation rows' images. `to_features` turns rows into pooled
    features, for the measured decisions."""
    recipe, setup, split = ctx.recipe, ctx.setup, ctx.split
    entry = cache_dir(recipe.train.cache_dir) / extractor_key(
        setup.spec.name, weights_identity(setup), setup.image_size, setup.spec.preprocessing, recipe.head.mode,
        recipe.head.pooling, cut, reads=_reads(recipe.head))
    with FeatureCache(entry) as cache:  # locked against `cache clear` while in use
        _add_probe_rows(ctx, cache, cut)
        common = dict(image_size=setup.image_size, batch_size=recipe.data.batch_size, skips=split.skips,
                      verbose=ctx.verbose, log=ctx.log, jit_compile=ctx.runtime.jit_compile)
        spent = [0.0, 0]
        if recipe.augment.flip == "auto":
            spent = _measure_flip(ctx, extractor, cache, common, to_features)
        augment = augmentation_layer(recipe.augment, seed=recipe.seed)
        total = len(setup.split.train)  # every worker's images: the views depend on the data, not the shard
        views = feature_views(recipe, total, augment)
        mirror_first = recipe.augment.flip in ("horizontal", "horizontal_and_vertical")
        if ctx.verbose and views and recipe.frozen.feature_views is None:
            ctx.log(f"Stage 1 caches {views} augmented view(s) of each training image (frozen.feature_views: "
                    f"null = about {AUTO_VIEW_IMAGES} extractions for {total} images, at most "
                    f"{MAX_AUTO_VIEWS})" + (", the first the mirror image." if mirror_first else "."))
        train_x, train_rows, s1 = cached_features(extractor, cache, split.train.paths, views=views, augment=augment,
                                                  augment_key=augmentation_key(recipe), mirror_first=mirror_first,
                                                  decoded=ctx.decoded, **common)
        ctx.decoded.clear()  # every pass over the training images is done
        train_x, train_images = views_by_image(train_x, train_rows, s1.rows_per_view)
        train_y = np.asarray(split.train.labels)[train_images]
        _warn_if_all_alike(setup, train_x[:, 0])
        why_not = _l2_not_measurable(ctx) if recipe.head.l2 is None else ""
        if why_not:  # settled before any features are computed for it
            _settle_l2(ctx, L2Decision(0.0, {}, why_not))
        measure_views = views and recipe.frozen.feature_views is None
        if measure_views or recipe.head.l2 is None:
            # Every worker's features, gathered once for all the decisions.
            features, labels = _every_workers(ctx, to_features(train_x), train_y)
            if measure_views and not _measure_views(ctx, features, labels):
                train_x, features = train_x[:, :1], features[:, :1]
            if recipe.head.l2 is None:
                views_x = features[:, 1:] if features.shape[1] > 1 else None
                _settle_l2(ctx, decide_l2(features[:, 0], views_x, labels, recipe.seed))
        val_x, val_rows, s2 = cached_features(extractor, cache, split.val.paths, **common)
        return StageFeatures(train_x, train_y, val_x, np.asarray(split.val.labels)[val_rows],
                             spent[0] + s1.seconds + s2.seconds, spent[1] + s1.computed + s2.computed,
                             val_rows=val_rows)


def _warn_if_all_alike(setup: RunSetup, rows: np.ndarray) -> None:
    """Say so when the backbone gives every training image the same (stored) features: no head can learn
    from them. A random backbone does this (`weights: none`: its features shrink to about 1e-12 through
    its BatchNorm layers, zero once stored as float16)."""
    if len(rows) < 2 or not np.all(rows == rows[:1]):
        return
    why = (" Its weights are random (weights: none), and an untrained backbone's features vanish."
           if not setup.pretrained else "")
    warnings.warn(f"The backbone gives every training image the same features, so the model cannot learn to "
                  f"tell the classes apart.{why} Train with pretrained weights: --weights imagenet, or a "
                  f"weights file.", UserWarning, stacklevel=2)


def _add_probe_rows(ctx: TrainingContext, cache: FeatureCache, cut: str) -> None:
    """The plain training images' rows the layer measurement computed (the activations at `cut`, or with no
    cut the features the head reads), added to `cache` so that they are not computed again."""
    found = ctx.probe_rows.pop(cut or POOLED, None)
    ctx.probe_rows.clear()  # the other cuts' rows are of no further use: free their memory
    if found is None:
        return
    keys, rows = found
    new = [i for i, key in enumerate(keys) if key not in cache]
    if new:
        cache.add([keys[i] for i in new], rows[new])


def _reads(head) -> str:
    """Where the head reads the backbone, for the feature cache's key ("" for the top read globally)."""
    return "" if head.mode != "pooled" or reads_top_globally(head) else f"{head.layer}:{head.grid or 1}"


def _measure_views(ctx: TrainingContext, features: np.ndarray, labels: np.ndarray) -> bool:
    """Resolve `frozen.feature_views: null` on every worker's training features [N, views, D] (see
    decisions.py): the recipe gets the number kept (0 when the augmented views hurt), the context a line
    saying why. Returns whether stage 1 trains on the views (else on the plain images' rows alone)."""
    decision = decide_views(features[:, 0], features[:, 1:], labels, ctx.recipe.seed)
    keep = _the_chiefs(ctx, decision.keep)
    ctx.recipe.frozen.feature_views = decision.views if keep else 0
    ctx.decisions.append(decision.describe())
    if ctx.verbose:
        ctx.log(f"Measured {ctx.decisions[-1]}.")
    return keep


def _l2_not_measurable(ctx: TrainingContext) -> str:
    """Why `head.l2: null` cannot be measured for this run ("" when it can; see decisions.decide_l2)."""
    head = ctx.recipe.head
    if not ctx.setup.pretrained:
        return "not measured on a random backbone, whose features say little of those it will learn"
    if head.mode != "pooled" or not head.normalize or head.dense:
        return ("not measured for a head with hidden layers or unnormalised features: the measurement scores "
                "a linear classifier on normalised ones")
    return ""


def _settle_l2(ctx: TrainingContext, decision: L2Decision) -> None:
    """Resolve `head.l2: null`: the recipe gets the chief's penalty, the context a line saying why."""
    ctx.recipe.head.l2 = _the_chiefs(ctx, decision.l2)
    ctx.decisions.append(decision.describe())
    if ctx.verbose:
        ctx.log(f"Measured {ctx.decisions[-1]}.")


def _every_workers(ctx: TrainingContext, *arrays):
    """`arrays` (rows of this worker's images) with every worker's rows, for a decision on all the data."""
    if ctx.cluster is None:
        return arrays
    return tuple(ctx.cluster.gather_rows(np.asarray(a)) for a in arrays)


def _the_chiefs(ctx: TrainingContext, choice):
    """The chief's `choice`, on every worker (the same data give the same choice; rounding across hosts
    may not, and workers that train different recipes never meet again)."""
    return choice if ctx.cluster is None else type(choice)(ctx.cluster.broadcast_number(float(choice)))


def _measure_flip(ctx: TrainingContext, extractor, cache, common: dict, to_features) -> list:
    """Resolve `augment.flip: auto` on the training images (see decisions.py): the recipe gets the measured
    value, the context a line saying why. Returns [seconds, images] spent computing the mirrored view."""
    recipe, split = ctx.recipe, ctx.split
    if ctx.verbose:
        ctx.log("Measuring whether mirrored images help (augment.flip: auto).")
    rows, index, stats = cached_features(extractor, cache, split.train.paths, views=1, mirror_first=True,
                                         decoded=ctx.decoded, **common)
    rows, images = views_by_image(rows, index, stats.rows_per_view)
    features, labels = _every_workers(ctx, to_features(rows), np.asarray(split.train.labels)[images])
    decision = decide_flip(features[:, 0], features[:, 1], labels, recipe.seed)
    recipe.augment.flip = "horizontal" if _the_chiefs(ctx, decision.keep) else "none"
    ctx.decisions.append(decision.describe("horizontal"))
    if ctx.verbose:
        ctx.log(f"Measured {ctx.decisions[-1]}.")
    return [stats.seconds, stats.computed]


def activation_cut(ctx: TrainingContext, tm, blocks: int | None = None) -> CutModels | None:
    """The split of the backbone that lets stage 2 train on cached activations (with the recipe's blocks
    unfrozen, or `blocks`), or None (with the reason in the log) when it streams images instead."""
    recipe = ctx.recipe
    if recipe.fine_tune.epochs == 0 or not recipe.frozen.cache_features:
        return None
    blocks = recipe.fine_tune.unfreeze if blocks is None else blocks
    cut, _, _ = fine_tune_cut(tm.backbone, ctx.setup.spec, blocks)
    budget = recipe.fine_tune.activation_budget_mb
    reason = None
    if cut is None:
        reason = "it unfreezes the whole backbone"
    elif budget == 0:
        reason = "fine_tune.activation_budget_mb is 0 (fresh augmentation on every step)"
    else:
        cut_models = split_at_cut(tm, cut)
        full = ctx.setup.split
        views = feature_views(recipe, len(full.train), augmentation_layer(recipe.augment, seed=recipe.seed))
        size = activation_megabytes(cut_models.width, ctx.images_per_worker(full.train), views,
                                    ctx.images_per_worker(full.val))
        if size <= budget:
            return cut_models
        reason = (f"the activations at {cut} would take {size:.0f} MB (fine_tune.activation_budget_mb: "
                  f"{budget:g})")
    if ctx.verbose:
        ctx.log(f"Stage 2 will stream images: {reason}.")
    return None


def run_stage1(ctx: TrainingContext, tm, features: StageFeatures | None, history_path=None, backup_dir=None,
               extra_callbacks=()):
    """Train the head with the backbone frozen: on `features` if given, else on images. Returns the History."""
    recipe, n, bs = ctx.recipe, ctx.num_classes, ctx.recipe.data.batch_size
    callbacks = stage_callbacks(history_path, 1, recipe.frozen.early_stopping, backup_dir, extra_callbacks)
    if features is not None:
        _center_the_head(ctx, tm, features)
        model = tm.head
        train = features_dataset(features.train_x, features.train_y, n, bs, True, recipe.seed)
        val = features_dataset(features.val_x, features.val_y, n, bs, False, None)
        rows = (len(features.train_y), len(features.val_y))
    else:
        model = tm.model
        augment = augmentation_layer(recipe.augment, seed=recipe.seed)
        train, val = ctx.images(ctx.split.train, True, augment), ctx.images(ctx.split.val, False)
        rows = (len(ctx.split.train), len(ctx.split.val))
    set_classifier_l2(tm.head, recipe.head.l2)
    ctx.compile(model, recipe.frozen)
    return fit_stage(model, train, val, recipe.frozen.epochs, callbacks, ctx.class_weight(), verbose=ctx.verbose,
                     cluster=ctx.cluster, batches=tuple(ctx.batches(r) for r in rows))


def _center_the_head(ctx: TrainingContext, tm, features: StageFeatures) -> None:
    """Centre the head's input on the plain training images' features (every worker's, so that all agree).
    Heads on streamed images keep a zero centre: their features are never all at hand."""
    plain, = _every_workers(ctx, features.train_x[:, 0] if features.train_x.ndim == 3 else features.train_x)
    center_head(tm.head, plain)


def run_stage2(ctx: TrainingContext, tm, cut: CutModels | None = None, features: StageFeatures | None = None,
               history_path=None, backup_dir=None, extra_callbacks=()):
    """Unfreeze the backbone's top blocks and train them with the head: on the cached activations at `cut`
    (with `features` holding them), else on augmented images streamed through the whole model."""
    recipe, stage = ctx.recipe, ctx.recipe.fine_tune
    unfrozen = set_fine_tune_layers(tm.backbone, ctx.setup.spec, stage.unfreeze, freeze_batchnorm=ctx.setup.pretrained)
    if ctx.verbose:
        ctx.log(f"Stage 2: {unfrozen.describe()}, up to {stage.epochs} epochs at learning rate "
                f"{stage.learning_rate:g}" + (" (cosine decay)" if stage.schedule == "cosine" else "")
                + (", on cached activations." if cut is not None else ", on images."))
    schedule = learning_rate_callback(stage.learning_rate, stage.schedule, stage.epochs)
    callbacks = stage_callbacks(history_path, 2, stage.early_stopping, backup_dir,
                                ([schedule] if schedule else []) + list(extra_callbacks))
    if cut is not None:
        model, n, bs = cut.trainable, ctx.num_classes, recipe.data.batch_size
        train = features_dataset(features.train_acts, features.train_y, n, bs, True, recipe.seed)
        val = features_dataset(features.val_acts, features.val_y, n, bs, False, None)
        rows = (len(features.train_y), len(features.val_y))
    else:
        model, augment = tm.model, augmentation_layer(recipe.augment, seed=recipe.seed)
        train, val = ctx.images(ctx.split.train, True, augment), ctx.images(ctx.split.val, False)
        rows = (len(ctx.split.train), len(ctx.split.val))
    set_classifier_l2(tm.head, recipe.head.l2)
    ctx.compile(model, stage)
    try:
        return fit_stage(model, train, val, stage.epochs, callbacks, ctx.class_weight(), verbose=ctx.verbose,
                         cluster=ctx.cluster, batches=tuple(ctx.batches(r) for r in rows))
    finally:
        tm.backbone.trainable = False


def train_stages(ctx: TrainingContext, tm, features: StageFeatures | None = None,
                 progress: RunProgress | None = None, run_dir: Path | None = None, extra_callbacks=(),
                 tensorboard: bool = False) -> dict:
    """Stage 1 then stage 2 of `ctx.recipe` on `tm`: the training of `finetune` and of every `tune` trial.

    Args:
        ctx: the run's setup, runtime and messages.
        tm: the TransferModel to train (a head-only one when `features` is given and stage 2 is off).
        features: stage-1 features computed beforehand (tune computes them once per search), with the
            activations at stage 2's cut when they hold some; None computes them here when
            `frozen.cache_features` is on.
        progress: resume state of a run directory; stages it lists as done are skipped.
        run_dir: where history.csv (and TensorBoard logs) go; None for none.
        extra_callbacks: more Keras callbacks for both stages.
        tensorboard: log both stages under RUN/tb.

    Returns:
        timings: features_s, feature_images, stage1_s, stage2_s.
    """
    recipe = ctx.recipe
    history_path = Path(run_dir) / rundir.HISTORY_FILE if run_dir is not None else None
    timings = {"features_s": 0.0, "feature_images": 0, "stage1_s": 0.0, "stage2_s": 0.0,
               **(progress.timings if progress else {})}

    def callbacks(stage: int) -> list:
        return list(extra_callbacks) + (_tensorboard(run_dir, stage) if run_dir and tensorboard else [])

    def start(stage: int) -> float:
        if progress:
            progress.trim_history(stage, history_path)
        return time.perf_counter()

    def finish(stage: int, t0: float) -> None:
        timings[f"stage{stage}_s"] = round(timings[f"stage{stage}_s"] + time.perf_counter() - t0, 3)
        if progress:
            progress.finish_stage(stage, tm.model, timings)

    def extract() -> StageFeatures:
        found = cut_features(ctx, cut) if cut is not None else stage1_features(ctx, tm.feature_extractor)
        timings["features_s"] = round(timings["features_s"] + found.seconds, 3)
        timings["feature_images"] += found.computed
        return found

    backup = progress.backup_dir if progress else (lambda stage: None)
    if ctx.cluster is not None and ctx.verbose:
        bs, replicas = recipe.data.batch_size, ctx.cluster.replicas
        ctx.log(f"Training on {ctx.cluster.num_workers} workers ({replicas} replicas): batch_size {bs} per replica, "
                f"a global batch of {bs * replicas}; this worker trains on {len(ctx.split.train)} of the "
                f"{len(ctx.setup.split.train)} training images.")
    stage1_history = None
    stage2_due = recipe.fine_tune.epochs > 0 and not (progress and progress.done(2))
    cut = None
    if stage2_due and features is None:
        cut = activation_cut(ctx, tm)
    elif stage2_due and features.train_acts is not None:
        cut = ctx.cut_models(tm, features.cut)
    stage1_due = recipe.frozen.epochs > 0 and not (progress and progress.done(1))
    if stage1_due:
        if ctx.verbose:
            ctx.log(f"Stage 1: frozen backbone, training the head for up to {recipe.frozen.epochs} epochs.")
        t0 = start(1)
        with ctx.runtime.strategy.scope():
            if features is None and recipe.frozen.cache_features:
                features = extract()
            stage1_history = run_stage1(ctx, tm, features, history_path, backup(1), callbacks(1))
        finish(1, t0)
    ran, kept = _stage_outcome(1, stage1_history, history_path, recipe.frozen)
    if stage1_due:
        _say_how_the_stage_ended(ctx, 1, ran, kept, recipe.frozen)
    if recipe.fine_tune.epochs > 0 and not stage2_due:  # done by an earlier attempt, which did not record
        kept = None                                     # whether its stage-2 model stayed
    if stage2_due:
        t0 = start(2)
        if cut is not None and (features is None or features.train_acts is None):  # resumed after stage 1
            features = extract()
            _center_the_head(ctx, tm, features)  # as stage 1 did (the same rows), or in its stead (no epochs)
        after_stage1 = tm.model.get_weights()
        with ctx.runtime.strategy.scope():
            fitted = run_stage2(ctx, tm, cut, features, history_path, backup(2), callbacks(2))
        ran, stage2_kept = _stage_outcome(2, fitted, history_path, recipe.fine_tune)
        _say_how_the_stage_ended(ctx, 2, ran, stage2_kept, recipe.fine_tune)
        kept = _keep_stage2_only_if_better(ctx, tm, after_stage1, kept, stage2_kept)
        finish(2, t0)
    if ctx.cluster is not None:  # a resumed run that had finished training: the chief loaded its weights
        ctx.cluster.sync_variables(tm.model.variables)
    ctx.features, ctx.kept_epoch = features, kept
    return timings


def _stage_rows(stage: int, fitted, history_path: Path | None) -> list[dict]:
    """The stage's epochs: history.csv's rows when the run has one (it spans resumed attempts), else Keras's."""
    if history_path is not None:
        return [r for r in read_history(history_path) if r["stage"] == stage]
    history = fitted.history if fitted is not None else {}
    return [{"epoch": i + 1, **{k: v[i] for k, v in history.items()}} for i in range(len(history.get("loss", [])))]


def _stage_outcome(stage: int, fitted, history_path, config) -> tuple[int, dict | None]:
    """(the stage's validated epochs, the row of the epoch whose weights the model ends the stage with): early
    stopping restores the best epoch's at the end of the fit (the first with the lowest validation loss);
    without it the last epoch's stay. The row is None when the stage validated no epoch."""
    rows = [r for r in _stage_rows(stage, fitted, history_path) if r.get("val_loss") is not None]
    if not rows:
        return 0, None
    kept = min(rows, key=lambda r: r["val_loss"]) if config.early_stopping > 0 else rows[-1]
    return len(rows), {**kept, "stage": stage}


def _say_how_the_stage_ended(ctx: TrainingContext, stage: int, ran: int, kept: dict | None, config) -> None:
    """One line after the epoch bars: how many epochs ran, and which epoch's weights the model keeps."""
    if not ctx.verbose or kept is None:
        return
    stopped = " (early stopping: the validation loss stopped improving)" if ran < config.epochs else ""
    ctx.log(f"Stage {stage} ran {ran} of {config.epochs} epochs{stopped}; keeping epoch {kept['epoch']}: "
            f"val_loss {kept['val_loss']:.4f}, val_accuracy {kept.get('val_accuracy', float('nan')):.4f}.")


def _keep_stage2_only_if_better(ctx: TrainingContext, tm, after_stage1: list, stage1_kept: dict | None,
                                stage2_kept: dict | None) -> dict | None:
    """Go back to the stage-1 model when fine-tuning made the validation loss worse (small datasets often do).
    Returns the kept epoch's row of the stage whose model stays (None when stage 2 trained but validated no
    epoch)."""
    before = stage1_kept["val_loss"] if stage1_kept else None
    after = stage2_kept["val_loss"] if stage2_kept else None
    if _the_chiefs(ctx, before is not None and after is not None and after > before):
        tm.model.set_weights(after_stage1)
        if ctx.verbose and before is not None and after is not None:
            ctx.log(f"Stage 2 did not improve the validation loss ({after:.4f} against {before:.4f} after stage 1): "
                    f"keeping the stage-1 model.")
        return stage1_kept
    return stage2_kept


def _tensorboard(run_dir: Path, stage: int) -> list:
    import keras

    return [keras.callbacks.TensorBoard(str(run_dir / "tb" / f"stage{stage}"))]
