"""The backbone registry: one `BackboneSpec` per `keras.applications` network.

A spec says how to build the network, its default and minimum input size, how its inputs are
preprocessed, and how wide its pooled features are. Preprocessing becomes a layer inside the model
(`preprocessing_layer`), so every tltool model takes plain RGB pixels in 0..255; networks whose Keras
implementation already includes it (EfficientNet, MobileNetV3, ConvNeXt) get none.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import hashlib
import re
import socket
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tltool.errors import BackboneError, WeightsError

# Per-channel statistics of the `keras.applications` preprocessing modes.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """How to build and feed one `keras.applications` backbone."""

    name: str
    constructor: str                  # attribute of keras.applications
    default_size: int                 # input size of the ImageNet weights
    min_size: int                     # smallest input the architecture accepts
    preprocessing: str                # "tf" ([-1, 1]), "torch" (ImageNet mean/std), "caffe" (BGR, mean) or "none"
    feature_size: int                 # width of the globally pooled features
    classic_feature_size: int         # width of the input of the original 1000-way layer
    block_end: str = ""               # regex of the layers that end a block (stage 2 unfreezes whole blocks)
    extra_kwargs: tuple = ()          # constructor arguments fixed for this spec
    content_layers: tuple = ()        # `tltool stylize`: layers whose activations define an image's content
    style_layers: tuple = ()          # ... and those whose Gram matrices define its style
    style_loss_weights: tuple = ()    # ... and the default (content, style, total variation) loss weights

    @property
    def preprocessing_included(self) -> bool:
        return self.preprocessing == "none"

    def constructor_fn(self) -> Callable:
        """Keras's constructor, without its warning that ImageNet weights made for 224 px are used at another
        size: that is what tltool means to do (convolution weights do not depend on the input size)."""
        import keras

        build = getattr(keras.applications, self.constructor)

        @functools.wraps(build)
        def constructor(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="`input_shape` is undefined or non-square")
                return build(*args, **kwargs)

        return constructor


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _add(name, constructor, size, min_size, prep, feat, classic_feat, block_end, stylize=((), (), ()), **kwargs):
    register_backbone(BackboneSpec(name, constructor, size, min_size, prep, feat, classic_feat, block_end,
                                   tuple(sorted(kwargs.items())), *stylize))


# The layers that end a block, per family: each is a cut of the network (every path from the input to
# the output runs through it), so what follows it can be trained, and its output cached, on its own.
# Residual families end a block at the addition (or at the projection of a block without a shortcut).
_VGG = r"^block\d_pool$"
_RESNET = r"^conv\d_block\d+_out$"
_MOBILENET = r"^conv_pw_\d+_relu$"
_MOBILENET_V2 = r"^(expanded_conv_project_BN|block_\d+_(add|project_BN))$"
_MOBILENET_V3 = r"^expanded_conv(_\d+)?_(add|project_bn)$"
_EFFICIENTNET = r"^block\d+[a-z]_(add|project_bn)$"
_XCEPTION = r"^add(_\d+)?$"  # Keras names Xception's residual additions add, add_1, ...
_CONVNEXT = r"^convnext_\w+_downsampling_block_\d$"  # its additions are operations, not layers: cut at stages
_INCEPTION = r"^mixed\d+$"
_DENSENET = r"^(conv\d_block\d+_concat|pool\d_pool)$"


# Style transfer (Gatys et al. 2015): a deep layer for content, the first layer of every block for style, and
# loss weights that balance them (TensorFlow's tutorial's for VGG).
_VGG_STYLIZE = (("block5_conv2",), tuple(f"block{i}_conv1" for i in range(1, 6)), (1e4, 1e-2, 30.0))
# MobileNetV2 by analogy: the expansion activations that start each resolution, the deepest for content. Its
# Gram matrices are far smaller than VGG's: with VGG's weights its style loss rose; these made it fall 40-fold
# in 150 Adam steps at 256 px (benchmarks/stylize.py pictures) with the content still recognisable.
_MOBILENET_V2_STYLIZE = (("block_13_expand_relu",),
                         ("block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu"),
                         (1e3, 1e6, 1.0))

_add("vgg16", "VGG16", 224, 32, "caffe", 512, 4096, _VGG, stylize=_VGG_STYLIZE)
_add("vgg19", "VGG19", 224, 32, "caffe", 512, 4096, _VGG, stylize=_VGG_STYLIZE)
_add("resnet50", "ResNet50", 224, 32, "caffe", 2048, 2048, _RESNET)
_add("resnet101", "ResNet101", 224, 32, "caffe", 2048, 2048, _RESNET)
_add("resnet50_v2", "ResNet50V2", 224, 32, "tf", 2048, 2048, _RESNET)
_add("mobilenet", "MobileNet", 224, 32, "tf", 1024, 1024, _MOBILENET)
_add("mobilenet_v2", "MobileNetV2", 224, 32, "tf", 1280, 1280, _MOBILENET_V2, stylize=_MOBILENET_V2_STYLIZE)
_add("mobilenet_v3_small", "MobileNetV3Small", 224, 32, "none", 576, 1024, _MOBILENET_V3)
_add("mobilenet_v3_large", "MobileNetV3Large", 224, 32, "none", 960, 1280, _MOBILENET_V3)
_add("efficientnet_b0", "EfficientNetB0", 224, 32, "none", 1280, 1280, _EFFICIENTNET)
_add("efficientnet_b1", "EfficientNetB1", 240, 32, "none", 1280, 1280, _EFFICIENTNET)
_add("efficientnet_b2", "EfficientNetB2", 260, 32, "none", 1408, 1408, _EFFICIENTNET)
_add("efficientnet_b3", "EfficientNetB3", 300, 32, "none", 1536, 1536, _EFFICIENTNET)
_add("efficientnet_v2_b0", "EfficientNetV2B0", 224, 32, "none", 1280, 1280, _EFFICIENTNET)
_add("efficientnet_v2_s", "EfficientNetV2S", 384, 32, "none", 1280, 1280, _EFFICIENTNET)
_add("convnext_tiny", "ConvNeXtTiny", 224, 32, "none", 768, 768, _CONVNEXT)
_add("xception", "Xception", 299, 71, "tf", 2048, 2048, _XCEPTION)
_add("inception_v3", "InceptionV3", 299, 75, "tf", 2048, 2048, _INCEPTION)
_add("densenet121", "DenseNet121", 224, 32, "torch", 1024, 1024, _DENSENET)


_CUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graph_cuts(net) -> list[str]:
    """Names of the layers of a functional network whose output every later layer depends on alone.

    Read from the network's config (the public, serialised form of its graph): layer j's inputs come from
    layers listed before it, and a layer i is a cut when no layer after it takes an input from before it.
    Kept per network (a functional graph does not change): serialising it costs 70 ms for MobileNetV2,
    and a run or a search asks for the same network's cuts dozens of times.
    """
    if net not in _CUTS:
        _CUTS[net] = _graph_cuts(net)
    return list(_CUTS[net])


def _graph_cuts(net) -> list[str]:
    layers = net.get_config()["layers"]
    position = {layer["name"]: i for i, layer in enumerate(layers)}
    earliest = [min((position[name] for name in _inbound(layer)), default=i) for i, layer in enumerate(layers)]
    cuts, reach = [], len(layers)
    for i in range(len(layers) - 1, -1, -1):
        if reach >= i and i < len(layers) - 1:
            cuts.append(layers[i]["name"])
        reach = min(reach, earliest[i])
    return cuts[::-1]


def _inbound(layer_config: dict) -> set[str]:
    found = set()

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "__keras_tensor__":
                found.add(node["config"]["keras_history"][0])
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(layer_config.get("inbound_nodes", []))
    return found


def backbone_blocks(net, spec: BackboneSpec) -> list[str]:
    """The layers that end each block of `net` (a backbone built from `spec`), from the input up."""
    pattern = re.compile(spec.block_end)
    layers = {layer.name for layer in net.layers}  # not operations such as ConvNeXt's `x + shortcut`
    return [name for name in graph_cuts(net) if pattern.match(name) and name in layers]


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a shell-style pattern, e.g. "efficientnet*"."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; unknown names get the closest matches suggested."""
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    by_constructor = {spec.constructor.lower(): spec for spec in _REGISTRY.values()}
    if key.replace("_", "") in by_constructor:
        return by_constructor[key.replace("_", "")]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
    raise BackboneError(f"Unknown backbone `{name}`.{hint} Run `tltool backbones` to list them all.")


