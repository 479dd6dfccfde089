"""Does the measured feature layer (`head.layer: auto`) pay, against always reading the backbone's top?

For each seed, tltool runs with its defaults (the layer measured by 3-fold cross-validation on the training
images); when that chose an earlier block, it runs again reading the top globally (`head.layer=top`,
`head.grid=1`), and with each `--also LAYER[:GRID]` given (a layer without a grid has its grid measured).
Every run is scored on the same held-out images (--test-data, else --val-data). The runs of a seed share
one feature cache; each layer read still has its own entries in it.

    python benchmarks/layer_choice.py DATA --val-data VAL [--test-data TEST] --weights FILE --image-size 160 \
        --seeds 1 2 3 [--also block_13_project_BN block_11_add:3]

Prints each seed's choice and accuracies, then the mean accuracy of the measured choice, of the top and of
each forced layer (a run that measured the top at grid 1 counts for the top as well).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from vs_guide import add_run_arguments, held_out_accuracy, spread, timed, tltool_command


def run(train: Path, val: Path, test: Path, args, seed: int, out: Path, cache: Path,
        overrides: list[str]) -> tuple[float, str, str]:
    """(held-out accuracy, the layer the run read, the recipe's comment on how it was chosen)."""
    cmd = tltool_command(train, val, test, args, seed, out)
    for item in overrides:
        cmd += ["--set", item]
    timed(cmd, {"TLTOOL_CACHE_DIR": str(cache)})
    recipe = (out / "recipe.yaml").read_text()
    why = next((line[len("# Measured: "):] for line in recipe.splitlines()
                if line.startswith("# Measured: head.layer:")), "")
    head = yaml.safe_load(recipe)["head"]
    return held_out_accuracy(out, val, test), f"{head['layer']}:{head['grid']}", why


def forced(spec: str) -> list[str]:
    """`--set` items reading LAYER[:GRID]."""
    layer, _, grid = spec.partition(":")
    return [f"head.layer={layer}"] + ([f"head.grid={grid}"] if grid else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--also", nargs="*", default=[], metavar="LAYER[:GRID]",
                        help="Layers to force as well on every seed, e.g. block_13_project_BN or "
                             "block_11_add:3.")
    args = parser.parse_args()
    test = args.test_data or args.val_data
    results: dict[str, list[float]] = {"measured": [], "top grid 1": []}
    results.update({f"forced {spec}": [] for spec in args.also})
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cache = tmp / "cache"
            accuracy, layer, why = run(args.data, args.val_data, test, args, seed, tmp / "auto", cache, [])
            print(f"seed {seed}: measured {layer} -> {accuracy:.4f}\n  {why}", flush=True)
            results["measured"].append(accuracy)
            if layer == "top:1":
                results["top grid 1"].append(accuracy)
            else:
                top, _, _ = run(args.data, args.val_data, test, args, seed, tmp / "top", cache,
                                ["head.layer=top", "head.grid=1"])
                print(f"  top -> {top:.4f}", flush=True)
                results["top grid 1"].append(top)
            for i, spec in enumerate(args.also):
                other, _, _ = run(args.data, args.val_data, test, args, seed, tmp / f"also{i}", cache,
                                  forced(spec))
                print(f"  {spec} -> {other:.4f}", flush=True)
                results[f"forced {spec}"].append(other)
    print(f"\nheld-out: {test}, {len(args.seeds)} seed(s), mean ± sd")
    for name, values in results.items():
        print(f"  {name:>28}: {statistics.mean(values):.4f} ± {spread(values):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
