"""Time stage 2 on the GPUs at hand: plain, mixed precision, XLA, both, and MirroredStrategy over two GPUs.

A short, prepared check for a machine with a GPU. It makes a synthetic image folder (or takes --data),
runs `tltool.finetune` once per setting with the same recipe (stage 1 short, stage 2 streaming images
through the whole backbone, which is where a GPU pays), and prints each setting's stage-2 seconds, its
ratio to the plain run measured in the same process, and its validation accuracy. Settings that need
what the machine lacks (a GPU; two GPUs for mirrored) are skipped with the reason. On a CPU it still runs
the plain setting, so the script itself can be checked anywhere.

Examples:
    python benchmarks/gpu.py                                  # synthetic 224 px images, MobileNetV2, random weights
    python benchmarks/gpu.py --data PHOTOS/train --weights FILE --image-size 160 --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {  # name -> recipe overrides
    "plain": [],
    "mixed precision": ["train.mixed_precision=true"],
    "xla": ["train.xla=true"],
    "mixed precision + xla": ["train.mixed_precision=true", "train.xla=true"],
    "mirrored, all GPUs": ["train.strategy=mirrored"],
}


def synthetic_folder(root: Path, classes: int, per_class: int, size: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def skip_reason(name: str, gpus: int) -> str | None:
    if name != "plain" and gpus == 0:
        return "no GPU visible"
    if name.startswith("mirrored") and gpus < 2:
        return f"{gpus} GPU(s); mirrored needs two or more"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="Image folder (default: a synthetic one)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="stage-2 epochs per setting")
    parser.add_argument("--per-class", type=int, default=256, help="synthetic images per class (4 classes)")
    args = parser.parse_args()

    import tltool
    from tltool.native_logs import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    print(f"{gpus} GPU(s): {[d.name for d in tf.config.list_physical_devices('GPU')]}")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synthetic_folder(Path(tmp) / "data", 4, args.per_class, args.image_size)
        common = [f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "frozen.epochs=1",
                  f"fine_tune.epochs={args.epochs}", "fine_tune.early_stopping=0", "fine_tune.unfreeze=1000",
                  "frozen.feature_views=0", "augment.flip=horizontal", "trust.ood=false"]
        rows, plain_s = [], None
        for name, overrides in SETTINGS.items():
            reason = skip_reason(name, gpus)
            if reason:
                rows.append((name, None, None, f"skipped: {reason}"))
                continue
            result = tltool.finetune(data=data, backbone=args.backbone, weights=args.weights,
                                     out=Path(tmp) / name.replace(" ", "_").replace(",", ""),
                                     overrides=[*common, *overrides], verbose=0)
            seconds = result.summary["timings"]["stage2_s"]
            plain_s = seconds if name == "plain" else plain_s
            rows.append((name, seconds, result.summary["val_accuracy"], ""))
    print(f"\nstage 2: {args.epochs} epochs of {args.backbone} at {args.image_size} px, batch {args.batch_size}\n")
    print(f"{'setting':<24} {'stage-2 s':>10} {'vs plain':>9} {'val_acc':>8}")
    for name, seconds, acc, note in rows:
        if seconds is None:
            print(f"{name:<24} {note}")
        else:
            print(f"{name:<24} {seconds:>10.1f} {plain_s / seconds:>8.2f}x {acc:>8.4f}")


if __name__ == "__main__":
    main()
