"""Tiny datasets and recipes for tests: made on the fly, small enough for a CPU test suite."""

from __future__ import annotations

import random
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
    """`--set` overrides that make a finetune run take seconds: tiny inputs, random weights, few epochs."""
    return ["--set", "backbone.weights=none", "--set", f"data.image_size={size}", "--set", "data.batch_size=8",
            "--set", "frozen.epochs=2", "--set", "fine_tune.epochs=1", "--set", "fine_tune.unfreeze=5"]


def tiny_values(size: int = 32) -> dict:
    """The same as `tiny_recipe_args`, as `overrides` for the Python API."""
    return ["backbone.weights=none", f"data.image_size={size}", "data.batch_size=8", "frozen.epochs=2",
            "fine_tune.epochs=1", "fine_tune.unfreeze=5"]
