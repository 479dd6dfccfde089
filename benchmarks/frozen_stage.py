"""Benchmark the frozen stage: tltool's cached features against the plain guide recipe.

Three measurements, printed as a table:

1. time and validation accuracy of stage 1 (N epochs) two ways on the same split, backbone and size:
   - "guide": the Keras/TensorFlow transfer-learning guide's recipe, frozen backbone inside the model,
     every image through the backbone in every epoch;
   - "tltool": features computed once (cold cache, extraction included), head trained on them.
2. feature-extraction throughput (decode + resize + forward, streamed from disk) against the backbone's
   forward pass alone on tensors already in memory.
3. (--memory) peak RSS of a stage-1 run on generated data of 1x and 10x the images.

Examples:
    python benchmarks/frozen_stage.py --data PATH/cats-dogs/train --weights PATH/mobilenetv2_160_notop.weights.h5 \\
        --image-size 160 --epochs 10
    python benchmarks/frozen_stage.py --memory --per-class 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def guide_recipe(split, spec, weights, size: int, epochs: int, batch_size: int, seed: int):
    """The guide's recipe: the frozen backbone inside the model, images decoded and run every epoch."""
    import keras

    from tltool.data.pipelines import image_dataset
    from tltool.models.transfer import build_transfer_model
    from tltool.recipe import HeadConfig
    from tltool.engine.fitting import compile_model

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    tm = build_transfer_model(spec, weights, len(split.train.classes), size, HeadConfig(), seed=seed)
    compile_model(tm.model, "adam", 1e-3, 0.0)
    n = len(split.train.classes)
    train = image_dataset(split.train.paths, split.train.labels, size, batch_size, split.skips, n, shuffle=True,
                          seed=seed)
    val = image_dataset(split.val.paths, split.val.labels, size, batch_size, split.skips, n)
    t0 = time.perf_counter()
    history = tm.model.fit(train, validation_data=val, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - t0
    return seconds, history.history["val_accuracy"][-1]


def tltool_stage1(data, weights_arg, size, epochs, batch_size, seed, backbone):
    import tltool

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TLTOOL_CACHE_DIR"] = str(Path(tmp) / "cache")  # cold cache: extraction is included
        result = tltool.finetune(data=data, out=Path(tmp) / "run", backbone=backbone, weights=weights_arg,
                                 image_size=size, epochs=epochs, fine_tune_epochs=0, batch_size=batch_size,
                                 seed=seed, overrides=["frozen.early_stopping=0"], verbose=0)
    t = result.summary["timings"]
    return t["stage1_s"], t["features_s"], t["feature_images"], result.summary["val_accuracy"]


def throughput(split, spec, weights, size: int, batch_size: int, limit: int):
    """Images/s of extraction from disk vs the forward pass on in-memory tensors, same compiled function."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tltool.data.folders import SkipLog
    from tltool.engine.features import compute_features
    from tltool.data.images import load_image
    from tltool.models.transfer import build_transfer_model
    from tltool.recipe import HeadConfig

    keras.backend.clear_session()
    tm = build_transfer_model(spec, weights, 2, size, HeadConfig())
    paths = split.train.paths[:limit]
    compute_features(tm.feature_extractor, paths[: batch_size * 2], size, batch_size, SkipLog())  # warm-up
    t0 = time.perf_counter()
    compute_features(tm.feature_extractor, paths, size, batch_size, SkipLog())
    from_disk = len(paths) / (time.perf_counter() - t0)

    pixels = np.stack([load_image(p, size) for p in paths]).astype("float32")
    forward = tf.function(lambda x: tm.feature_extractor(x, training=False), reduce_retracing=True)
    forward(tf.constant(pixels[:batch_size]))
    t0 = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        forward(tf.constant(pixels[start:start + batch_size])).numpy()
    in_memory = len(pixels) / (time.perf_counter() - t0)
    return from_disk, in_memory


def peak_rss_of_run(data: Path, size: int, epochs: int, batch_size: int) -> float:
    """Peak resident memory (MB) of a stage-1 finetune in a fresh process."""
    code = ("import os, resource, tltool, tempfile; from pathlib import Path; t = tempfile.mkdtemp(); "
            "os.environ['TLTOOL_CACHE_DIR'] = t + '/cache'; "
            f"tltool.finetune(data={str(data)!r}, out=Path(t) / 'run', weights='none', image_size={size}, "
            f"epochs={epochs}, fine_tune_epochs=0, batch_size={batch_size}, verbose=0); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "sample", help="image folder (class sub-folders)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="none", help="imagenet, none, or a weights file path")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--throughput-images", type=int, default=512)
    parser.add_argument("--memory", action="store_true", help="only the 1x vs 10x peak-memory check")
    parser.add_argument("--per-class", type=int, default=100, help="generated images per class for --memory (1x)")
    args = parser.parse_args()

    if args.memory:
        sys.path.insert(0, str(ROOT / "data"))
        from make_sample import generate

        with tempfile.TemporaryDirectory() as tmp:
            rows = []
            for factor in (1, 10):
                folder = Path(tmp) / f"x{factor}"
                generate(folder, per_class=args.per_class * factor, seed=factor)
                n = sum(1 for _ in folder.rglob("*.*"))
                rows.append((factor, n, peak_rss_of_run(folder, args.image_size, 2, args.batch_size)))
        for factor, n, mb in rows:
            print(f"{factor:>3}x  {n:>6} images  peak RSS {mb:8.0f} MB")
        print(f"ratio 10x / 1x: {rows[1][2] / rows[0][2]:.3f} (target <= 1.15)")
        return

    from tltool.engine.setup import prepare_run, resolve_recipe

    recipe = resolve_recipe(None, data=args.data, backbone=args.backbone, weights=args.weights,
                            image_size=args.image_size, batch_size=args.batch_size, seed=args.seed)
    setup = prepare_run(recipe)
    spec, weights, split = setup.spec, setup.weights, setup.split
    print(f"data: {args.data} ({len(split.train)} train / {len(split.val)} val), {spec.name} @ {args.image_size}px, "
          f"weights {recipe.backbone.weights}, {args.epochs} epochs, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores")

    guide_s, guide_acc = guide_recipe(split, spec, weights, args.image_size, args.epochs, args.batch_size, args.seed)
    ours_s, feat_s, feat_n, ours_acc = tltool_stage1(args.data, args.weights, args.image_size, args.epochs,
                                                     args.batch_size, args.seed, args.backbone)
    disk, memory = throughput(split, spec, weights, args.image_size, args.batch_size, args.throughput_images)
    results = {
        "guide_stage1_s": round(guide_s, 2), "guide_val_accuracy": round(guide_acc, 4),
        "tltool_stage1_s": round(ours_s, 2), "tltool_features_s": round(feat_s, 2), "feature_images": feat_n,
        "tltool_val_accuracy": round(ours_acc, 4), "time_ratio": round(ours_s / guide_s, 3),
        "accuracy_delta_points": round(100 * (ours_acc - guide_acc), 2),
        "extract_images_per_s": round(disk, 1), "forward_images_per_s": round(memory, 1),
        "throughput_ratio": round(disk / memory, 3),
    }
    print(f"{'':<28}{'guide':>10}{'tltool':>10}")
    print(f"{'stage 1 seconds':<28}{guide_s:>10.1f}{ours_s:>10.1f}   ratio {ours_s / guide_s:.3f} (target <= 0.2)")
    print(f"{'val accuracy':<28}{guide_acc:>10.4f}{ours_acc:>10.4f}   "
          f"delta {100 * (ours_acc - guide_acc):+.2f} points (target >= -1)")
    print(f"extraction {disk:.1f} img/s from disk vs forward {memory:.1f} img/s in memory: "
          f"ratio {disk / memory:.3f} (target >= 0.85)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