def count_params(name: str) -> int:
    """Parameters of a backbone without its top, at its default size (builds it with random weights)."""
    import keras

    spec = get_backbone_spec(name)
    net = spec.constructor_fn()(include_top=False, weights=None,
                                input_shape=(spec.default_size, spec.default_size, 3), **dict(spec.extra_kwargs))
    count = net.count_params()
    keras.backend.clear_session()
    return count


def check_image_size(spec: BackboneSpec, size: int) -> None:
    if size < spec.min_size:
        raise BackboneError(f"Image size {size} is too small for {spec.name}: it needs at least "
                            f"{spec.min_size} px. Use --image-size {spec.default_size} (its default).")


def preprocessing_layer(spec: BackboneSpec):
    """A frozen built-in layer doing the backbone's `preprocess_input`, or None if the model has it built in.

    All three modes are an affine map of the RGB channels (caffe also swaps RGB to BGR), so one frozen
    1x1 `Dense(3)` expresses each exactly. Built-in layers keep `model.keras` loadable by plain Keras.
    """
    if spec.preprocessing_included:
        return None
    import keras
    import numpy as np

    if spec.preprocessing == "tf":
        kernel, bias = np.eye(3) / 127.5, -np.ones(3)
    elif spec.preprocessing == "torch":
        std = np.array(_TORCH_STD) * 255.0
        kernel, bias = np.diag(1.0 / std), -np.array(_TORCH_MEAN) / np.array(_TORCH_STD)
    elif spec.preprocessing == "caffe":
        kernel, bias = np.eye(3)[:, ::-1], -np.array(_CAFFE_MEAN_BGR)
    else:
        raise ValueError(f"unknown preprocessing mode {spec.preprocessing!r}")
    return keras.layers.Dense(
        3, name=f"preprocess_{spec.preprocessing}", trainable=False, dtype="float32",
        kernel_initializer=keras.initializers.Constant(kernel.astype("float32")),
        bias_initializer=keras.initializers.Constant(bias.astype("float32")),
    )


