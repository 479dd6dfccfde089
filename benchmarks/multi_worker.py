"""One run trained by two workers (`train.strategy: multi_worker`, both on this host) against one process.

Both use tltool's defaults (only `--data`, `--val-data`, `--test-data`, `--weights`, `--image-size`,
`--seed`) on the same seeded training subsample and are scored on the same held-out images. The two
workers talk over 127.0.0.1 as two hosts would over a network; on one machine they share its cores, so the
times say what the coordination costs, not what a second host gains.

    python benchmarks/multi_worker.py DATA --val-data VAL --test-data TEST --weights FILE --image-size 160 \
        --seeds 1 2 3 --per-class 50

Prints one row per seed and the mean test accuracy (with the spread over seeds) of each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vs_guide import subsample


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def finetune(train: Path, args, seed: int, out: Path, workers: int) -> tuple[float, float]:
    """(test accuracy, seconds from the first process's start to the last one's end)."""
    cmd = [sys.executable, "-m", "tltool", "finetune", "--data", str(train), "--val-data", str(args.val_data),
           "--test-data", str(args.test_data), "--weights", str(args.weights), "--image-size", str(args.image_size),
           "--seed", str(seed), "--quiet"]
    # A feature cache of its own: neither run finds features the other computed.
    env = {**{k: v for k, v in os.environ.items() if k != "TF_CONFIG"}, "TLTOOL_CACHE_DIR": str(out) + "-cache"}
    ports = _free_ports(workers)
    processes = []
    t0 = time.perf_counter()
    for index in range(workers):
        extra = ["--out", str(out if index == 0 else out.with_name(f"{out.name}-worker{index}"))]
        if workers > 1:
            extra += ["--strategy", "multi_worker"]
            env = {**env, "TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                                   "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen(cmd + extra, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    outputs = [p.communicate() for p in processes]
    seconds = time.perf_counter() - t0
    for process, (_, err) in zip(processes, outputs):
        if process.returncode != 0:
            raise SystemExit(f"tltool finetune ({workers} worker(s)) failed:\n{err[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == workers, summary["workers"]
    return summary["test_accuracy"], seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="Training folder (one sub-folder per class).")
    parser.add_argument("--val-data", type=Path, required=True)
    parser.add_argument("--test-data", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True, help="Backbone weights file (MobileNetV2, no top).")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--per-class", type=int, default=50, help="Training images per class (0 = all).")
    args = parser.parse_args()

    rows = {1: [], 2: []}
    print(f"{'seed':>4} {'1 process':>10} {'2 workers':>10} {'1 process s':>12} {'2 workers s':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            train = subsample(args.data, args.per_class, seed, Path(tmp) / f"train-{seed}")
            results = {n: finetune(train, args, seed, Path(tmp) / f"run-{seed}-{n}", n) for n in (1, 2)}
            for n, result in results.items():
                rows[n].append(result)
            print(f"{seed:>4} {results[1][0]:>10.4f} {results[2][0]:>10.4f} {results[1][1]:>12.1f} "
                  f"{results[2][1]:>12.1f}", flush=True)
    print(f"\n{args.per_class or 'all'} images per class, {len(args.seeds)} seeds; test accuracy mean ± sd:")
    for n, label in ((1, "1 process"), (2, "2 workers")):
        accuracies = [a for a, _ in rows[n]]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(f"  {label}: {statistics.mean(accuracies):.4f} ± {spread:.4f} "
              f"(mean {statistics.mean(s for _, s in rows[n]):.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
