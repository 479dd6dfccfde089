"""Benchmark of `tltool tune`: N trials against one frozen fit of the guide recipe, and memory across trials.

Speed (default): in one run, on the same data,
  1. the guide recipe's frozen stage (vs_guide.py's faithful copy, in a process of its own): MobileNetV2
     frozen inside the model, its flip and rotation layers, images through it every epoch, E epochs, `fit`
     timed (validation on --val-data, else on a seeded fifth of --data);
  2. `tltool.tune` with N random-search trials of the default head space, E epochs each (no early
     stopping), timed as a whole: scanning the data, extracting features once (fresh feature cache),
     every trial, the reports.
Target: (2) <= 2x (1).

With --stage2: the default space of the default recipe instead (stage 2 included: `fine_tune.unfreeze`
and `fine_tune.learning_rate` searched, stage-2 trials on one activation cache at the deepest cut), the
default epochs and early stopping, --algorithm as given; the guide fit stays E epochs of the frozen stage.

Memory (--memory): one search of --memory-trials trials; peak RSS after the 5th trial and after the last
(target: within 10%).

    python benchmarks/tune.py                                   # data/sample, mobilenet_v2, 96 px
    python benchmarks/tune.py --data ~/photos --image-size 160 --trials 20 --epochs 10
    python benchmarks/tune.py --data ~/photos/train --val-data ~/photos/val --weights FILE --image-size 160 --stage2
    python benchmarks/tune.py --memory --memory-trials 50
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tltool  # noqa: E402
import vs_guide  # noqa: E402  (its copy of the guide recipe)


def _overrides(args, search: bool = False) -> list[str]:
    common = [f"backbone.name={args.backbone}", f"backbone.weights={args.weights}", "backbone.fallback=none",
              f"data.image_size={args.image_size}", f"seed={args.seed}"]
    if args.batch_size:
        common.append(f"data.batch_size={args.batch_size}")
    if search and args.stage2:
        return common
    return common + [f"frozen.epochs={args.epochs}", "frozen.early_stopping=0", "fine_tune.epochs=0"]


def guide_fit(args, tmp: Path) -> float:
    """Seconds of one frozen fit of the guide recipe (vs_guide.py's copy, a process of its own): the frozen
    backbone inside the model, images through it every epoch, `fit` timed as the guide's own log times it."""
    if args.val_data:
        train, val = Path(args.data), Path(args.val_data)
    else:  # the guide needs a validation folder
        train, val = vs_guide.split(Path(args.data), args.seed, tmp / "guide-split")
    printed, _ = vs_guide.guide_run(train, val, val, args.weights, args.image_size, args.seed, args.epochs, 0)
    return printed["stage1_s"]


def search(args, trials: int, out: Path, log=print) -> float:
    t0 = time.perf_counter()
    tltool.tune(data=args.data, val_data=args.val_data, algorithm=args.algorithm, max_trials=trials, out=out,
                overwrite=True, overrides=_overrides(args, search=True), verbose=1, log=log)
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def current_rss_mb() -> float:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:  # not Linux
        return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/sample", help="Image folder (default: data/sample).")
    parser.add_argument("--val-data", default=None, help="Validation folder (default: a split of --data).")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="none", help="imagenet, none or a file (timings do not depend on it).")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="tltool's batch size (default: the recipe's, 32, as the guide's).")
    parser.add_argument("--epochs", type=int, default=10, help="Epochs of the fit and of every trial.")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--stage2", action="store_true",
                        help="Search the default recipe's whole default space, stage 2 included.")
    parser.add_argument("--algorithm", default="random", help="Search algorithm (default: random).")
    parser.add_argument("--memory", action="store_true", help="Measure peak RSS across trials instead.")
    parser.add_argument("--memory-trials", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # A fresh feature cache: the search pays for its one feature extraction.
        os.environ["TLTOOL_CACHE_DIR"] = str(Path(tmp) / "cache")
        if args.memory:
            marks: dict[int, tuple[float, float]] = {}

            def log(message="", **kwargs):
                if message.startswith("Trial "):
                    marks[len(marks) + 1] = (peak_rss_mb(), current_rss_mb())

            seconds = search(args, args.memory_trials, Path(tmp) / "search", log=log)
            last = max(marks)
            (early, early_now), (late, late_now) = marks[5], marks[last]
            print(f"peak RSS after trial 5: {early:.0f} MB; after trial {last}: {late:.0f} MB; "
                  f"growth {100 * (late / early - 1):.1f}% (target <= 10%); {seconds:.0f}s for {last} trials")
            print(f"current RSS after trial 5: {early_now:.0f} MB; after trial {last}: {late_now:.0f} MB")
            return 0 if late <= 1.10 * early else 1

        fit_s = guide_fit(args, Path(tmp))
        print(f"guide recipe's frozen fit ({args.epochs} epochs, images through the frozen backbone every "
              f"epoch, its flip and rotation layers included): {fit_s:.1f}s", flush=True)
        trial_lines = []
        tune_s = search(args, args.trials, Path(tmp) / "search",
                        log=lambda message="", **k: trial_lines.append(str(message)))
        ratio = tune_s / fit_s
        what = (f"{args.algorithm} search of the default space (stage 2 included)" if args.stage2
                else f"{args.trials} head trials x {args.epochs} epochs")
        print(f"tltool tune: {what}, feature extraction included: {tune_s:.1f}s "
              f"({tune_s / args.trials:.2f}s per trial)")
        for line in trial_lines:
            if line.startswith(("Trial ", "Best")):
                print("  " + line)
        print(f"ratio: {ratio:.2f}x the single fit (target <= 2x)")
        return 0 if ratio <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