# ------------------------------------------------------------------------------------------ weights


@dataclass(frozen=True)
class ResolvedWeights:
    """What to load into a backbone: "imagenet", None (random) or a file, plus a fingerprint for caches."""

    kind: str           # "imagenet", "none" or "file"
    path: Path | None   # the file for kind "file"
    fingerprint: str    # changes whenever the weights change
    fell_back: bool = False

    @property
    def pretrained(self) -> bool:
        return self.kind != "none"

    @property
    def keras_arg(self):
        return {"imagenet": "imagenet", "none": None, "file": None}[self.kind]


def resolve_weights(spec: BackboneSpec, weights: str, fallback: str | None = None,
                    classic: bool = False, image_size: int | None = None) -> ResolvedWeights:
    """Decide where a backbone's weights come from, before any heavy work.

    For "imagenet" this makes sure the weights file is in Keras's cache (downloading it when online) so
    that an offline machine fails here, at once, with a message saying what to do, instead of after
    reading the data. With `fallback="none"` it warns loudly and continues with random weights.
    `image_size` matters for networks whose weight file depends on it (MobileNet, MobileNetV2).
    """
    if weights == "none":
        return ResolvedWeights("none", None, "random")
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"Weights file not found: {path}. Pass --weights imagenet, none, or the path of a "
                               f"{spec.name} weights file without its top (.weights.h5 or .h5).")
        if not (path.name.endswith(".weights.h5") or path.suffix == ".h5"):
            raise WeightsError(f"Expected a Keras weights file (.weights.h5 or .h5) for --weights. Received: {path}")
        return ResolvedWeights("file", path.resolve(), "file:" + file_digest(path))
    try:
        _ensure_imagenet_cached(spec, classic, image_size or spec.default_size)
    except WeightsError:
        if fallback != "none":
            raise
        import warnings

        warnings.warn(f"{FALLBACK_WARNING} {spec.name} cannot be had here (offline?): training from RANDOM "
                      f"initialisation instead, as the recipe's `backbone.fallback: none` allows. Accuracy "
                      f"will be far below a pretrained model's.", UserWarning, stacklevel=2)
        return ResolvedWeights("none", None, "random", fell_back=True)
    return ResolvedWeights("imagenet", None, f"imagenet:{spec.constructor}:{'top' if classic else 'notop'}")


