"""`evaluate`: a model's metrics on a labelled image folder, with plots and an HTML report."""

from __future__ import annotations

import time
from pathlib import Path

from tltool import outputs, rundir
from tltool.data.folders import SkipLog, scan_folder
from tltool.errors import DataError
from tltool.evaluation.report import write_report
from tltool.evaluation.sets import (add_calibration, check_ood_folder, evaluate_folder, evaluate_ood_folder,
                                    measure_robustness, sanity_probes)
from tltool.exporting.predictors import load_predictor, mirror_tta


def evaluate(model, data, out=None, top_k: int = 5, force: bool = False, tta: bool = False, ood_data=None,
             robustness: bool = True, log=None) -> dict:
    """Evaluate a model on a labelled image folder; write metrics.json, pictures and report.html.

    Args:
        model: a run directory written by `tltool finetune`, a model written by `tltool export` (anything
            `load_predictor` loads), or a predictor object (with `labels`, `image_size` and
            `predict(uint8 images) -> probabilities`).
        data: image folder with one sub-folder per class; its classes must be among the model's.
        out: folder for the results; default `MODEL/eval-DATA`, MODEL being the run directory, the export
            folder or the folder of a model file (`./eval-DATA` for a model in memory).
        top_k: k of the top-k accuracy (clipped to the number of classes). Default 5.
        force: replace `out` if it exists and is not empty (default: refuse).
        tta: test-time augmentation: average each image's probabilities with its mirror image's (for
            models trained on mirrored copies; refused for a run that was not).
        ood_data: a folder of images from other domains (no classes needed): the share the model rejects
            as out of distribution and the AUROC of its OOD score against the images of `data`.
        robustness: measure the accuracy under small perturbations (FGSM, noise) on up to 128 images of
            `data` (Keras models only: run directories and .keras files).
        log: callable for progress messages, or None for silence.

    Returns:
        The content of metrics.json, plus `out`: the folder written.

    Raises:
        RunDirError: `model` is not a finished run directory.
        DataError: `data` is missing, has unknown classes or no readable images.
    """
    say = log or (lambda *a, **k: None)
    if top_k < 1:
        raise DataError(f"Expected `top_k` to be at least 1. Received: top_k={top_k}")
    t0 = time.perf_counter()
    predictor, run_dir = _open_model(model)
    if tta:
        predictor = mirror_tta(predictor, model)
    t_load = time.perf_counter() - t0
    skips = SkipLog()
    folder = scan_folder(data, skips, classes=predictor.labels, role="evaluation")
    data_name = Path(folder.root).resolve().name or "data"
    out = Path(out) if out is not None else _model_folder(model, run_dir) / f"eval-{data_name}"
    if ood_data is not None:
        check_ood_folder(predictor, ood_data)
    folders = [f for f in (data, ood_data) if f is not None]
    model_files = [model] if isinstance(model, (str, Path)) else []  # what --out must never replace
    # Checked now; with --force, the old evaluation is replaced only once the new one is complete (below).
    outputs.check_output_dir(out, "evaluation", force=force, inputs=[*model_files, *folders], data=folders)
    say(f"Evaluating on {len(folder)} images of {len(predictor.labels)} classes from {folder.root}.")
    t1 = time.perf_counter()
    result = evaluate_folder(predictor, folder, skips, name=data_name, top_k=top_k)
    ood_sets = [evaluate_ood_folder(predictor, ood_data, result, skips)] if ood_data is not None else []
    probes = sanity_probes(predictor)
    t_predict = time.perf_counter() - t1
    if len(skips):
        say(f"Skipped {len(skips)} unreadable file(s); metrics.json lists them (skipped_files).")
    add_calibration([result], _run_temperature(run_dir))
    if robustness and getattr(predictor, "model", None) is not None:  # a Keras model: it has gradients
        say("Measuring the accuracy under small perturbations (FGSM and noise).")
        result.metrics["robustness"] = measure_robustness(predictor, result)
    result.metrics = metrics = {
        "model": str(model if run_dir is None else run_dir), "data": str(folder.root), "tta": bool(tta),
        **result.metrics, "ood_data": ood_sets[0].metrics if ood_sets else None,
        "probes": [p.as_dict(predictor.labels) for p in probes], "skipped_files": skips.as_list(),
        "timings": {"load_s": round(t_load, 3), "predict_s": round(t_predict, 3),
                    "robustness_s": round(time.perf_counter() - t1 - t_predict, 3)}}
    with outputs.replacing_output_dir(out, "evaluation") as folder:
        write_report(folder, [result], probes, metrics, run_dir=run_dir, title=f"Evaluation on {data_name}",
                     ood_sets=ood_sets)
    say(f"accuracy {metrics['accuracy']:.4f}, top-{metrics['top_k']} {metrics['top_k_accuracy']:.4f}, "
        f"macro F1 {metrics['macro_avg']['f1']:.4f}. Report: {out / 'report.html'}")
    if ood_sets:
        say(_ood_line(ood_sets[0].metrics))
    return {**metrics, "out": str(out)}


def _ood_line(m: dict) -> str:
    found = (f"AUROC {m['auroc']:.3f} (95% interval {m['auroc_low']:.3f}-{m['auroc_high']:.3f})")
    if not m["separated"]:
        found += ": no measurable separation from the in-domain images; do not rely on the score for these"
    return (f"--ood-data: {m['rejected']:.1%} of {m['images']} images rejected as unknown "
            f"({m['inside_rejected']:.1%} of the {m['inside_images']} in-domain images); {found}.")


def _run_temperature(run_dir) -> float | None:
    """The temperature a run folded into its model (None for exports and runs without calibration)."""
    if run_dir is None:
        return None
    return (rundir.read_summary(run_dir).get("trust") or {}).get("temperature")


def _open_model(model):
    """(predictor, run directory or None): a predictor object as it is, else whatever `load_predictor` loads."""
    if all(hasattr(model, name) for name in ("labels", "image_size", "predict")):
        return model, None
    predictor = load_predictor(model)
    is_run = (Path(model) / rundir.MODEL_FILE).is_file()  # a run directory, not an exported model
    return predictor, Path(model) if is_run else None


def _model_folder(model, run_dir: Path | None) -> Path:
    """Where an evaluation goes by default: the run directory, the export folder (the folder holding a
    SavedModel's version folder), the folder of a model file; the current folder for a model in memory."""
    if run_dir is not None:
        return run_dir
    if not isinstance(model, (str, Path)):
        return Path.cwd()
    model = Path(model)
    if model.is_file():
        return model.parent
    return model.parent if model.name.isdigit() and (model / "saved_model.pb").is_file() else model
