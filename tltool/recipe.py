"""Recipes: the schema, defaults, YAML loading, `--set` overrides and validation.

A recipe is loaded in fixed steps: parse YAML (safe loader) -> apply overrides -> check every key and type
against the schema (unknown keys are rejected with their dotted path and a did-you-mean, never dropped)
-> build the dataclasses with defaults -> cross-field checks. Every field carries its default and a
one-line description (`describe_fields()` lists them).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tltool.errors import RecipeError

SCHEMA_VERSION = 1


def _f(default, help: str, choices: tuple | None = None, minimum=None, maximum=None):
    """A schema field: its default, a one-line description and optional allowed values or bounds."""
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    train: Optional[str] = _f(None, "Image folder to train on: one sub-folder per class.")
    val: Optional[str] = _f(None, "Validation folder; without it, a seeded stratified split of `train`.")
    test: Optional[str] = _f(None, "Test folder, evaluated once at the end of the run.")
    val_split: float = _f(0.2, "Fraction of each class held out for validation when `val` is not given.",
                          minimum=0.0, maximum=0.9)
    group_by: Optional[str] = _f(None, "Regex on file names; files with the same match (group 1 if any) "
                                       "stay in the same split.")
    image_size: Optional[int] = _f(None, "Square input size in pixels; null = the backbone's default.",
                                   minimum=32, maximum=1024)
    batch_size: int = _f(32, "Images per batch.", minimum=1, maximum=4096)


@dataclass
class BackboneConfig:
    name: str = _f("mobilenet_v2", "Registered backbone (see `tltool backbones`).")
    weights: str = _f("imagenet", "`imagenet`, `none` (random init) or the path of a weights file of the "
                                  "backbone without its top (.weights.h5 / .h5).")
    fallback: Optional[str] = _f(None, "When ImageNet weights cannot be had: null = stop with an error, "
                                       "`none` = random initialisation with a loud warning.",
                                 choices=(None, "none"))


@dataclass
class HeadConfig:
    mode: str = _f("pooled", "`pooled`: pooling + dense layers + softmax on the backbone's features; "
                             "`classic`: keep the full pretrained network, swap only its last layer.",
                   choices=("pooled", "classic"))
    pooling: str = _f("avg", "Global pooling of the backbone's feature map (pooled mode).",
                      choices=("avg", "max"))
    layer: str = _f("auto", "Where the head reads the backbone (pooled mode): `top` (its output), the name of a "
                            "layer that ends one of its blocks (earlier, more generic features: far domains such "
                            "as scans, digits, textures), or `auto`: chosen by k-fold accuracy on the training "
                            "images among the top and up to three earlier blocks.")
    grid: Optional[int] = _f(None, "Pooling grid: 1 pools the feature map globally; 2 or 3 keep its coarse layout "
                                   "(one value per cell and channel). null: measured with the layer.",
                             minimum=1, maximum=4)
    dense: list[int] = _f([], "Sizes of hidden dense layers between the features and the softmax.")
    dropout: float = _f(0.2, "Dropout rate before each dense layer of the head.", minimum=0.0, maximum=0.95)
    l2: Optional[float] = _f(None, "L2 penalty on the classifier's weights (the factor of keras.regularizers.L2; "
                                   "0 = none). null: measured when stage 1 trains on cached features, by 3-fold "
                                   "log loss on the training images (none unless a penalty is clearly better); "
                                   "otherwise none.", minimum=0.0)
    normalize: bool = _f(True, "Centre the features on the training images' mean (when they are cached) and "
                               "scale each vector to a length of sqrt(its size) before the head's layers, and "
                               "start the classifier from zero (pooled mode): the head learns at the same pace "
                               "whatever the backbone's feature scale, and small datasets overfit less.")


@dataclass
class FrozenStageConfig:
    epochs: int = _f(30, "Most epochs of stage 1: backbone frozen, only the head trains (on cached features an "
                         "epoch takes milliseconds; early stopping ends it once validation stops improving).",
                     minimum=0)
    learning_rate: float = _f(1e-3, "Learning rate of stage 1.", minimum=0.0)
    optimizer: str = _f("adam", "Optimizer of stage 1.", choices=("adam", "adamw", "sgd", "rmsprop"))
    early_stopping: int = _f(5, "Stop after this many epochs without val_loss improvement, restoring the "
                                "best weights (0 = off).", minimum=0)
    cache_features: bool = _f(True, "Compute the backbone's features once, cache them on disk and train the "
                                    "head on them (much faster; same model).")
    feature_views: Optional[int] = _f(None, "Augmented views of each training image in the feature cache; the "
                                            "head sees one view of each image per epoch (0 = none, null = as "
                                            "many as the data size calls for).", minimum=0, maximum=32)


@dataclass
class FineTuneStageConfig:
    epochs: int = _f(5, "Epochs of stage 2: top backbone layers unfrozen (0 skips the stage).", minimum=0)
    learning_rate: float = _f(1e-5, "Learning rate of stage 2; keep it low (the unfrozen blocks start pretrained). "
                                    "A stage 2 that leaves the validation loss worse is undone.", minimum=0.0)
    optimizer: str = _f("adam", "Optimizer of stage 2.", choices=("adam", "adamw", "sgd", "rmsprop"))
    early_stopping: int = _f(3, "Patience of stage 2's early stopping (0 = off).", minimum=0)
    unfreeze: int = _f(2, "How many of the backbone's top blocks train in stage 2 (blocks as the registry defines "
                          "them per family, e.g. MobileNetV2's 17 inverted residual blocks; BatchNorm layers stay "
                          "frozen, in inference mode).", minimum=1)
    activation_budget_mb: float = _f(2048, "Stage 2 trains on cached activations below the unfrozen blocks "
                                           "(computed once per image and view) while they fit in this many MB; "
                                           "above it, or at 0, it streams augmented images every epoch.",
                                     minimum=0)
    schedule: str = _f("constant", "Learning rate over stage 2: `constant`, or `cosine` decay from "
                                   "learning_rate to 0 over its epochs.", choices=("constant", "cosine"))


@dataclass
class TrainConfig:
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy loss.", minimum=0.0, maximum=0.5)
    class_weights: str = _f("none", "`auto` weighs classes inversely to their frequency.",
                            choices=("none", "auto"))
    mixed_precision: bool = _f(False, "Train in mixed float16 (GPU only; ignored on CPU).")
    xla: bool = _f(False, "Compile training steps with XLA (GPU only; ignored on CPU).")
    strategy: str = _f("default", "`mirrored` trains on all visible GPUs; `multi_worker` on the hosts TF_CONFIG "
                                  "lists (see README).", choices=("default", "mirrored", "multi_worker"))
    deterministic: bool = _f(False, "Deterministic ops: the same seed gives the same metrics (slower).")
    cache_dir: Optional[str] = _f(None, "Feature cache folder; null = $TLTOOL_CACHE_DIR or "
                                        "~/.cache/tltool/features.")


@dataclass
class AugmentConfig:
    flip: str = _f("auto", "Random flips; `auto`: horizontal, unless mirrored copies measurably hurt on the "
                           "training images (digits, text, mirror-image classes); the run's recipe.yaml records "
                           "the decision.",
                   choices=("auto", "none", "horizontal", "vertical", "horizontal_and_vertical"))
    rotation: float = _f(0.1, "Random rotation, as a fraction of a full turn.", minimum=0.0, maximum=0.5)
    zoom: float = _f(0.0, "Random zoom, as a fraction of the image size.", minimum=0.0, maximum=0.9)
    contrast: float = _f(0.0, "Random contrast change factor.", minimum=0.0, maximum=1.0)
    translation: float = _f(0.0, "Random translation, as a fraction of the image size.",
                            minimum=0.0, maximum=0.5)


@dataclass
class TrustConfig:
    calibrate: bool = _f(True, "After training, fit a temperature on the validation images and fold it into the "
                               "final layer, so that probabilities mean what they say (every export inherits it).")
    ood: bool = _f(True, "Score how far each image lies from the training images in feature space; the model "
                         "and every export output it as `ood_score` (above 1: unknown), and `predict` answers "
                         "`unknown` for such images.")
    keep_rate: float = _f(0.95, "Share of the validation images the out-of-distribution threshold keeps.",
                          minimum=0.5, maximum=1.0)
    robustness: bool = _f(False, "Also measure, for the run report, the validation accuracy under small "
                                 "perturbations (FGSM, Gaussian noise) on up to 128 images: about 10-20 s on a CPU. "
                                 "`tltool evaluate` measures it by default.")
    ood_bank: int = _f(2048, "Most training-image features the score compares with; larger training sets are "
                             "summarised by that many centroids (per class, in proportion).", minimum=1,
                       maximum=65536)


@dataclass
class TuneConfig:
    algorithm: str = _f("hyperband", "Search algorithm.", choices=("hyperband", "bayesian", "random", "grid"))
    objective: str = _f("val_accuracy", "Metric the search maximises (val_accuracy) or minimises (val_loss).",
                        choices=("val_accuracy", "val_loss"))
    max_trials: int = _f(20, "Most trials the search runs.", minimum=1)
    space: dict = _f({}, "Search space: dotted recipe keys mapped to {choice: [...]}, {min, max, step, "
                         "sampling} or {boolean: true}; empty = a sensible default space.")


@dataclass
class ExportConfig:
    formats: list[str] = _f(["savedmodel"], "Formats `tltool export RUN` writes when no --format is given.",
                            choices=("savedmodel", "keras", "tflite", "onnx"))
    quantize: str = _f("none", "TFLite quantization `tltool export RUN` applies when no --quantize is given.",
                       choices=("none", "dynamic", "float16", "int8"))
    # Written into the TFLite metadata, where Android Studio and metadata viewers show them.
    description: str = _f("", "What the model does, for its users; default: the classes it tells apart.")
    model_version: str = _f("", "Version of the model; default: the run folder's name.")
    author: str = _f("", "Author of the model.")
    license: str = _f("", "License of the model (e.g. `Apache-2.0`).")


@dataclass
class StylizeConfig:
    """`tltool stylize`: one image's content in another's style (Gatys, Ecker and Bethge 2015)."""
    backbone: str = _f("vgg19", "Backbone whose layers define content and style (one that declares them: "
                                "vgg16, vgg19, mobilenet_v2).")
    weights: str = _f("imagenet", "imagenet, none (random: for tests only) or PATH to the backbone's weights "
                                  "file without its top.")
    size: int = _f(512, "Longer side of the result in pixels; the other follows the content's aspect ratio.",
                   minimum=16, maximum=4096)
    steps: int = _f(200, "Optimiser iterations on the image.", minimum=1)
    optimizer: str = _f("adam", "adam (reaches a given loss sooner on a CPU) or lbfgs (L-BFGS-B, bounded to valid "
                                "pixels: slower per step, lower in the end); see benchmarks/stylize.py.",
                        choices=("adam", "lbfgs"))
    learning_rate: float = _f(0.02, "Adam's step size on pixels in [0, 1] (adam only).", minimum=0.0)
    # The three loss weights default to the backbone's (registry): their scale depends on the network.
    content_weight: Optional[float] = _f(None, "Weight of the content loss (mean squared difference of content "
                                               "features); default: the backbone's (vgg: 1e4).", minimum=0.0)
    style_weight: Optional[float] = _f(None, "Weight of the style loss (mean squared difference of Gram matrices); "
                                             "default: the backbone's (vgg: 1e-2).", minimum=0.0)
    tv_weight: Optional[float] = _f(None, "Weight of the total-variation loss: the sum of absolute differences of "
                                          "neighbouring pixels (in [0, 1]), which keeps the result smooth; default: "
                                          "the backbone's (vgg: 30).", minimum=0.0)
    init: str = _f("content", "Start from the content image or from noise.", choices=("content", "noise"))


@dataclass
class Recipe:
    version: int = _f(SCHEMA_VERSION, "Recipe schema version.", minimum=1, maximum=SCHEMA_VERSION)
    name: str = _f("run", "Name of the run, shown in reports and in the default run folder runs/NAME-TIME.")
    seed: int = _f(42, "Seed of the split, the weights of the head and the augmentation.", minimum=0,
                   maximum=2**32 - 1)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Where the images are."})
    backbone: BackboneConfig = field(default_factory=BackboneConfig,
                                     metadata={"help": "The pretrained network."})
    head: HeadConfig = field(default_factory=HeadConfig, metadata={"help": "The new classifier on top."})
    frozen: FrozenStageConfig = field(default_factory=FrozenStageConfig,
                                      metadata={"help": "Stage 1: frozen backbone."})
    fine_tune: FineTuneStageConfig = field(default_factory=FineTuneStageConfig,
                                           metadata={"help": "Stage 2: top layers unfrozen."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Settings of both stages."})
    augment: AugmentConfig = field(default_factory=AugmentConfig,
                                   metadata={"help": "Augmentation of training images."})
    trust: TrustConfig = field(default_factory=TrustConfig,
                               metadata={"help": "Calibration and out-of-distribution rejection."})
    tune: TuneConfig = field(default_factory=TuneConfig, metadata={"help": "Hyperparameter search."})
    export: ExportConfig = field(default_factory=ExportConfig, metadata={"help": "Export defaults."})
    stylize: StylizeConfig = field(default_factory=StylizeConfig,
                                   metadata={"help": "Style transfer (`tltool stylize`)."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------------- loading


def load_recipe(path: "str | Path | Recipe | None" = None, overrides: list[str] | tuple[str, ...] = (),
                values: dict | None = None) -> Recipe:
    """Load, override and validate a recipe.

    Args:
        path: YAML file, or a `Recipe` to start from; None starts from the defaults.
        overrides: `dotted.key=value` strings (values parsed as YAML scalars), applied after the file.
        values: a nested dict of values applied last (used by the CLI flags and the Python API);
            None values are ignored.

    Returns:
        The validated `Recipe`.

    Raises:
        RecipeError: with the dotted path of the offending field and what was expected.
    """
    raw: dict = {}
    source = "recipe"
    if isinstance(path, Recipe):
        raw, path = path.to_dict(), None
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise RecipeError(f"Recipe file not found: {path}. Pass the path of a YAML recipe, e.g. "
                              f"recipes/quickstart.yaml.")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RecipeError(f"{source} is not valid YAML{where}: {getattr(exc, 'problem', exc)}.") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{source} must be a mapping of sections (data:, backbone:, ...). "
                              f"Received: {type(raw).__name__}.")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    for key, value in _flatten(values or {}):
        if value is not None:
            set_dotted(raw, key, value)
    return from_dict(raw, source=source)


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=c` into ("a.b", parsed YAML value of c)."""
    if "=" not in item:
        raise RecipeError(f"Expected an override of the form KEY=VALUE (e.g. frozen.epochs=5). Received: {item}")
    key, _, text = item.partition("=")
    key = key.strip()
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set `tree[a][b] = value` for key "a.b", creating sections as needed; the key is checked later."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict, source: str = "recipe") -> Recipe:
    """Validate a nested dict against the schema and build a `Recipe` (see `load_recipe`)."""
    recipe = _build(Recipe, raw, prefix="", source=source)
    _cross_checks(recipe, source)
    return recipe


