"""Where the head reads the backbone (`head.layer: auto`, `head.grid: null`), measured before the model
is built.

One pass of the plain training images through a probe network gives the pooled features of every candidate
(the top, and a few earlier blocks with 1x1, 2x2 and 3x3 pooling grids) side by side; a k-fold softmax
regression on each picks the one that tells the classes apart best (decisions.decide_layer). The features are
cached like any others, so a second run on the same images skips the pass.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np

from tltool.engine.decisions import LayerDecision, decide_layer
from tltool.engine.features import FeatureCache, cache_dir, cached_features, extractor_key, views_by_image

#: The most training images the choice is measured on (a uniform sample beyond that): enough to rank the
#: candidates, and the pass costs one forward pass per image.
MAX_PROBE_IMAGES = 2000


def choose_feature_layer(ctx) -> bool:
    """Resolve `head.layer: auto` and `head.grid: null` in `ctx.recipe`, with a line in `ctx.decisions`.
    Returns whether it built a probe network to measure them (which draws from Keras's random generators)."""
    from tltool.models.transfer import layer_probe

    head, setup = ctx.recipe.head, ctx.setup
    if head.mode != "pooled" or (head.layer != "auto" and head.grid is not None):
        return False
    why_not = None
    if not setup.pretrained:
        why_not = "not measured on a random backbone, whose layers learned nothing to choose among"
    elif ctx.cluster is not None:
        why_not = "not measured in a multi-worker run"
    if why_not:
        ctx.decisions.append(settle_unmeasured(head, why_not))
        return False
    probe = layer_probe(setup.spec, setup.weights, setup.image_size, head)
    if len(probe.candidates) == 1:
        head.layer, head.grid = probe.candidates[0]
        return True
    paths, labels = _sample(ctx.split.train.paths, ctx.split.train.labels, ctx.recipe.seed)
    if ctx.verbose:
        ctx.log(f"Measuring which backbone layer the head should read (head.layer: auto): "
                f"{len(probe.candidates)} candidates on {len(paths)} training images.")
    features, labels = _probe_features(ctx, probe, paths, labels)
    decision = decide_layer(features.astype(np.float32), probe.spans, probe.candidates, labels, ctx.recipe.seed,
                            probe.blocks)
    head.layer, head.grid = decision.layer, decision.grid
    ctx.decisions.append(decision.describe())
    if ctx.verbose:
        ctx.log(f"Measured {ctx.decisions[-1]}.")
    return True


def settle_unmeasured(head, why_not: str) -> str:
    """`head.layer: auto` taken as the top and `head.grid: null` as 1; returns the line saying so and why."""
    head.layer, head.grid = ("top" if head.layer == "auto" else head.layer), head.grid or 1
    return LayerDecision(head.layer, head.grid, {}, {}, why_not).describe()


def _sample(paths: list, labels: list, seed: int) -> tuple[list, np.ndarray]:
    """At most MAX_PROBE_IMAGES of the images, drawn uniformly (each class keeps about its share)."""
    labels = np.asarray(labels)
    if len(paths) <= MAX_PROBE_IMAGES:
        return list(paths), labels
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(paths))[:MAX_PROBE_IMAGES])  # a uniform draw keeps the class shares
    return [paths[i] for i in chosen], labels[chosen]


def _probe_features(ctx, probe, paths: list, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    recipe, setup = ctx.recipe, ctx.setup
    from tltool.engine.stages import weights_identity

    key = extractor_key(setup.spec.name, weights_identity(setup), setup.image_size, setup.spec.preprocessing,
                        recipe.head.mode, recipe.head.pooling, "probe:" + json.dumps(probe.candidates))
    common = dict(image_size=setup.image_size, batch_size=recipe.data.batch_size, skips=ctx.split.skips,
                  verbose=ctx.verbose, log=ctx.log, jit_compile=ctx.runtime.jit_compile)
    entry = FeatureCache(cache_dir(recipe.train.cache_dir) / key) if recipe.frozen.cache_features else nullcontext()
    with entry as cache:  # None: computed, not cached
        rows, index, stats = cached_features(probe.model, cache, paths, **common)
    rows, images = views_by_image(rows, index, stats.rows_per_view)
    return rows[:, 0], labels[images]
