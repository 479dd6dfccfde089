"""tltool's defaults side by side with the plain transfer-learning recipe of the Keras/TensorFlow guides.

The guide recipe (copied faithfully below, `guide_main`): a frozen MobileNetV2 inside the model,
`RandomFlip("horizontal")` + `RandomRotation(0.1)` on every epoch, global average pooling, dropout 0.2, a
softmax layer, Adam 1e-3; then layers 100 and up unfrozen at 1e-5. tltool runs with no recipe, only
`--data`, `--val-data`, `--weights`, `--image-size` and `--seed`. Both run as separate processes, timed from
process start to finish, on the same training subsample, and are scored on the same held-out images
(--test-data, else --val-data). Training subsamples take N images per class (seeded; 0 = all).

    python benchmarks/vs_guide.py DATA --val-data VAL [--test-data TEST] --weights FILE --image-size 160 \
        --seeds 1 2 3 --per-class 20 50 0

Prints one row per (subsample, seed) and a table of mean accuracy (with the spread over seeds) and the mean
time ratio tltool / guide.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def guide_main(argv: list[str]) -> None:
    """The guide recipe, as the Keras/TensorFlow transfer-learning guides write it (plus a seed)."""
    import keras

    p = argparse.ArgumentParser()
    p.add_argument("train"), p.add_argument("val"), p.add_argument("test")
    p.add_argument("--epochs", type=int, default=10), p.add_argument("--fine-tune-epochs", type=int, default=5)
    p.add_argument("--weights", required=True), p.add_argument("--size", type=int, default=160)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    keras.utils.set_random_seed(a.seed)
    size = (a.size, a.size)
    tr = keras.utils.image_dataset_from_directory(a.train, image_size=size, batch_size=32, seed=a.seed)
    va = keras.utils.image_dataset_from_directory(a.val, image_size=size, batch_size=32, shuffle=False,
                                                  class_names=tr.class_names)
    base = keras.applications.MobileNetV2(input_shape=size + (3,), include_top=False,
                                          weights="imagenet" if a.weights == "imagenet" else None)
    if a.weights not in ("imagenet", "none"):  # "none": a random backbone, for timings only
        base.load_weights(a.weights)
    base.trainable = False
    aug = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)])
    inp = keras.Input(size + (3,))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(aug(inp))
    x = keras.layers.GlobalAveragePooling2D()(base(x, training=False))
    out = keras.layers.Dense(len(tr.class_names), activation="softmax")(keras.layers.Dropout(0.2)(x))
    m = keras.Model(inp, out)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    m.fit(tr.prefetch(2), validation_data=va, epochs=a.epochs, verbose=0)
    stage1_s = time.perf_counter() - started
    if a.fine_tune_epochs:
        base.trainable = True
        for layer in base.layers[:100]:
            layer.trainable = False
        m.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
        m.fit(tr.prefetch(2), validation_data=va, epochs=a.fine_tune_epochs, verbose=0)
    te = keras.utils.image_dataset_from_directory(a.test, image_size=size, batch_size=32, shuffle=False,
                                                  class_names=tr.class_names)
    print(json.dumps({"accuracy": float(m.evaluate(te, verbose=0)[1]), "stage1_s": stage1_s}))


def class_images(data: Path) -> list[tuple[str, list[Path]]]:
    """Each class folder of `data` with its image files, in a fixed order."""
    folders = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [(f.name, sorted(i for i in f.rglob("*") if i.suffix.lower() in IMAGE_SUFFIXES)) for f in folders]


def _link(files: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True)
    for f in files:
        (dest / f.name).symlink_to(f.resolve())


def subsample(data: Path, per_class: int, seed: int, dest: Path) -> Path:
    """A folder of symbolic links to `per_class` images of each class of `data` (all when 0)."""
    rng = random.Random(seed)
    for name, files in class_images(data):
        _link(rng.sample(files, min(per_class, len(files))) if per_class else files, dest / name)
    return dest


def split(data: Path, seed: int, dest: Path) -> tuple[Path, Path]:
    """Folders of symbolic links: a seeded 80% of each class of `data` for training, 20% for validation."""
    rng = random.Random(seed)
    for name, files in class_images(data):
        rng.shuffle(files)
        cut = max(1, len(files) // 5)
        _link(files[:cut], dest / "val" / name)
        _link(files[cut:], dest / "train" / name)
    return dest / "train", dest / "val"


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def guide_run(train: Path, val: Path, test: Path, weights, size: int, seed: int, epochs: int,
              fine_tune_epochs: int) -> tuple[dict, float]:
    """The guide recipe in a process of its own: what it printed (accuracy, stage1_s) and its seconds."""
    seconds, out = timed([sys.executable, __file__, "--run-guide", str(train), str(val), str(test),
                          "--weights", str(weights), "--size", str(size), "--seed", str(seed),
                          "--epochs", str(epochs), "--fine-tune-epochs", str(fine_tune_epochs)])
    return json.loads(out.strip().splitlines()[-1]), seconds


def run_guide(train: Path, val: Path, test: Path, args, seed: int) -> tuple[float, float]:
    printed, seconds = guide_run(train, val, test, args.weights, args.image_size, seed, args.epochs,
                                 args.fine_tune_epochs)
    return printed["accuracy"], seconds


def tltool_command(train: Path, val: Path, test: Path, args, seed: int, out: Path) -> list[str]:
    """`tltool finetune` with no recipe: the data, the weights file, the image size and the seed."""
    cmd = [sys.executable, "-m", "tltool", "finetune", "--data", str(train), "--val-data", str(val),
           "--weights", str(args.weights), "--image-size", str(args.image_size), "--seed", str(seed),
           "--out", str(out), "--quiet"]
    return cmd + (["--test-data", str(test)] if test != val else [])


def held_out_accuracy(out: Path, val: Path, test: Path) -> float:
    """The accuracy a tltool run in `out` reported on the held-out images (its test set, else validation)."""
    summary = json.loads((out / "summary.json").read_text())
    return summary["test_accuracy" if test != val else "val_accuracy"]


def run_tltool(train: Path, val: Path, test: Path, args, seed: int, out: Path) -> tuple[float, float]:
    cmd = tltool_command(train, val, test, args, seed, out) + list(args.tltool_args)
    # A feature cache of its own: the time of a first run, as a new user's (no features from another seed).
    seconds, _ = timed(cmd, {"TLTOOL_CACHE_DIR": str(out) + "-cache"})
    return held_out_accuracy(out, val, test), seconds


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The data, weights, image size and seeds: the arguments of every benchmark that runs tltool."""
    parser.add_argument("data", type=Path, help="Training folder (one sub-folder per class).")
    parser.add_argument("--val-data", type=Path, required=True, help="Validation folder (every run validates on it).")
    parser.add_argument("--test-data", type=Path, help="Held-out folder every run is scored on (default: --val-data).")
    parser.add_argument("--weights", type=Path, required=True, help="MobileNetV2 weights file without its top.")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])