def recorded_decisions(path: str | Path) -> list[str]:
    """The `decisions` lines a saved recipe carries (see save_recipe), so that a resumed run keeps them."""
    prefix = "# Measured: "
    lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).is_file() else []
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


def save_recipe(recipe: Recipe, path: str | Path, decisions=()) -> None:
    """Write the fully resolved recipe; `load_recipe` of the file gives the same recipe back. `decisions`:
    lines on values the run measured rather than took as given, written as comments."""
    from tltool.rundir import atomic_write_text

    header = ("# Resolved tltool recipe: every field with its value for this run.\n"
              "# Repeat the run with: tltool finetune THIS_FILE --out NEW_DIR\n"
              + "".join(f"# Measured: {line}\n" for line in decisions))
    atomic_write_text(Path(path), header + recipe.to_yaml())


def field_paths(cls=Recipe, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf field of the schema by dotted path."""
    out = {}
    for f in dataclasses.fields(cls):
        if cls is Recipe and f.name in _SECTIONS:
            out.update(field_paths(_SECTIONS[f.name], prefix + f.name + "."))
        else:
            out[prefix + f.name] = f
    return out


def describe_fields() -> list[tuple[str, Any, str]]:
    """(dotted path, default, description) of every field, for documentation and `--help`."""
    rows = []
    for path, f in field_paths().items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((path, default, f.metadata.get("help", "")))
    return rows


# ---------------------------------------------------------------------------------------- validation

_SECTIONS = {
    "data": DataConfig, "backbone": BackboneConfig, "head": HeadConfig, "frozen": FrozenStageConfig,
    "fine_tune": FineTuneStageConfig, "train": TrainConfig, "augment": AugmentConfig, "trust": TrustConfig,
    "tune": TuneConfig,
    "export": ExportConfig, "stylize": StylizeConfig,
}


def _build(cls, raw: Any, prefix: str, source: str):
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: expected `{where}` to be a mapping. Received: {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        key = str(key)
        if key not in fields:
            raise RecipeError(f"{source}: unknown key `{prefix}{key}`.{_did_you_mean(key, fields, prefix)}")
        path = prefix + key
        if key in _SECTIONS and cls is Recipe:
            kwargs[key] = _build(_SECTIONS[key], value if value is not None else {}, path + ".", source)
        else:
            kwargs[key] = _check_value(path, value, hints[key], fields[key].metadata, source)
    return cls(**kwargs)


def _did_you_mean(key: str, candidates, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    if close:
        return f" Did you mean `{prefix}{close[0]}`?"
    return f" Valid keys here: {', '.join(sorted(candidates))}."


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        inner = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(inner, _type_name(inner))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp) -> tuple[bool, Any]:
    """Return (ok, value converted to tp). Ints are accepted for floats; bools are not numbers."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _coerce(value, arg)
            if ok:
                return True, converted
        return False, value
    if tp is type(None):
        return value is None, None
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (inner,) = typing.get_args(tp)
        out = []
        for item in value:
            ok, converted = _coerce(item, inner)
            if not ok:
                return False, value
            out.append(converted)
        return True, out
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        return isinstance(value, str), value
    if tp is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def _check_value(path: str, value: Any, tp, meta, source: str) -> Any:
    ok, converted = _coerce(value, tp)
    if not ok:
        raise RecipeError(f"{source}: expected `{path}` to be {_type_name(tp)}. Received: {path}={value!r}")
    choices = meta.get("choices")
    items = converted if isinstance(converted, list) else [converted]
    if choices is not None and any(item not in choices for item in items):
        shown = ", ".join("null" if c is None else f"`{c}`" for c in choices)
        hint = difflib.get_close_matches(str(converted), [str(c) for c in choices if c], n=1)
        extra = f" Did you mean `{hint[0]}`?" if hint else ""
        raise RecipeError(f"{source}: expected `{path}` to be one of {shown}. Received: {path}={value!r}.{extra}")
    lo, hi = meta.get("min"), meta.get("max")
    numbers = converted if isinstance(converted, list) else [converted]
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):  # NaN passes every comparison below
            raise RecipeError(f"{source}: expected `{path}` to be a finite number. Received: {path}={value!r}")
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if (lo is not None and number < lo) or (hi is not None and number > hi):
                bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
                raise RecipeError(f"{source}: expected `{path}` to be {bounds}. Received: {path}={value!r}")
    return converted


