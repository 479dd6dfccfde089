"""Backbone + new head, and which layers train in which stage.

The full model is three nested parts, each its own Keras model so they can be used alone:

    pixels (RGB, 0..255) -> [preprocessing] -> backbone -> features -> head -> class probabilities
    \\________________ feature_extractor ______________/

Stage 1 trains `head` on cached features; because the head is the very same layer object inside the full
model, its weights need no copying. The backbone is always called with `training=False`, so its
BatchNorm layers use their pretrained statistics even when stage 2 unfreezes the layers around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltool.models.backbones import (BackboneSpec, ResolvedWeights, backbone_blocks, imagenet_unavailable,
                                     preprocessing_layer)
from tltool.errors import BackboneError, WeightsError
from tltool.recipe import HeadConfig


@dataclass
class TransferModel:
    model: object              # keras.Model: pixels -> probabilities
    feature_extractor: object  # keras.Model: pixels -> features
    backbone: object           # keras.Model: preprocessed pixels -> features
    head: object               # keras.Model: features -> probabilities
    preprocess: object = None  # the layer turning pixels into the backbone's input (None: built in)
    pretrained: bool = True    # the backbone runs in inference mode (BatchNorm statistics kept)


def build_transfer_model(spec: BackboneSpec, weights: ResolvedWeights, num_classes: int, image_size: int,
                         head_cfg: HeadConfig, seed: int | None = None, network=None) -> TransferModel:
    """Build the backbone with its weights, a fresh head for `num_classes`, and the full model.

    The image size is the caller's to check (`engine.setup.backbone_and_size`); a size the architecture
    cannot take still fails here, as a BackboneError. `network`: the backbone's feature map network, built
    with these weights and never trained (`LayerProbe.network`), used instead of building another (pooled
    or not).
    """
    import keras

    classic = head_cfg.mode == "classic"
    if classic and weights.kind == "imagenet" and image_size != spec.default_size:
        raise BackboneError(f"Classic head mode keeps {spec.name}'s original top, which takes only "
                            f"{spec.default_size} px images with ImageNet weights. Received: image size "
                            f"{image_size}. Use --image-size {spec.default_size} or head.mode: pooled.")
    if classic:
        backbone = _build_backbone(spec, weights, image_size, classic=True)
    elif reads_top_globally(head_cfg) and network is None:  # Keras's own pooled network
        backbone = _build_backbone(spec, weights, image_size, pooling=head_cfg.pooling)
    else:  # pooled here: at the layer the head reads, or at the top of the network given
        net = network if network is not None else _build_backbone(spec, weights, image_size)
        backbone = keras.Model(net.input, grid_pooling(feature_map(net, spec, head_cfg.layer), head_cfg.grid or 1,
                                                       head_cfg.pooling), name=net.name)
        backbone.trainable = False
    return _assemble(backbone, preprocessing_layer(spec), weights.pretrained, f"tltool_{spec.name}", image_size,
                     build_head(backbone.output_shape[-1], num_classes, head_cfg, seed=seed))


def with_new_head(tm: TransferModel, num_classes: int, head_cfg: HeadConfig, seed: int | None = None,
                  dropout=None) -> TransferModel:
    """`tm`'s backbone (the same layers, at their current weights) under a fresh head: a search whose trials
    share the backbone builds it once. `head_cfg` must read the backbone as `tm`'s head does; `dropout`: see
    build_head."""
    image_size = int(tm.model.input_shape[1])
    head = build_head(tm.backbone.output_shape[-1], num_classes, head_cfg, seed=seed, dropout=dropout)
    return _assemble(tm.backbone, tm.preprocess, tm.pretrained, tm.model.name, image_size, head)


def _assemble(backbone, preprocess, pretrained: bool, model_name: str, image_size: int, head) -> TransferModel:
    """pixels -> preprocess -> backbone -> head, and the feature extractor (pixels -> features)."""
    import keras

    pixels = keras.Input((image_size, image_size, 3), name="pixels", dtype="float32")
    x = preprocess(pixels) if preprocess is not None else pixels
    # Pretrained BatchNorm statistics must survive fine-tuning: pin the backbone to inference mode. A
    # randomly initialised backbone has no statistics worth keeping, so its BatchNorm trains normally.
    features = backbone(x, training=False) if pretrained else backbone(x)
    extractor = keras.Model(pixels, features, name="feature_extractor")
    model = keras.Model(pixels, head(features), name=model_name)
    return TransferModel(model, extractor, backbone, head, preprocess, pretrained)


def build_head(feature_size: int, num_classes: int, head_cfg: HeadConfig, seed: int | None = None, dropout=None):
    """Normalisation (`head.normalize`) + dropout + optional hidden dense layers + a softmax over the new classes,
    on a feature vector.

    `dropout`: the layer class of the dropout layers, then present at any rate (tune's RateDropout, whose
    rate trials set); by default Keras's Dropout, present only when `head.dropout` > 0.
    """
    import keras

    def dropped(x, name: str):
        if dropout is not None:
            return dropout(head_cfg.dropout, seed=seed, name=name)(x)
        if head_cfg.dropout > 0:
            return keras.layers.Dropout(head_cfg.dropout, seed=seed, name=name)(x)
        return x

    inputs = keras.Input((feature_size,), name="features")
    x = inputs
    normalize = head_cfg.normalize and head_cfg.mode == "pooled"
    if normalize:
        # x - mean, as a frozen BatchNormalization (plain Keras, folded by every exporter) whose statistics
        # `center_head` sets from the training features; then a length of sqrt(D): every feature about 1 in
        # size, whatever the backbone's scale. (A head on streamed images keeps a zero centre.)
        center = keras.layers.BatchNormalization(center=False, scale=False, name=HEAD_CENTER)
        center.trainable = False
        x = keras.layers.UnitNormalization(name="head_unit_length")(center(x, training=False))
        x = keras.layers.Rescaling(float(np.sqrt(feature_size)), name="head_feature_scale")(x)
    for i, units in enumerate(head_cfg.dense):
        x = dropped(x, f"head_dropout_{i}")
        x = keras.layers.Dense(units, activation="relu", kernel_initializer=_glorot(seed, i + 1),
                               name=f"head_dense_{i}")(x)
    x = dropped(x, "head_dropout")
    # float32 output keeps the softmax and the loss stable under mixed precision.
    # A normalised head's classifier starts from zero (every class equally likely): random initial weights add
    # logits of pure noise, which a few epochs on a small dataset do not wash out (measured: README).
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions",
                                 kernel_initializer="zeros" if normalize else _glorot(seed, 0))(x)
    return keras.Model(inputs, outputs, name="head")


def _glorot(seed: int | None, layer: int):
    """The head's initial weights from the recipe's seed alone, not from what was drawn before (building a
    backbone draws): a trial on a backbone built once (tune) starts where one that built its own would."""
    import keras

    return keras.initializers.GlorotUniform(seed=None if seed is None else seed + layer)


#: The head's layer that subtracts the training features' mean (see build_head, center_head).
HEAD_CENTER = "head_center"


def center_head(head, features: np.ndarray) -> None:
    """Set the head's centre (when it normalises its input) to the mean of `features` [N, D]: the plain
    training images' features, so that the centred features of those images average zero."""
    try:
        layer = head.get_layer(HEAD_CENTER)
    except ValueError:  # a head that does not normalise (head.normalize: false, classic mode)
        return
    mean = np.asarray(features, np.float64).mean(axis=0)
    # BatchNormalization in inference mode: (x - moving_mean) / sqrt(moving_variance + epsilon).
    layer.set_weights([mean.astype(np.float32), np.full_like(mean, 1.0 - layer.epsilon, dtype=np.float32)])


