"""Benchmark of `tltool export`: every format and quantization of one run, with size, parity and accuracy.

Each export runs its own check on the run's validation images (see `tltool.export`); this prints those
figures side by side, and, with --test-data, the accuracy of the Keras model and of each TFLite model on
a held-out folder. Targets from the export issue: int8 at most 0.3x the float32 TFLite size and at most
1.5 points of accuracy lost.

    python benchmarks/export_formats.py runs/qs
    python benchmarks/export_formats.py runs/cats-dogs --test-data PHOTOS/test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tltool  # noqa: E402

EXPORTS = [("keras", "none"), ("savedmodel", "none"), ("onnx", "none"), ("tflite", "none"),
           ("tflite", "float16"), ("tflite", "dynamic"), ("tflite", "int8")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory written by `tltool finetune`")
    parser.add_argument("--test-data", type=Path, help="labelled folder to measure accuracy on as well")
    parser.add_argument("--formats", default=",".join(f"{f}:{q}" for f, q in EXPORTS),
                        help="comma-separated FORMAT:QUANTIZE pairs (default: all)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        test_keras = _test_accuracy(args.run, args.test_data, Path(tmp) / "eval-keras")
        for pair in args.formats.split(","):
            fmt, quantize = pair.split(":")
            out = Path(tmp) / f"{fmt}-{quantize}"
            try:
                r = tltool.export(args.run, fmt, quantize=quantize, out=out)
            except tltool.TltoolError as exc:
                print(f"{fmt} {quantize}: FAILED: {exc}", flush=True)
                continue
            test = _test_accuracy(out, args.test_data, Path(tmp) / f"eval-{fmt}-{quantize}") if fmt == "tflite" else None
            rows.append((fmt, quantize, r["size_bytes"] / 1e6, r.get("size_ratio"), r["max_abs_prob_diff"],
                         r["top1_agreement"], r["accuracy_keras"], r["accuracy_export"], test, r["seconds"],
                         r.get("int8_weights", "")))
            print(f"{fmt} {quantize}: done in {r['seconds']:.1f} s", flush=True)

    if not rows:
        sys.exit("No export succeeded.")
    print(f"\nValidation images: {r['n_images']}" + (f"; test accuracy of the Keras model: {test_keras:.4f}"
                                                   if test_keras is not None else ""))
    print(f"{'format':<11}{'quantize':<9}{'MB':>7}{'ratio':>7}{'max|dp|':>10}{'agree':>7}{'acc keras':>10}"
          f"{'acc export':>11}{'acc test':>9}{'s':>6}  int8 weights")
    for fmt, q, mb, ratio, diff, agree, acc_k, acc_e, test, seconds, scheme in rows:
        print(f"{fmt:<11}{q:<9}{mb:7.2f}{(f'{ratio:.3f}' if ratio else '-'):>7}{diff:10.2g}{agree:7.3f}"
              f"{acc_k:10.4f}{acc_e:11.4f}{(f'{test:.4f}' if test is not None else '-'):>9}{seconds:6.1f}  {scheme}")


def _test_accuracy(model: Path, data: Path | None, out: Path) -> float | None:
    if data is None:
        return None
    return tltool.evaluate(model, data, out=out)["accuracy"]


if __name__ == "__main__":
    main()