def _cross_checks(recipe: Recipe, source: str) -> None:
    if not _SAFE_NAME.fullmatch(recipe.name) or recipe.name.strip(".") == "":
        raise RecipeError(f"{source}: `name` becomes a folder name (runs/NAME-TIME): use letters, digits, `.`, "
                          f"`_` and `-` only, with no path separators. Received: name={recipe.name!r}")
    if recipe.data.val is None and recipe.data.val_split <= 0.0:
        raise RecipeError(f"{source}: `data.val_split` must be above 0 when no `data.val` folder is given "
                          f"(received {recipe.data.val_split}); set `data.val_split: 0.2` or pass --val-data.")
    if recipe.frozen.epochs == 0 and recipe.fine_tune.epochs == 0:
        raise RecipeError(f"{source}: both `frozen.epochs` and `fine_tune.epochs` are 0: nothing would train.")
    if recipe.head.mode == "classic" and (recipe.head.layer not in ("auto", "top") or (recipe.head.grid or 1) > 1):
        raise RecipeError(f"{source}: `head.mode: classic` keeps the network's own top, so the head reads nothing "
                          f"else. Received: head.layer={recipe.head.layer}, head.grid={recipe.head.grid}; use "
                          f"head.mode: pooled, or drop them.")
    if any(units < 1 for units in recipe.head.dense):
        raise RecipeError(f"{source}: expected every entry of `head.dense` to be at least 1. "
                          f"Received: head.dense={recipe.head.dense}")
    if recipe.data.group_by is not None:
        try:
            compile_group_by(recipe.data.group_by)
        except ValueError as exc:
            raise RecipeError(f"{source}: `data.group_by` {exc}") from None
    known = field_paths()
    for key, entry in recipe.tune.space.items():
        if key not in known:
            raise RecipeError(f"{source}: unknown key `{key}` in `tune.space`."
                              f"{_did_you_mean(key, known, '')}")
        _check_space_entry(key, entry, known[key], source)


