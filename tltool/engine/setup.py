"""Setting a run up: recipe -> backbone spec and image size -> weights -> split data, and the runtime.

`finetune`, every `tune` trial and `export` prepare their run here, so the order of the checks (cheap
checks of what the user typed first, then the weights, which may need the network, then the data) and
the rules behind them live in one place.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tltool.data.folders import ImageFolder, SkipLog, check_folder, scan_folder, stratified_split
from tltool.errors import DataError, RecipeError
from tltool.models.backbones import BackboneSpec, ResolvedWeights, check_image_size, get_backbone_spec, resolve_weights
from tltool.models.ood import UNKNOWN_LABEL
from tltool.recipe import Recipe, load_recipe


@dataclass
class SplitData:
    """The images a run trains, validates and tests on, and the files skipped while reading them."""

    train: ImageFolder
    val: ImageFolder
    test: ImageFolder | None
    skips: SkipLog

    def without_skipped(self) -> "SplitData":
        """The images that decoded (files found broken only while decoding are in `skips` after a pass)."""
        return SplitData(self.train.without(self.skips), self.val.without(self.skips),
                         self.test.without(self.skips) if self.test else None, self.skips)


@dataclass
class RunSetup:
    """A run ready to train: its recipe, backbone at an image size, weights and data."""

    recipe: Recipe
    spec: BackboneSpec
    image_size: int
    weights: ResolvedWeights | None = None  # None when not asked for (export, head-only trials)
    split: SplitData | None = None          # None when not asked for (the chief of a distributed search)

    @property
    def classes(self) -> list[str]:
        return self.split.train.classes

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from learned weights (None counts as yes: nothing random to guard)."""
        return self.weights is None or self.weights.pretrained


@dataclass
class Runtime:
    """The Keras session a run trains in: its distribution strategy, whether steps are XLA-compiled, and
    for a multi-worker run its workers (see cluster.py)."""

    strategy: object
    jit_compile: bool
    cluster: object = None


