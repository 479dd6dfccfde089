"""Tiny datasets and recipes for tests: made on the fly, small enough for a CPU test suite."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def make_image_folder(root: Path, classes=("red", "green", "blue"), per_class: int = 8, size: int = 40,
                      seed: int = 0) -> Path:
    """A folder of solid-colour images with noise, one sub-folder per class: trivially learnable."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array(COLORS.get(name, tuple(rng.integers(0, 255, 3))), np.float32)
        for i in range(per_class):
            noise = rng.normal(0, 20, (size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            ext = ".png" if i % 2 else ".jpg"
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}{ext}")
    return root


def tiny_recipe_args(size: int = 32) -> list[str]:
    """`--set` overrides that make a finetune run take seconds: tiny inputs, random weights, few epochs, no
    augmented views, no measured flip and no measured feature layer (tests of those set them themselves)."""
    return ["--set", "backbone.weights=none", "--set", f"data.image_size={size}", "--set", "data.batch_size=8",
            "--set", "frozen.epochs=2", "--set", "fine_tune.epochs=1", "--set", "fine_tune.unfreeze=1",
            "--set", "frozen.feature_views=0", "--set", "augment.flip=horizontal", "--set", "head.layer=top",
            "--set", "head.grid=1"]


def tiny_values(size: int = 32) -> dict:
    """The same as `tiny_recipe_args`, as `overrides` for the Python API."""
    return ["backbone.weights=none", f"data.image_size={size}", "data.batch_size=8", "frozen.epochs=2",
            "fine_tune.epochs=1", "fine_tune.unfreeze=1", "frozen.feature_views=0", "augment.flip=horizontal",
            "head.layer=top", "head.grid=1", "head.l2=0"]


def calibrated_backbone_weights(path: Path, backbone: str = "mobilenet_v2", size: int = 32,
                                images: Path | None = None) -> Path:
    """Save random backbone weights whose BatchNorm statistics are calibrated on `images` (or noise).

    A randomly initialised BatchNorm backbone in inference mode shrinks its features towards zero (about
    1e-13 for MobileNetV2), so a head trained on them learns nothing. One training-mode pass with momentum
    0 sets every BatchNorm's statistics from real activations: the features then carry the images' colours,
    which is enough for a tiny model that really discriminates, as tests of export and inference need.
    Pass the file as `backbone.weights`.
    """
    import keras

    from tltool.models.backbones import get_backbone_spec, preprocessing_layer

    spec = get_backbone_spec(backbone)
    keras.utils.set_random_seed(0)
    net = spec.constructor_fn()(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg",
                                **dict(spec.extra_kwargs))
    if images is not None:
        from tltool.data.images import load_image

        files = sorted(p for p in Path(images).rglob("*") if p.suffix in (".png", ".jpg"))
        pixels = np.stack([load_image(p, size) for p in files]).astype(np.float32)
    else:
        pixels = np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)).astype(np.float32)
    prep = preprocessing_layer(spec)
    x = prep(pixels) if prep is not None else pixels
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    net(x, training=True)
    path = Path(path)
    net.save_weights(path)
    keras.backend.clear_session()
    return path


def tiny_trained_run(root: Path, calibrate_on_noise: bool = False, overrides: tuple = ()) -> Path:
    """A finished run in root/run, trained on root/images, whose probabilities differ from image to image.

    Stage 1 only, on a calibrated backbone, trained to confident outputs: export and inference tests need
    a model whose answers depend on the image, or every parity check would pass trivially.
    `calibrate_on_noise`: BatchNorm statistics from noise images instead of the training images.
    `overrides`: more `--set` values for the run's recipe.
    """
    import tltool

    images = make_image_folder(Path(root) / "images")
    weights = calibrated_backbone_weights(Path(root) / "backbone.weights.h5",
                                          images=None if calibrate_on_noise else images)
    tltool.finetune(data=images, out=Path(root) / "run", verbose=0,
                    overrides=tiny_values(32) + ["fine_tune.epochs=0", "frozen.epochs=20", "frozen.learning_rate=0.01",
                                                 "frozen.early_stopping=0", f"backbone.weights={weights}",
                                                 *overrides])
    return Path(root) / "run"


# ------------------------------------------------------------------------------------------ recomputation
# What a run reports, computed again from its saved files by other code than the run's: model.keras run on
# images decoded here, labels read off the class folders' names.


def image_paths(folder: Path) -> list[Path]:
    """The image files of a class-per-sub-folder tree, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".png", ".jpg"))


def validation_paths(run_dir: Path) -> list[str]:
    """The validation images of a run: its recipe's val folder, or the seeded split of its training folder."""
    from tltool.data.folders import scan_folder, stratified_split
    from tltool.recipe import load_recipe

    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    if recipe.data.val:
        return [str(p) for p in image_paths(recipe.data.val)]
    full = scan_folder(recipe.data.train)
    return stratified_split(full, recipe.data.val_split, recipe.seed, recipe.data.group_by)[1].paths


def load_saved_model(model_file: Path):
    """keras.models.load_model of a file, loaded once per version of the file (tests only read it)."""
    model_file = Path(model_file)
    return _load_saved_model(str(model_file), model_file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_saved_model(path: str, mtime_ns: int):
    import keras

    return keras.models.load_model(path, compile=False)


def saved_model_probabilities(run_dir: Path, paths) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities of RUN/model.keras on `paths`, true labels from the files' class folders)."""
    from tltool.data.images import load_image

    classes = (Path(run_dir) / "labels.txt").read_text().split()
    model = load_saved_model(Path(run_dir) / "model.keras")
    size = int(model.input_shape[1])
    pixels = np.stack([load_image(p, size) for p in paths]).astype(np.float32)
    outputs = model.predict(pixels, batch_size=16, verbose=0)  # {probabilities, ood_score}
    probs = np.asarray(outputs["probabilities"], np.float64)
    labels = np.array([classes.index(Path(p).parent.name) for p in paths])
    return probs, labels


def saved_model_accuracy(run_dir: Path, paths) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of RUN/model.keras on `paths`, recomputed from scratch."""
    probs, labels = saved_model_probabilities(run_dir, paths)
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(np.mean(probs.argmax(1) == labels)), float(-np.mean(np.log(picked)))