#: How the warning of a fall back to random weights starts (a search says it once, not at every trial).
FALLBACK_WARNING = "ImageNet weights for"


def _ensure_imagenet_cached(spec: BackboneSpec, classic: bool, size: int) -> None:
    """Build the backbone once with ImageNet weights: Keras downloads into its cache or reads from it."""
    import keras

    size = spec.default_size if classic else size
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an unreachable server must not hang the run
    try:
        fn = spec.constructor_fn()
        kwargs = dict(spec.extra_kwargs)
        with _download_notice_held_until_progress():
            fn(include_top=classic, weights="imagenet", input_shape=(size, size, 3), **kwargs)
    except Exception as exc:  # urllib and Keras raise several types for "could not download"
        raise imagenet_unavailable(spec, exc) from None
    finally:
        socket.setdefaulttimeout(previous)
        keras.backend.clear_session()


class _HeldDownloadNotice:
    """sys.stdout while Keras fetches weights: its "Downloading data from URL" line waits for the first
    progress output, so a download that cannot start shows tltool's error alone, not a start and a failure."""

    NOTICE = "Downloading data from "

    def __init__(self, target):
        self.target = target
        self.held = ""

    def write(self, text: str) -> int:
        if not self.held and text.startswith(self.NOTICE):
            self.held = text
            return len(text)
        self.release()
        return self.target.write(text)

    def release(self) -> None:
        if self.held:
            self.target.write(self.held)
            self.held = ""

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name):  # isatty, encoding, fileno...: Keras's progress bar asks
        return getattr(self.target, name)


@contextlib.contextmanager
def _download_notice_held_until_progress():
    import sys

    original = sys.stdout
    held = _HeldDownloadNotice(original)
    sys.stdout = held
    try:
        yield
        held.release()  # a download that finished (or a cached file: then nothing was held)
    finally:
        sys.stdout = original


def imagenet_unavailable(spec: BackboneSpec, exc: Exception) -> WeightsError:
    """The one-line error for ImageNet weights that cannot be downloaded, with what to do instead."""
    import os
    import re

    # Where keras.utils.get_file caches downloads (Keras reads KERAS_HOME once, at import).
    cache = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser()
    # Keras's message names the URL ("URL fetch failure on https://...h5: None -- [Errno -3] ..."): the user
    # needs all of it, to fetch that file elsewhere, so it is given whole and the rest of the message is cut.
    url = re.search(r"https?://[^\s:]+(?::\d+)?[^\s:]*", str(exc))
    reason = str(exc) if url is None else str(exc)[url.end():].lstrip(": ")
    wanted = "Keras's weight file" if url is None else url.group(0)
    return WeightsError(
        f"Cannot get ImageNet weights for {spec.name} ({type(exc).__name__}: {reason[:100]}). "
        f"On a machine without internet: download {wanted} elsewhere and copy it into {cache / 'models'}, "
        f"or pass --weights PATH to a {spec.name} weights file without its top, or --weights none to train "
        f"from scratch.")


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
