"""Where the head reads the backbone (`head.layer: auto`, `head.grid: null`), measured before the model
is built.

One pass of the plain training images through a probe network gives the pooled features of every candidate
(the top, and a few earlier blocks with 1x1, 2x2 and 3x3 pooling grids) side by side; a k-fold softmax
regression on each picks the one that tells the classes apart best (decisions.decide_layer). The features are
cached like any others, so a second run on the same images skips the pass.

That pass is also stage 1's pass over the plain images: the chosen candidate's features are what the head
reads, and on a first run the probe keeps the activations at each candidate's stage-2 cut beside them. Both
are left in `ctx.probe_rows` for stage 1 (stages.py puts them in its cache), so the plain training images go
through the backbone once, not twice.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np

from tltool.engine.decisions import (MAX_DECISION_IMAGES, LayerDecision, decide_layer,
                                     decision_sample)
from tltool.engine.activations import activation_megabytes
from tltool.engine.features import (FeatureCache, cache_dir, cached_features, compute_in_shards, extractor_key,
                                    file_key, views_by_image)

#: The key in `ctx.probe_rows` of the chosen candidate's features (the others are stage-2 cuts).
POOLED = "pooled"

#: The most training images the choice is measured on (a sample beyond that, as for every decision): enough
#: to rank the candidates, and the probe's pass costs one forward pass per image.
MAX_PROBE_IMAGES = MAX_DECISION_IMAGES


def choose_feature_layer(ctx, unfreeze: int | None = None) -> bool:
    """Resolve `head.layer: auto` and `head.grid: null` in `ctx.recipe`, with a line in `ctx.decisions`.
    `unfreeze`: the stage-2 blocks whose cut the probe's pass keeps activations at (default the recipe's
    `fine_tune.unfreeze`; a search gives the most it may unfreeze, where its activation cache is).
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
    recipe = ctx.recipe
    stage2_cached = recipe.fine_tune.epochs > 0 and recipe.frozen.cache_features \
        and recipe.fine_tune.activation_budget_mb > 0
    blocks = recipe.fine_tune.unfreeze if unfreeze is None else unfreeze
    probe = layer_probe(setup.spec, setup.weights, setup.image_size, head,
                        unfreeze=blocks if stage2_cached else None)
    ctx.probe_network = probe.network
    if len(probe.candidates) == 1:
        head.layer, head.grid = probe.candidates[0]
        return True
    paths, labels = _sample(ctx.split.train.paths, ctx.split.train.labels, recipe.seed)
    if ctx.verbose:
        ctx.log(f"Measuring which backbone layer the head should read (head.layer: auto): "
                f"{len(probe.candidates)} candidates on {len(paths)} training images.")
    features, labels, images = _probe_features(ctx, probe, paths, labels)
    decision = decide_layer(features.astype(np.float32), probe.spans, probe.candidates, labels, recipe.seed,
                            probe.blocks)
    head.layer, head.grid = decision.layer, decision.grid
    ctx.decisions.append(decision.describe())
    if ctx.verbose:
        ctx.log(f"Measured {ctx.decisions[-1]}.")
    _keep_for_stage1(ctx, probe, [paths[i] for i in images], features)
    return True


def _keep_for_stage1(ctx, probe, paths: list, features: np.ndarray) -> None:
    """Leave in `ctx.probe_rows` what stage 1 would compute again for these plain images: the chosen
    candidate's features, and the activations at its stage-2 cut when the pass kept them."""
    chosen = (ctx.recipe.head.layer, ctx.recipe.head.grid)
    start, end = probe.spans[probe.candidates.index(chosen)]
    cut = probe.cuts.get(chosen[0])
    ctx.probe_rows = {key: rows for key, rows in ctx.probe_rows.items() if key == cut}
    ctx.probe_rows[POOLED] = ([file_key(p) for p in paths], features[:, start:end])


def settle_unmeasured(head, why_not: str) -> str:
    """`head.layer: auto` taken as the top and `head.grid: null` as 1; returns the line saying so and why."""
    head.layer, head.grid = ("top" if head.layer == "auto" else head.layer), head.grid or 1
    return LayerDecision(head.layer, head.grid, {}, {}, why_not).describe()


def _sample(paths: list, labels: list, seed: int) -> tuple[list, np.ndarray]:
    """About MAX_PROBE_IMAGES of the images, each class in its share (`decisions.decision_sample`)."""
    labels = np.asarray(labels)
    chosen = decision_sample(labels, seed, MAX_PROBE_IMAGES)
    if chosen is None:
        return list(paths), labels
    return [paths[i] for i in chosen], labels[chosen]


def _probe_features(ctx, probe, paths: list, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the candidates' features of the readable images among `paths`, their labels, their index in `paths`)."""
    recipe, setup = ctx.recipe, ctx.setup
    from tltool.engine.stages import weights_identity

    key = extractor_key(setup.spec.name, weights_identity(setup), setup.image_size, setup.spec.preprocessing,
                        recipe.head.mode, recipe.head.pooling, "probe:" + json.dumps(probe.candidates))
    common = dict(image_size=setup.image_size, batch_size=recipe.data.batch_size, skips=ctx.split.skips,
                  verbose=ctx.verbose, log=ctx.log, jit_compile=ctx.runtime.jit_compile)
    entry = FeatureCache(cache_dir(recipe.train.cache_dir) / key) if recipe.frozen.cache_features else nullcontext()
    with entry as cache:  # None: computed, not cached
        if _keeps_activations(ctx, probe, cache, paths):
            rows, images = _pass_keeping_activations(ctx, probe, cache, paths, common)
            return rows, labels[images], images
        rows, index, stats = cached_features(probe.model, cache, paths, decoded=ctx.decoded, **common)
    rows, images = views_by_image(rows, index, stats.rows_per_view)
    return rows[:, 0], labels[images], images


def _keeps_activations(ctx, probe, cache, paths: list) -> bool:
    """Whether the probe's pass also keeps the activations at the candidates' stage-2 cuts: when it runs
    over all the images (none cached) and they fit stage 2's activation budget."""
    if probe.with_cuts is None or (cache is not None and any(file_key(p) in cache for p in paths)):
        return False
    width = sum(int(out.shape[-1]) for out in probe.with_cuts.outputs[1:])
    return activation_megabytes(width, len(paths), 0, 0) <= ctx.recipe.fine_tune.activation_budget_mb


def _pass_keeping_activations(ctx, probe, cache, paths: list, common: dict) -> tuple[np.ndarray, np.ndarray]:
    """The probe's pass over `paths` that also keeps (in `ctx.probe_rows`, by cut) the activations at each
    candidate's stage-2 cut, so that stage 1 does not run its plain images through the backbone again.
    Returns (the candidates' features, index in `paths`) of the readable images; caches the features shard
    by shard, as any extraction."""
    if ctx.verbose:
        ctx.log(f"Computing features of {len(paths)} images (0 already cached), and the activations stage 2 "
                f"would train on for each candidate.")
    keys = [file_key(p) for p in paths]  # before reading the files, as cached_features takes them
    outputs, ok = compute_in_shards(probe.with_cuts, cache, paths, keys, common["image_size"],
                                    common["batch_size"], common["skips"], verbose=ctx.verbose,
                                    jit_compile=common["jit_compile"], decoded=ctx.decoded)
    readable = [key for key, good in zip(keys, ok) if good]
    outputs = outputs if ok.all() else [out[ok] for out in outputs]
    ctx.probe_rows = {cut: (readable, acts) for cut, acts in zip(probe.cut_layers, outputs[1:])}
    return outputs[0], np.flatnonzero(ok)
