"""How well a temperature fitted on few validation images serves new images: the likelihood alone against
tltool's prior on log T (see `fit_temperature` in tltool/engine/trust.py).

The run's model scores every image of --data (labelled folders, the run's classes); its own temperature is
taken out again, so the scores are the uncalibrated model's. Then, many times over, a random N of those
images plays the validation set: a temperature is fitted on them (T = 1, the likelihood alone, the prior
with each --prior-sd) and scored by the negative log-likelihood of the other images. The script prints,
for each N, the mean NLL of each fit and its 95th percentile (a bad draw).

Usage:
    python benchmarks/calibration.py RUN --data DIR [--sizes 10 50 100] [--draws 200] [--prior-sd 0.25 0.5 1]

RUN is a run directory from `tltool finetune`; DIR should hold images it did not train on (its validation
or test folder), a few hundred or more.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def uncalibrated_scores(run: str, data: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities without the run's temperature, labels) of the readable images of `data`."""
    from tltool.data.folders import SkipLog, scan_folder
    from tltool.engine.trust import softmax_with_temperature
    from tltool.evaluation.sets import predict_images
    from tltool.exporting.predictors import load_predictor

    predictor = load_predictor(run)
    folder = scan_folder(data, classes=predictor.labels, role="evaluation")
    scores, kept = predict_images(predictor, folder.paths, SkipLog())
    temperature = (json.loads((Path(run) / "summary.json").read_text()).get("trust") or {}).get("temperature")
    probs = scores.probabilities
    if temperature:
        probs = softmax_with_temperature(probs, 1.0 / temperature)  # softmax(logits / T) back to softmax(logits)
    return probs, np.asarray(folder.labels)[kept]


def main() -> None:
    from tltool.engine.trust import (fit_temperature, fit_temperatures, negative_log_likelihood,
                                     softmax_with_temperature)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--prior-sd", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    probs, labels = uncalibrated_scores(args.run, args.data)
    print(f"{len(labels)} images; NLL at T = 1: {negative_log_likelihood(probs, labels):.4f}; T fitted on all of "
          f"them (likelihood alone): {fit_temperature(probs, labels, prior_sd=None):.3f}")
    fits = {"T=1": "none", "likelihood": None, **{f"prior {sd:g}": sd for sd in args.prior_sd}}
    rng = np.random.default_rng(args.seed)
    print(f"{'N':>5}  " + "  ".join(f"{name:>22}" for name in fits))
    for size in args.sizes:
        if size >= len(labels):
            continue
        nll = {name: [] for name in fits}
        for _ in range(args.draws):
            order = rng.permutation(len(labels))
            fit_on, rest = order[:size], order[size:]
            fitted = fit_temperatures(probs[fit_on], labels[fit_on], list(fits.values())[1:])
            for name, t in zip(fits, [1.0, *fitted]):
                nll[name].append(negative_log_likelihood(softmax_with_temperature(probs[rest], t), labels[rest]))
        print(f"{size:>5}  " + "  ".join(f"{np.mean(v):.4f} (95%: {np.percentile(v, 95):.4f})" for v in nll.values()))


if __name__ == "__main__":
    main()
