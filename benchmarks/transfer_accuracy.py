"""Benchmark real transfer learning: accuracy and time of a full two-stage finetune on real photos.

Point it at a class-per-folder training set, a test set and a pretrained backbone weights file (or
`imagenet` on a machine that is online). It runs `tltool.finetune` with the guide-like settings below and
prints validation and test accuracy after each stage, with the stage timings.

    python benchmarks/transfer_accuracy.py --data PATH/train --test-data PATH/test \\
        --weights PATH/mobilenetv2_160_notop.weights.h5 --image-size 160

Public anchor for MobileNetV2 at 160 px on 2,000 cats-vs-dogs photos (TensorFlow's transfer-learning
tutorial): about 94% after the frozen stage and about 98% after fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--test-data", type=Path)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=10, help="stage 1 (frozen backbone)")
    parser.add_argument("--fine-tune-epochs", type=int, default=5)
    parser.add_argument("--unfreeze", type=int, default=54, help="top backbone layers trained in stage 2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="keep the run directory here (default: a temporary folder)")
    args = parser.parse_args()

    import tltool

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("TLTOOL_CACHE_DIR", str(Path(tmp) / "cache"))
        out = args.out or Path(tmp) / "run"
        common = dict(data=args.data, test_data=args.test_data, backbone=args.backbone, weights=args.weights,
                      image_size=args.image_size, batch_size=args.batch_size, verbose=0)
        frozen = tltool.finetune(out=Path(tmp) / "frozen", epochs=args.epochs, fine_tune_epochs=0,
                                 overrides=["frozen.early_stopping=0"], **common)
        full = tltool.finetune(out=out, epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs, force=True,
                               overrides=["frozen.early_stopping=0", f"fine_tune.unfreeze={args.unfreeze}",
                                          "augment.rotation=0.05", "augment.zoom=0.1"], **common)
    s1, s2 = frozen.summary, full.summary
    print(f"{args.backbone} @ {args.image_size}px, weights {args.weights}; {s2['images']['train']} train / "
          f"{s2['images']['val']} val / {s2['images']['test']} test images; {os.cpu_count()} CPU cores")
    print(f"{'':<26}{'val acc':>9}{'test acc':>10}{'stage1 s':>10}{'stage2 s':>10}{'total s':>9}")
    for name, s in (("frozen stage only", s1), ("+ fine-tuning", s2)):
        t = s["timings"]
        test = f"{s['test_accuracy']:.4f}" if s["test_accuracy"] is not None else "-"
        print(f"{name:<26}{s['val_accuracy']:>9.4f}{test:>10}{t['stage1_s']:>10.1f}{t['stage2_s']:>10.1f}"
              f"{t['total_s']:>9.1f}")
    print(json.dumps({"frozen": {k: s1[k] for k in ("val_accuracy", "test_accuracy", "timings")},
                      "fine_tuned": {k: s2[k] for k in ("val_accuracy", "test_accuracy", "timings")}}))


if __name__ == "__main__":
    main()