#: What `name` may hold: it goes into the default output folder, so no separators, no `..`, nothing hidden.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")

# Not searchable: identity fields, the search itself, and process-wide switches (op determinism cannot be
# turned off again within a process, so one trial would change every later one).
_UNTUNABLE = ("version", "name", "tune.", "trust.", "stylize.", "train.deterministic", "train.strategy", "train.mixed_precision")
SPACE_FORMS = "{choice: [...]}, {min: A, max: B, step: S, sampling: linear|log} or {boolean: true}"


def compile_group_by(pattern: str) -> re.Pattern:
    """The `group_by` regex compiled; ValueError with the reason when it is not a valid regular expression."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression: {exc}.") from None


def hidden_layers(value):
    """A `head.dense` value as layer sizes: in a search space a number is one hidden layer of that size, 0 none."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] if value else []
    return value


def field_type(key: str):
    """The type of a dotted schema field with Optional removed, e.g. float for `head.dropout`."""
    section, _, name = key.rpartition(".")
    tp = typing.get_type_hints(_SECTIONS[section] if section else Recipe)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _check_space_entry(key: str, entry: Any, fld: dataclasses.Field, source: str) -> None:
    """One `tune.space` entry: a known form whose values fit the field's type and bounds."""
    where = f"tune.space.{key}"
    if key.startswith(_UNTUNABLE) or key in _UNTUNABLE:
        raise RecipeError(f"{source}: `{key}` cannot be searched over; remove it from `tune.space`.")
    form = _space_form(entry, where, source)
    tp = field_type(key)
    units = typing.get_origin(tp) is list  # head.dense: a number is the size of one hidden layer (0 = none)

    def check(value, path=where):
        if units:
            value = hidden_layers(value)
        checked = _check_value(path, value, tp, fld.metadata, source)
        if units and any(n < 1 for n in checked):
            raise RecipeError(f"{source}: expected `{path}` to hold layer sizes of at least 1 (or 0 for no hidden "
                              f"layer). Received: {value!r}")
        return checked

    if form == "choice":
        values = entry["choice"]
        if not isinstance(values, list) or not values:
            raise RecipeError(f"{source}: expected `{where}.choice` to be a non-empty list. Received: {values!r}")
        for value in values:
            check(value)
    elif form == "boolean":
        if entry["boolean"] is not True or tp is not bool:
            raise RecipeError(f"{source}: `{where}: {{boolean: true}}` needs a true/false field and the value "
                              f"true; `{key}` is {_type_name(tp)}. Use {{choice: [...]}} instead.")
    else:
        if tp not in (int, float) and not units:
            raise RecipeError(f"{source}: `{where}` is a range but `{key}` is {_type_name(tp)}, not a number. "
                              f"Use {{choice: [...]}} instead.")
        lo, hi = _check_range(entry, float if tp is float else int, where, source)
        check(lo, where + ".min")
        check(hi, where + ".max")