def resolve_recipe(recipe=None, *, data=None, val_data=None, test_data=None, backbone=None, weights=None,
                   image_size=None, epochs=None, fine_tune_epochs=None, batch_size=None, seed=None,
                   deterministic=None, strategy=None, overrides=()) -> Recipe:
    """The recipe (path, `Recipe` or None for defaults) with `--set` overrides and explicit arguments applied."""
    flags = {
        "data": {"train": _path_or_none(data), "val": _path_or_none(val_data), "test": _path_or_none(test_data),
                 "image_size": image_size, "batch_size": batch_size},
        "backbone": {"name": backbone, "weights": weights},
        "frozen": {"epochs": epochs},
        "fine_tune": {"epochs": fine_tune_epochs},
        "train": {"deterministic": deterministic or None, "strategy": strategy},
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


def backbone_and_size(recipe: Recipe) -> tuple[BackboneSpec, int]:
    """The recipe's backbone spec and its image size (the backbone's default when the recipe has none)."""
    spec = get_backbone_spec(recipe.backbone.name)
    size = recipe.data.image_size or spec.default_size
    check_image_size(spec, size)
    return spec, size


def require_training_data(recipe: Recipe) -> None:
    """The cheap check of the recipe's folders: a training folder is given, and every folder given exists."""
    if recipe.data.train is None:
        raise RecipeError("No training data: pass --data DIR (a folder with one sub-folder per class) or set "
                          "`data.train` in the recipe.")
    for folder, role in ((recipe.data.train, "training"), (recipe.data.val, "validation"),
                         (recipe.data.test, "test")):
        if folder is not None:
            check_folder(Path(folder), role)


def resolve_run_weights(recipe: Recipe, spec: BackboneSpec, size: int) -> ResolvedWeights:
    return resolve_weights(spec, recipe.backbone.weights, recipe.backbone.fallback,
                           classic=recipe.head.mode == "classic", image_size=size)


def load_split_data(recipe: Recipe, skips: SkipLog | None = None) -> SplitData:
    """Scan the recipe's folders and split off validation data when no folder is given."""
    require_training_data(recipe)
    skips = skips if skips is not None else SkipLog()
    full = scan_folder(recipe.data.train, skips, role="training")
    if UNKNOWN_LABEL in full.classes:
        warnings.warn(f"A class is named {UNKNOWN_LABEL!r}, the label `tltool predict` gives images unlike the "
                      f"training images: tell the two apart by its `reason` field (empty for the class), or "
                      f"rename the class folder.", UserWarning, stacklevel=2)
    if recipe.data.val:
        train = full
        val = scan_folder(recipe.data.val, skips, classes=full.classes, role="validation")
    else:
        train, val = stratified_split(full, recipe.data.val_split, recipe.seed, recipe.data.group_by)
        if len(val) == 0:
            raise DataError(f"Too few images in {full.root} to split off validation data; add images or pass "
                            f"--val-data DIR.")
        unvalidated = [name for name, count in val.counts().items() if count == 0]
        if unvalidated:
            what = "image" if recipe.data.group_by is None else "group (data.group_by)"
            warnings.warn(f"{len(unvalidated)} class(es) have a single {what}, kept for training, so nothing of "
                          f"theirs is validated: {', '.join(unvalidated[:5])}{', ...' if len(unvalidated) > 5 else ''}"
                          f". Their accuracy goes unmeasured; add images or pass --val-data DIR.", UserWarning,
                          stacklevel=2)
    test = scan_folder(recipe.data.test, skips, classes=full.classes, role="test") if recipe.data.test else None
    for held_out, role, flag in ((val if recipe.data.val else None, "validation", "--val-data"),
                                 (test, "test", "--test-data")):
        if held_out is not None:
            _check_held_out(full, held_out, role, flag)
    return SplitData(train, val, test, skips)


def _check_held_out(train: ImageFolder, held_out: ImageFolder, role: str, flag: str) -> None:
    """Refuse a validation or test folder that holds the training images themselves (their accuracy measures
    memory, and the out-of-distribution threshold fitted on them would be 0); warn when some are shared.
    Files are compared by their real path; `tltool data check` also finds copies and near-duplicates."""
    training = {os.path.realpath(p) for p in train.paths}
    shared = [p for p in held_out.paths if os.path.realpath(p) in training]
    if not shared:
        return
    if len(shared) == len(held_out.paths):
        instead = ", or leave --val-data out to split some off" if role == "validation" else ""
        raise DataError(f"{flag} {held_out.root} holds training images only: their accuracy would measure "
                        f"memory, not how the model does on new images. Pass a folder of other images{instead}.")
    warnings.warn(f"{len(shared)} of the {len(held_out.paths)} {role} images are training images too (e.g. "
                  f"{shared[0]}): their accuracy measures memory. Keep each image in one folder; `tltool data "
                  f"check` also finds copies and near-duplicates.", UserWarning, stacklevel=3)


def prepare_run(recipe: Recipe, *, weights: bool = True, data: bool = True, split: SplitData | None = None,
                before_heavy_work: Callable[[], None] | None = None) -> RunSetup:
    """Check and resolve what a run needs, cheapest first, so that a typo fails before any slow step.

    Args:
        recipe: the resolved recipe.
        weights: resolve the backbone's weights (downloads ImageNet weights when online; offline it fails
            here, before any data is read, with what to do).
        data: scan and split the recipe's image folders.
        split: use this split instead of scanning (a search reuses one split across its trials).
        before_heavy_work: called after the cheap checks, before weights and data (e.g. to refuse an
            output folder that is in the way).
    """
    spec, size = backbone_and_size(recipe)
    if data and split is None:
        require_training_data(recipe)
    if before_heavy_work is not None:
        before_heavy_work()
    resolved = resolve_run_weights(recipe, spec, size) if weights else None
    if data and split is None:
        split = load_split_data(recipe)
    return RunSetup(recipe, spec, size, resolved, split if data else None)


#: The seed the last fresh session was given (see `start_runtime`'s `keep_session`).
_session_seed: int | None = None


def start_runtime(recipe: Recipe, cluster=None, keep_session: bool = False) -> Runtime:
    """A fresh Keras session seeded from the recipe, with its precision and distribution strategy (`cluster`'s
    for a multi-worker run: its strategy must exist before TensorFlow runs anything else).

    `keep_session` (a search's trials) keeps the session when it was started with the recipe's seed: clearing
    it, or setting TensorFlow's seed, empties TensorFlow's caches of instantiated functions, and the first call
    of every traced step (a kept model's train and validation steps) then cost 0.2 to 1 s again. Python's and
    NumPy's generators are seeded again; what a trial draws from Keras or TensorFlow comes from its own seeds
    (its layers' and its datasets'), so it trains as in a fresh session (tests/test_tune.py).
    """
    import keras
    import tensorflow as tf

    global _session_seed
    # Keras warns about things tltool does on purpose (shuffling inside tf.data; datasets whose length is
    # unknown until the first epoch ends, because unreadable files are filtered out).
    warnings.filterwarnings("ignore", message=r".*`shuffle=True` was passed")
    warnings.filterwarnings("ignore", message=r"Your input ran out of data")
    if keep_session and _session_seed == recipe.seed:
        random.seed(recipe.seed)
        np.random.seed(recipe.seed)
    else:
        keras.backend.clear_session()
        keras.utils.set_random_seed(recipe.seed)
        _session_seed = recipe.seed
    if recipe.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    gpus = tf.config.list_physical_devices("GPU")
    _configure_precision(recipe, gpus)
    if recipe.train.xla and not gpus:
        warnings.warn("train.xla is ignored: no GPU is visible.", UserWarning, stacklevel=2)
    strategy = cluster.strategy if cluster is not None else _strategy(recipe, gpus)
    return Runtime(strategy, bool(recipe.train.xla and gpus), cluster)


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
