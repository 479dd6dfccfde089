"""`stylize`: one picture's content in another's style, optimised on a registered backbone's layers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tltool import interrupts, outputs, rundir
from tltool.data.images import ImageReadError, decode
from tltool.errors import DataError
from tltool.files import atomic_save, atomic_write_json
from tltool.models.backbones import get_backbone_spec, resolve_weights
from tltool.models.style import LossWeights, StyleLoss, declared_layers, feature_model
from tltool.recipe import Recipe, load_recipe, save_recipe

RESULT_FILE, SHEET_FILE, CURVE_FILE, SUMMARY_FILE = "result.png", "sheet.png", "loss.png", "stylize.json"


@dataclass
class StylizeResult:
    """What `stylize` returns: the output folder, the content of stylize.json and the image (H, W, 3 uint8)."""

    out: Path
    summary: dict
    image: np.ndarray


def stylize(content, style, recipe=None, *, backbone=None, weights=None, size=None, steps=None, optimizer=None,
            content_weight=None, style_weight=None, tv_weight=None, init=None, seed=None, out=None,
            force: bool = False, overrides=(), verbose: int = 1, log=None) -> StylizeResult:
    """Optimise an image to keep `content`'s content in `style`'s style; write it and its records to `out`.

    Args:
        content, style: image files (any format tltool reads).
        recipe: a recipe (path or `Recipe`) whose `stylize` section and `seed` are used; None for defaults.
        backbone ... init, seed: override the recipe's `stylize.*` fields (and `seed`).
        out: folder to write; default `runs/stylize-CONTENT-TIME`.
        force: replace `out` if it holds an earlier stylization.
        overrides: `--set` style `stylize.steps=100` strings.
        verbose: 1 for a progress bar, 0 for none.
        log: callable for progress messages, or None for silence.

    Ctrl-C stops the optimisation and still writes the image reached so far (then re-raises).

    Raises:
        DataError: a missing or unreadable image, or a size too small for the backbone.
        BackboneError / WeightsError: a backbone without declared layers; weights that cannot be had.
    """
    say = log or (lambda *a, **k: None)
    t_start = time.perf_counter()
    flags = {"backbone": backbone, "weights": None if weights is None else str(weights), "size": size,
             "steps": steps, "optimizer": optimizer, "content_weight": content_weight,
             "style_weight": style_weight, "tv_weight": tv_weight, "init": init}
    recipe = load_recipe(recipe, overrides=overrides, values={"stylize": flags, "seed": seed})
    cfg = recipe.stylize
    if cfg.weights not in ("imagenet", "none"):  # absolute: the saved recipe repeats from any folder
        cfg.weights = str(Path(cfg.weights).expanduser().resolve())
    spec = get_backbone_spec(cfg.backbone)
    content_layers, _ = declared_layers(spec)
    content_img, style_img = _read(content, "content"), _read(style, "style")
    height, width = _result_shape(content_img.size, cfg.size, spec.min_size, spec.name)
    resolved = resolve_weights(spec, cfg.weights, image_size=cfg.size)
    out = Path(out) if out is not None else _new_out_dir(Path(content).stem)
    with outputs.claim_output_dir(out, "stylization", force=force, inputs=[Path(content), Path(style)]):
        return _run(cfg, recipe, spec, resolved, content_img, style_img, (height, width), len(content_layers),
                    out, say, verbose, t_start)


def _run(cfg, recipe: Recipe, spec, resolved, content_img, style_img, shape, n_content, out: Path, say, verbose,
         t_start) -> StylizeResult:
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(recipe.seed)
    height, width = shape
    content = _pixels(content_img.resize((width, height), Image.LANCZOS))
    style_size = _fit(style_img.size, max(height, width))
    style = _pixels(style_img.resize(style_size[::-1], Image.LANCZOS))
    kind = {"none": "random", "file": "file"}.get(resolved.kind, resolved.kind)
    say(f"tltool stylize: {spec.name} ({kind} weights) at {width}x{height} px, {cfg.steps} "
        f"{cfg.optimizer} steps from the {cfg.init} image. Output: {out}")
    t0 = time.perf_counter()
    model = feature_model(spec, resolved, None, None)
    weights = LossWeights.of(spec, cfg.content_weight, cfg.style_weight, cfg.tv_weight)
    loss = StyleLoss(model, content, style, n_content, weights)
    start = content if cfg.init == "content" else np.random.default_rng(recipe.seed).random(content.shape, np.float32)
    history: list[dict] = []  # step 0 is the starting image
    bar = keras.utils.Progbar(cfg.steps, unit_name="step", verbose=verbose) if verbose else None

    def on_step(parts) -> None:
        interrupts.check()  # Ctrl-C stops here, between steps (see ctrl_c_at_safe_points)
        history.append({"step": len(history), **{k: float(v) for k, v in parts.items()}})
        if bar is not None and len(history) > 1:
            bar.update(len(history) - 1, [("loss", history[-1]["loss"])])

    total, content_loss, style_loss, tv, _ = loss.value_and_gradient(start[None])
    on_step({"loss": total, "content": content_loss, "style": style_loss, "tv": tv})

    run = _lbfgs if cfg.optimizer == "lbfgs" else _adam
    latest = {"image": start}  # the image after the last finished step: what Ctrl-C keeps
    stopped = None  # Ctrl-C or SIGTERM: the image so far is written, then the stop goes on
    try:
        with interrupts.ctrl_c_at_safe_points():
            run(loss, start, cfg, on_step, latest)
    except (KeyboardInterrupt, interrupts.Interrupted) as exc:
        stopped = exc
    image = latest["image"]
    seconds = time.perf_counter() - t0
    summary = _summary(cfg, recipe, spec, resolved, weights, shape, history, seconds,
                       time.perf_counter() - t_start, stopped is not None)
    result = _write(out, recipe, summary, content, style, image, history)
    if stopped is not None:
        say(f"\nInterrupted after {summary['steps_done']} step(s): the image so far is in {out / RESULT_FILE}.")
        raise stopped
    say(_done_line(summary, out))
    return StylizeResult(out, summary, result)


def _read(path, role: str) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"The {role} image {path} does not exist{' (it is a folder)' if path.is_dir() else ''}. "
                        f"Pass an image file.")
    try:
        return decode(path)
    except ImageReadError as exc:
        raise DataError(f"The {role} image {path} cannot be read: {exc}.") from None


def _fit(size: tuple[int, int], longer: int) -> tuple[int, int]:
    """(height, width) with the longer side `longer` and the aspect ratio of a PIL (width, height) size."""
    width, height = size
    scale = longer / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _result_shape(content_size, longer: int, min_size: int, backbone: str) -> tuple[int, int]:
    height, width = _fit(content_size, longer)
    if min(height, width) < min_size:
        need = int(np.ceil(longer * min_size / min(height, width)))
        raise DataError(f"--size {longer} makes the result {width}x{height} px, but {backbone}'s layers need at "
                        f"least {min_size} px on each side. Pass --size {need} or more.")
    return height, width


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, np.float32) / 255.0


def _lbfgs(loss: StyleLoss, start: np.ndarray, cfg, on_step, latest: dict) -> None:
    """L-BFGS-B on the pixels, bounded to [0, 1] (no clipping needed); one step is one iteration."""
    import tensorflow as tf
    from scipy.optimize import Bounds, minimize

    shape = (1, *start.shape)
    last_eval: dict = {}

    def value_and_gradient(flat):
        total, content, style, tv, grad = loss.value_and_gradient(tf.constant(flat.reshape(shape), tf.float32))
        last_eval.update(x=flat.copy(), parts={"loss": total, "content": content, "style": style, "tv": tv})
        return float(total), grad.numpy().astype(np.float64).ravel()

    def after_iteration(xk):
        latest["image"] = xk.reshape(start.shape).astype(np.float32)
        if not np.array_equal(last_eval.get("x"), xk):  # the accepted point is usually the last evaluated
            value_and_gradient(xk)
        on_step(last_eval["parts"])

    x0 = start.astype(np.float64).ravel()
    minimize(value_and_gradient, x0, jac=True, method="L-BFGS-B", bounds=Bounds(0.0, 1.0), callback=after_iteration,
             options={"maxiter": cfg.steps, "maxcor": 10, "ftol": 0.0, "gtol": 0.0})


def _adam(loss: StyleLoss, start: np.ndarray, cfg, on_step, latest: dict) -> None:
    """Adam on the pixels (TensorFlow's tutorial settings), clipped to [0, 1] after every step; each step's
    losses are those of the image it produced."""
    import keras
    import tensorflow as tf

    image = tf.Variable(start[None])
    adam = keras.optimizers.Adam(learning_rate=cfg.learning_rate, beta_1=0.99, epsilon=0.1)
    grad = loss.value_and_gradient(tf.convert_to_tensor(image))[-1]
    for _ in range(cfg.steps):
        adam.apply_gradients([(grad, image)])
        image.assign(tf.clip_by_value(image, 0.0, 1.0))
        latest["image"] = image.numpy()[0]
        total, content, style, tv, grad = loss.value_and_gradient(tf.convert_to_tensor(image))
        on_step({"loss": total, "content": content, "style": style, "tv": tv})


def _summary(cfg, recipe, spec, resolved, weights, shape, history, seconds, total_s, interrupted) -> dict:
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        "backbone": spec.name, "weights": resolved.kind if resolved.kind != "file" else str(resolved.path),
        "content_layers": list(spec.content_layers), "style_layers": list(spec.style_layers),
        "height": shape[0], "width": shape[1], "settings": {**vars(cfg), "seed": recipe.seed},
        "loss_weights": {"content": weights.content, "style": weights.style, "tv": weights.tv},
        "steps_done": max(0, len(history) - 1), "interrupted": interrupted,
        "first": first, "last": last, "history": history,
        "timings": {"optimise_s": round(seconds, 3), "per_step_s": round(seconds / max(1, len(history) - 1), 4),
                    "total_s": round(total_s, 3)},
    }


def _write(out: Path, recipe: Recipe, summary: dict, content, style, image, history) -> np.ndarray:
    result = _to_uint8(image)
    _save_png(out / RESULT_FILE, result)
    _save_png(out / SHEET_FILE, _sheet([content, style, image]))
    if history:
        _plot_losses(out / CURVE_FILE, history)
    save_recipe(recipe, out / "recipe.yaml")
    atomic_write_json(out / SUMMARY_FILE, summary)
    return result


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] as 0-255 bytes."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _save_png(path: Path, pixels: np.ndarray) -> None:
    atomic_save(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))


def _sheet(images: list[np.ndarray], gap: int = 8) -> np.ndarray:
    """content | style | result side by side at one height, on white."""
    height = images[0].shape[0]
    tiles = []
    for img in images:
        tile = Image.fromarray(_to_uint8(img))
        tiles.append(np.asarray(tile.resize((max(1, round(tile.width * height / tile.height)), height),
                                            Image.LANCZOS)))
    width = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
    sheet = np.full((height, width, 3), 255, np.uint8)
    x = 0
    for tile in tiles:
        sheet[:, x:x + tile.shape[1]] = tile
        x += tile.shape[1] + gap
    return sheet


def _plot_losses(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    floor = 1e-6 * max(h["loss"] for h in history)  # a start at exactly the content image has content loss 0
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in (("loss", "total (weighted sum)"), ("content", "content"), ("style", "style"),
                       ("tv", "total variation")):
        ax.plot(steps, [max(h[key], floor) for h in history], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (parts unweighted)")
    ax.legend()
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _done_line(summary: dict, out: Path) -> str:
    first, last = summary["first"], summary["last"]
    return (f"Done in {summary['timings']['total_s']:.1f}s ({summary['timings']['per_step_s']:.2f} s a step): style "
            f"loss {first['style']:.4g} -> {last['style']:.4g}, content loss {first['content']:.4g} -> "
            f"{last['content']:.4g}. Image: {out / RESULT_FILE}; side by side: {out / SHEET_FILE}.")


def _new_out_dir(stem: str) -> Path:
    return rundir.new_run_dir(f"stylize-{stem or 'image'}")