def _space_form(entry: Any, where: str, source: str) -> str:
    """Which form a `tune.space` entry has: "choice", "boolean" or "min" (a range), with no stray keys."""
    if not isinstance(entry, dict):
        raise RecipeError(f"{source}: expected `{where}` to be one of {SPACE_FORMS}. Received: {entry!r}")
    forms = {"choice": {"choice"}, "boolean": {"boolean"}, "min": {"min", "max", "step", "sampling"}}
    form = next((f for f in ("choice", "boolean", "min") if f in entry or (f == "min" and "max" in entry)), None)
    extra = set(entry) - forms[form] if form else set(entry)
    if form is None or extra:
        name = sorted(extra)[0] if extra else None
        hint = _did_you_mean(name, ["choice", "boolean", "min", "max", "step", "sampling"], "") if name else ""
        raise RecipeError(f"{source}: expected `{where}` to be one of {SPACE_FORMS}. Received: {entry!r}.{hint}")
    return form


def _check_range(entry: dict, kind: type, where: str, source: str) -> tuple:
    """A range entry's min, max, step and sampling, checked against each other; returns (min, max)."""
    if "min" not in entry or "max" not in entry:
        raise RecipeError(f"{source}: expected `{where}` to give both `min` and `max`. Received: {entry!r}")
    for name in ("min", "max", "step"):
        value = entry.get(name)
        if value is None and name == "step":
            continue
        ok, _ = _coerce(value, kind)
        if not ok:
            raise RecipeError(f"{source}: expected `{where}.{name}` to be {_type_name(kind)}. "
                              f"Received: {name}={value!r}")
    lo, hi, step = kind(entry["min"]), kind(entry["max"]), entry.get("step")
    sampling = entry.get("sampling", "linear")
    if lo >= hi:
        raise RecipeError(f"{source}: expected `{where}.min` to be below `max`. Received: min={lo}, max={hi}")
    if step is not None and kind(step) <= 0:
        raise RecipeError(f"{source}: expected `{where}.step` to be above 0. Received: step={step}")
    if sampling not in ("linear", "log"):
        raise RecipeError(f"{source}: expected `{where}.sampling` to be one of `linear`, `log`. "
                          f"Received: sampling={sampling!r}")
    if sampling == "log" and lo <= 0:
        raise RecipeError(f"{source}: `{where}` samples on a log scale, so `min` must be above 0. "
                          f"Received: min={lo}")
    if sampling == "log" and step is not None and kind(step) <= 1:
        raise RecipeError(f"{source}: on a log scale `{where}.step` is a factor (10: 1e-4, 1e-3, ...) and "
                          f"must be above 1. Received: step={step}")
    return lo, hi


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and key in _SECTIONS and not prefix:
            yield from _flatten(value, key + ".")
        else:
            yield prefix + key, value
