"""Generate tltool's sample dataset: data/sample/{circle,square,triangle}/.

Each image is one shape on a textured background, drawn with Pillow from a fixed seed, so the data is
ours, reproducible, and small. The files deliberately mix what users' folders hold: JPEG and PNG, RGB,
RGBA with transparency, palette PNGs, grayscale, and sizes from 48 to 200 px, not all square.

    python data/make_sample.py            # (re)writes data/sample
    python data/make_sample.py --per-class 60 --out /tmp/bigger
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
# Each class leans to a hue so the task is learnable from colour and shape together; the ranges overlap.
HUE_CENTRE = {"circle": 0, "square": 120, "triangle": 240}


def _color(rng: random.Random, hue_centre: float, spread: float = 45) -> tuple[int, int, int]:
    import colorsys

    hue = ((hue_centre + rng.uniform(-spread, spread)) % 360) / 360
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: random.Random, w: int, h: int) -> Image.Image:
    """A soft two-tone gradient with a little noise: texture without shapes that could be confused with ours."""
    a = [rng.randint(40, 215) for _ in range(3)]
    b = [min(255, max(0, c + rng.randint(-60, 60))) for c in a]
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    for y in range(h):
        t = y / max(h - 1, 1)
        draw.line([(0, y), (w, y)], fill=tuple(int(a[i] * (1 - t) + b[i] * t) for i in range(3)))
    noise = Image.effect_noise((w, h), rng.uniform(4, 12)).convert("RGB")
    return Image.blend(img, noise, 0.08)


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    corners = 4 if kind == "square" else 3
    points = [(cx + r * math.cos(angle + 2 * math.pi * k / corners),
               cy + r * math.sin(angle + 2 * math.pi * k / corners)) for k in range(corners)]
    draw.polygon(points, fill=fill)


def make_image(rng: random.Random, kind: str) -> Image.Image:
    w = rng.randint(48, 160)
    h = max(48, int(w * rng.uniform(0.75, 1.33)))
    img = _background(rng, w, h)
    draw = ImageDraw.Draw(img)
    r = min(w, h) * rng.uniform(0.28, 0.45)
    cx = rng.uniform(r, w - r)
    cy = rng.uniform(r, h - r)
    _shape(draw, kind, cx, cy, r, rng.uniform(0, 2 * math.pi), _color(rng, HUE_CENTRE[kind]))
    return img


def save_variant(img: Image.Image, path_stem: Path, index: int, rng: random.Random) -> Path:
    """Save in one of several formats and modes, cycling so every class has each kind."""
    variant = index % 6
    if variant in (0, 1, 2):
        path = path_stem.with_suffix(".jpg" if variant != 2 else ".JPEG")
        img.save(path, "JPEG", quality=rng.randint(70, 92))
    elif variant == 3:  # RGBA with a transparent border
        rgba = img.convert("RGBA")
        alpha = Image.new("L", img.size, 255)
        ImageDraw.Draw(alpha).rectangle([0, 0, img.width - 1, img.height - 1], outline=0, width=4)
        rgba.putalpha(alpha)
        path = path_stem.with_suffix(".png")
        rgba.save(path, "PNG", optimize=True)
    elif variant == 4:  # palette PNG
        path = path_stem.with_suffix(".png")
        img.convert("P", palette=Image.ADAPTIVE, colors=64).save(path, "PNG", optimize=True)
    else:  # grayscale JPEG
        path = path_stem.with_suffix(".jpg")
        img.convert("L").save(path, "JPEG", quality=85)
    return path


def generate(out: Path, per_class: int = 100, seed: int = 0) -> None:
    rng = random.Random(seed)
    if out.exists():
        shutil.rmtree(out)
    for kind in CLASSES:
        folder = out / kind
        folder.mkdir(parents=True)
        for i in range(per_class):
            save_variant(make_image(rng, kind), folder / f"{kind}_{i:03d}", i, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.out, args.per_class, args.seed)
    files = list(args.out.rglob("*.*"))
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} images ({size / 1e6:.2f} MB) to {args.out}")


if __name__ == "__main__":
    main()
