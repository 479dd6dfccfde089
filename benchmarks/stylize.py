"""Benchmark `tltool stylize` on a CPU: seconds per step at several sizes, and L-BFGS against Adam.

For each size, both optimisers run the same number of steps from the content image; the table gives their
seconds per step, the total loss they end at, and how long each took to reach the loss both reach (the
higher of the two final losses): the "given loss" of the comparison. Any backbone that declares content and style layers works; with random
weights (`--weights none`) the timings hold, the loss comparison less so.

Examples:
    python benchmarks/stylize.py CONTENT.jpg STYLE.jpg --backbone mobilenet_v2 --weights PATH/weights.h5
    python benchmarks/stylize.py CONTENT.jpg STYLE.jpg --backbone vgg19 --weights none --sizes 256 512 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(content, style, optimizer: str, size: int, args) -> dict:
    import tltool

    with tempfile.TemporaryDirectory() as out:
        result = tltool.stylize(content, style, backbone=args.backbone, weights=args.weights, size=size,
                                steps=args.steps, optimizer=optimizer, out=Path(out) / "run", verbose=0)
    return result.summary


def seconds_to_reach(summary: dict, target: float) -> float | None:
    """Seconds of optimisation until the total loss is at most `target` (None if never)."""
    per_step = summary["timings"]["per_step_s"]
    step = next((h["step"] for h in summary["history"] if h["loss"] <= target), None)
    return None if step is None else step * per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("content")
    parser.add_argument("style")
    parser.add_argument("--backbone", default="vgg19")
    parser.add_argument("--weights", default="none", help="imagenet, none, or a weights file of the backbone")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"{args.backbone}, weights {args.weights}, {args.steps} steps each\n")
    print(f"{'size':>5} {'optimizer':>9} {'s/step':>8} {'loss at 0':>11} {'final loss':>11} "
          f"{'s to common loss':>17}")
    for size in args.sizes:
        results = {opt: run(args.content, args.style, opt, size, args) for opt in ("adam", "lbfgs")}
        target = max(summary["last"]["loss"] for summary in results.values())
        for opt, summary in results.items():
            reach = seconds_to_reach(summary, target)
            print(f"{size:>5} {opt:>9} {summary['timings']['per_step_s']:>8.3f} {summary['first']['loss']:>11.4g} "
                  f"{summary['last']['loss']:>11.4g} {'-' if reach is None else f'{reach:.1f}':>17}")


if __name__ == "__main__":
    main()