def set_classifier_l2(head, factor: float | None) -> None:
    """Penalise the head's classifier weights with keras.regularizers.L2(`factor`) (none for 0 or None) from
    the next compile on: set on the built layer, since the penalty is measured after the head is built."""
    import keras

    layer = head.get_layer("predictions")
    regularizer = keras.regularizers.L2(factor) if factor else None
    layer.kernel_regularizer = regularizer  # what the layer's config says
    layer.kernel.regularizer = regularizer  # what the loss adds


def reads_top_globally(head_cfg: HeadConfig) -> bool:
    """Whether the head reads the backbone's output pooled globally (as before `head.layer` existed): `auto`
    and a null grid not measured count as the top and 1."""
    return head_cfg.layer in ("top", "auto") and (head_cfg.grid or 1) == 1


def feature_map(net, spec: BackboneSpec, layer: str):
    """The feature map the head reads: the network's output (`top`, or `auto` not measured), or the output of
    a layer that ends one of its blocks (every path runs through it, so the network truncated there is whole)."""
    if layer in ("top", "auto"):
        return net.output
    ends = backbone_blocks(net, spec)
    if layer not in ends:
        raise BackboneError(f"head.layer {layer!r} does not end a block of {spec.name}. Use top, auto or one of: "
                            f"{', '.join(ends)}.")
    return net.get_layer(layer).output