def main() -> int:
    if sys.argv[1:2] == ["--run-guide"]:
        guide_main(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--per-class", type=int, nargs="+", default=[20, 50, 0], help="0 = all images.")
    parser.add_argument("--epochs", type=int, default=10, help="The guide's frozen epochs.")
    parser.add_argument("--fine-tune-epochs", type=int, default=5, help="The guide's fine-tuning epochs.")
    parser.add_argument("--tltool-args", nargs=argparse.REMAINDER, default=[],
                        help="Extra `tltool finetune` arguments (last on the line), e.g. --set frozen.feature_views=4.")
    args = parser.parse_args()
    test = args.test_data or args.val_data
    rows = []
    print(f"{'per class':>9} {'seed':>4} {'guide':>7} {'tltool':>7} {'guide s':>8} {'tltool s':>8} {'ratio':>6}")
    for per_class in args.per_class:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                train = subsample(args.data, per_class, seed, Path(tmp) / "train")
                guide_acc, guide_s = run_guide(train, args.val_data, test, args, seed)
                ours_acc, ours_s = run_tltool(train, args.val_data, test, args, seed, Path(tmp) / "run")
            rows.append((per_class, seed, guide_acc, ours_acc, guide_s, ours_s))
            print(f"{per_class or 'all':>9} {seed:>4} {guide_acc:7.4f} {ours_acc:7.4f} {guide_s:8.1f} {ours_s:8.1f} "
                  f"{ours_s / guide_s:6.3f}", flush=True)
    print(f"\nheld-out: {test}\n{'per class':>9} {'guide (mean ± sd)':>19} {'tltool (mean ± sd)':>19} "
          f"{'time ratio':>10}")
    for per_class in args.per_class:
        mine = [r for r in rows if r[0] == per_class]
        g, t = [r[2] for r in mine], [r[3] for r in mine]
        ratio = statistics.mean(r[5] / r[4] for r in mine)
        print(f"{per_class or 'all':>9} {statistics.mean(g):10.4f} ± {spread(g):.4f} {statistics.mean(t):10.4f} ± "
              f"{spread(t):.4f} {ratio:10.3f}")
    return 0


def spread(values: list[float]) -> float:
    """The standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    sys.exit(main())