def grid_pooling(feature_map, grid: int, pooling: str, name: str = "grid"):
    """Pool a feature map [H, W, C] to a vector: globally (grid 1), or one value per cell of a grid x grid
    layout, flattened (the coarse layout kept: where a stroke or a part is, not only that it is there).

    Plain pooling layers (a window and a stride that tile the map, overlapping by a row when the size does not
    divide), so the model stays plain Keras and every export format takes it."""
    import keras

    height, width = int(feature_map.shape[1]), int(feature_map.shape[2])
    if grid == 1:
        layer = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        return layer(name=f"{name}_pool")(feature_map)
    rows, cols = min(grid, height), min(grid, width)
    strides = (height // rows, width // cols)
    window = (height - (rows - 1) * strides[0], width - (cols - 1) * strides[1])
    layer = keras.layers.AveragePooling2D if pooling == "avg" else keras.layers.MaxPooling2D
    return keras.layers.Flatten(name=f"{name}_flatten")(layer(window, strides, name=f"{name}_pool")(feature_map))


def _build_backbone(spec: BackboneSpec, weights: ResolvedWeights, image_size: int, classic: bool = False,
                    pooling: str | None = None):
    """The pretrained network: its original top's input (classic), globally pooled (`pooling`), or its
    feature map (None)."""
    import keras

    fn = spec.constructor_fn()
    kwargs = dict(spec.extra_kwargs)
    shape = (image_size, image_size, 3)
    try:
        if classic:
            full = fn(include_top=True, weights=weights.keras_arg, input_shape=shape, **kwargs)
            net = keras.Model(full.inputs, _classic_features(full), name=f"{spec.name}_classic")
        else:
            net = fn(include_top=False, weights=weights.keras_arg, input_shape=shape, pooling=pooling, **kwargs)
    except ValueError as exc:
        raise BackboneError(f"{spec.name} cannot be built for {image_size} px inputs: {exc}") from None
    except Exception as exc:  # a download that fails after resolve_weights' check (e.g. went offline)
        if weights.kind != "imagenet":
            raise
        raise imagenet_unavailable(spec, exc) from None
    if weights.kind == "file":
        load_backbone_weights(net, weights.path, spec)
    if not weights.pretrained:
        # Keras's applications use BatchNorm momentum 0.99-0.999, tuned for ImageNet-length training: on a
        # short from-scratch run the moving statistics would still be near their initial values, and the
        # model would be useless in inference mode. 0.9 lets them converge within a few hundred steps.
        for layer in net.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
    net.trainable = False
    return net


def _classic_features(full):
    """The input of a full network's original 1000-way classifier (its last layer with weights), flattened.

    The classifier is a Dense layer in most families but a 1x1 convolution followed by a reshape in
    MobileNet and MobileNetV3, so "the layer before the last" would be the ImageNet logits there.
    """
    import keras

    classifier = next(layer for layer in reversed(full.layers) if layer.weights)
    features = classifier.input
    if len(features.shape) > 2:
        features = keras.layers.Flatten(name="classic_features")(features)
    return features


def load_backbone_weights(net, path: Path, spec: BackboneSpec) -> None:
    """Load a weights file saved from the same backbone without its top; say clearly when it does not fit."""
    try:
        net.load_weights(str(path))
    except Exception as exc:  # Keras raises ValueError/KeyError/OSError depending on what differs
        raise WeightsError(f"Weights file {path} does not fit {spec.name} without its top "
                           f"({type(exc).__name__}: {str(exc)[:160]}). Save it from "
                           f"keras.applications.{spec.constructor}(include_top=False) or pass --weights none.") \
            from None


@dataclass
class Unfrozen:
    """What stage 2 trains: the backbone's layers after `cut` (None: all of them)."""

    blocks: int         # blocks unfrozen
    total_blocks: int   # blocks the backbone has
    cut: str | None     # the layer whose output stays fixed (the end of the last frozen block)
    weight_layers: int  # layers with weights that now train

    def describe(self) -> str:
        where = f"after {self.cut}" if self.cut else "the whole backbone"
        return (f"top {self.blocks} of {self.total_blocks} backbone blocks unfrozen ({where}: "
                f"{self.weight_layers} layers with weights train)")


def fine_tune_cut(backbone, spec: BackboneSpec, blocks: int) -> tuple[str | None, int, int]:
    """(the layer ending the last frozen block or None for all, blocks unfrozen, blocks in all) for
    unfreezing the top `blocks` blocks. The layers after the last block end (a final convolution) train
    with the top block."""
    ends = backbone_blocks(backbone, spec)
    blocks = min(blocks, len(ends))
    return _cut_below_top(ends, blocks), blocks, len(ends)


def _cut_below_top(ends: list[str], blocks: int) -> str | None:
    """The block end under the top `blocks` of the blocks ending at `ends`, None when that is all of them."""
    return ends[len(ends) - 1 - blocks] if blocks < len(ends) else None


def set_fine_tune_layers(backbone, spec: BackboneSpec, blocks: int, freeze_batchnorm: bool = True) -> Unfrozen:
    """Unfreeze the backbone's top `blocks` blocks (see `backbones.backbone_blocks`), keeping BatchNorm frozen.

    Blocks, not layers: "the top 20 layers" of a MobileNetV2 counts BatchNorm, activation and padding
    layers and trains 6 convolutions. For a pretrained backbone BatchNorm stays frozen (and, since the
    backbone is called with training=False, in inference mode): updating its statistics on a small dataset
    wrecks what pretraining learned. `freeze_batchnorm=False` is for random backbones.
    """
    import keras

    cut, blocks, total = fine_tune_cut(backbone, spec, blocks)
    above = layers_above(backbone, cut)
    backbone.trainable = True
    trainable = 0
    for layer in backbone.layers:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = layer in above and not (is_bn and freeze_batchnorm)
        trainable += int(layer.trainable and bool(layer.weights))
    return Unfrozen(blocks, total, cut, trainable)


def layers_above(backbone, cut: str | None) -> list:
    """The backbone's layers after `cut` (a graph cut: every one of them is above it), all for None."""
    layers = backbone.layers
    return layers[layers.index(backbone.get_layer(cut)) + 1:] if cut else list(layers)


#: With `head.layer: auto`, the blocks tried besides the backbone's top: at these fractions of its depth.
PROBED_DEPTHS = (0.55, 0.7, 0.85)
PROBED_GRIDS = (1, 2, 3)


def layer_candidates(net, spec: BackboneSpec, head_cfg: HeadConfig) -> list[tuple[str, int]]:
    """The (layer, grid) pairs `head.layer` / `head.grid` leave open, the top (read globally) first: the top
    and the blocks at PROBED_DEPTHS of the backbone (fewer on a shallow one), each on every grid up to the
    size of its feature map."""
    ends = backbone_blocks(net, spec)
    if head_cfg.layer == "auto":
        layers = ["top"] + list(dict.fromkeys(ends[max(0, round(f * len(ends)) - 1)] for f in PROBED_DEPTHS))
    else:
        layers = [head_cfg.layer]
    pairs = []
    for layer in layers:
        fmap = feature_map(net, spec, layer)
        side = min(int(fmap.shape[1]), int(fmap.shape[2]))
        grids = [head_cfg.grid] if head_cfg.grid else (1,) if layer == "top" and len(layers) > 1 else PROBED_GRIDS
        pairs += [(layer, min(g, side)) for g in grids]  # as grid_pooling does: no finer than the map
    return list(dict.fromkeys(pairs))


@dataclass
class LayerProbe:
    """One network that computes, in one pass, the pooled features of every (layer, grid) candidate side by
    side: pixels -> [sum of their widths]."""

    model: object
    candidates: list  # (layer, grid) pairs, the top first
    spans: list       # each candidate's (start, end) in the model's output
    blocks: dict      # block-end layer -> its block number (1 = the first)
    #: with `unfreeze` blocks given: each candidate layer's stage-2 cut (the layer whose activations stage 2
    #: trains on when the head reads that layer), and a model computing the probe's features and, beside
    #: them, the flattened activations at each of those cuts (in the order of `cut_layers`)
    cuts: dict = field(default_factory=dict)
    cut_layers: list = field(default_factory=list)
    with_cuts: object = None
    #: the backbone network the probe reads (feature maps, never trained), for the run's model to reuse
    network: object = None


def layer_probe(spec: BackboneSpec, weights: ResolvedWeights, image_size: int, head_cfg: HeadConfig,
                unfreeze: int | None = None) -> LayerProbe:
    """The probe of the candidates `layer_candidates` finds for `head_cfg` (see LayerProbe); with `unfreeze`
    (stage 2's blocks), also the model that keeps the activations at each candidate's stage-2 cut."""
    import keras

    net = _build_backbone(spec, weights, image_size)
    candidates = layer_candidates(net, spec, head_cfg)
    layers = list(dict.fromkeys(layer for layer, _ in candidates))
    block_ends = backbone_blocks(net, spec)
    # As fine_tune_cut finds it on the backbone the head reads: the network truncated at the layer.
    cuts = {layer: _cut_below_top(block_ends if layer == "top" else block_ends[:block_ends.index(layer) + 1],
                                  unfreeze) for layer in layers} if unfreeze else {}
    cut_layers = list(dict.fromkeys(cut for cut in cuts.values() if cut is not None))
    inner = keras.Model(net.input, [feature_map(net, spec, layer) for layer in layers]
                        + [net.get_layer(cut).output for cut in cut_layers], name="probe_maps")
    pixels = keras.Input((image_size, image_size, 3), name="pixels", dtype="float32")
    preprocess = preprocessing_layer(spec)
    maps = inner(preprocess(pixels) if preprocess is not None else pixels, training=False)
    maps = list(maps) if isinstance(maps, (list, tuple)) else [maps]
    at_cuts = [keras.layers.Flatten(name=f"at_cut_{i}")(m) for i, m in enumerate(maps[len(layers):])]
    maps = dict(zip(layers, maps))
    pooled = [grid_pooling(maps[layer], grid, head_cfg.pooling, name=f"candidate_{i}")
              for i, (layer, grid) in enumerate(candidates)]
    ends = np.cumsum([int(p.shape[-1]) for p in pooled])
    features = keras.layers.Concatenate(name="candidates")(pooled) if len(pooled) > 1 else pooled[0]
    spans = [(int(a), int(b)) for a, b in zip([0, *ends[:-1]], ends)]
    blocks = {name: i + 1 for i, name in enumerate(block_ends)}
    with_cuts = keras.Model(pixels, [features, *at_cuts], name="layer_probe_and_cuts") if at_cuts else None
    return LayerProbe(keras.Model(pixels, features, name="layer_probe"), candidates, spans, blocks, cuts,
                      cut_layers, with_cuts, net)
