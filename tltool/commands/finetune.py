"""`finetune`: recipe -> checked data -> backbone -> stage 1 -> stage 2 -> evaluation -> run directory."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltool import outputs, rundir
from tltool.data.manifest import MANIFEST_FILE, check_same_data, manifest_split, read_manifest, write_manifest
from tltool.engine.cluster import Cluster, Role, role_from_environment, split_fingerprint
from tltool.engine.feature_layer import choose_feature_layer, settle_unmeasured
from tltool.engine.progress import CHECKPOINTS_DIR, RunProgress, check_resumable
from tltool.engine.setup import RunSetup, Runtime, prepare_run, resolve_recipe, start_runtime
from tltool.engine.stages import TrainingContext, build_model, train_stages
from tltool.engine.trust import FinalFeatures, Trust, cached_final_features, fit_trust
from tltool.errors import DataError, RecipeError, RunDirError, TltoolError, WorkerLostError
from tltool.models.ood import build_ood_scorer, with_ood_output
from tltool.recipe import from_dict, load_recipe, recorded_decisions, save_recipe


@dataclass
class FinetuneResult:
    run_dir: Path
    summary: dict
    model: object = None        # the trained keras.Model: pixels -> {probabilities, ood_score} (probabilities
    #                             alone with trust.ood off)
    model_parts: object = None  # its TransferModel: feature_extractor, backbone, head


def finetune(recipe=None, *, data=None, val_data=None, test_data=None, backbone=None, weights=None,
             image_size=None, epochs=None, fine_tune_epochs=None, batch_size=None, seed=None, out=None,
             overrides=(), force=False, resume=False, deterministic=False, strategy=None, verbose: int = 1,
             log=print, tensorboard: bool = False) -> FinetuneResult:
    """Fine-tune a pretrained backbone on an image folder and write a run directory.

    Args:
        recipe: path of a YAML recipe, a `Recipe`, or None for the defaults.
        data, val_data, test_data: image folders (one sub-folder per class); override the recipe's.
        backbone, weights, image_size, epochs, fine_tune_epochs, batch_size, seed: override the recipe.
            `epochs` is stage 1 (frozen backbone), `fine_tune_epochs` stage 2 (0 skips it).
        out: run directory; default runs/NAME-TIMESTAMP. Must be new or empty unless `force` or `resume`.
        overrides: `dotted.key=value` strings, as `--set`.
        force: overwrite a non-empty `out`.
        resume: continue the interrupted run in `out` from its last finished epoch, with the settings
            of its recipe.yaml (no other recipe argument may be given).
        deterministic: deterministic ops, so the same seed gives the same metrics (`train.deterministic`).
        strategy: `default` or `mirrored` (all visible GPUs); default the recipe's `train.strategy`.
        verbose: 0 silent, 1 progress bars and messages, 2 the same with one line per epoch (for logs).
        log: where messages go.
        tensorboard: also log both stages for TensorBoard under RUN/tb/stage1 and RUN/tb/stage2.

    Returns:
        FinetuneResult with the run directory and the summary written to its summary.json.
    """
    t_start = time.perf_counter()
    say = log if verbose else (lambda *a, **k: None)
    flags = dict(data=data, val_data=val_data, test_data=test_data, backbone=backbone, weights=weights,
                 image_size=image_size, epochs=epochs, fine_tune_epochs=fine_tune_epochs, batch_size=batch_size,
                 seed=seed, deterministic=deterministic, strategy=strategy, overrides=overrides)
    worker = _worker_role(resume, out, recipe, flags)
    if worker is not None:  # a multi-worker run's other workers train with the chief's recipe, and write nothing
        return _train_as_worker(worker, say, verbose)
    if resume:
        run_dir = _resumable_run(out, recipe, {**flags, "force": force})
        recipe = load_recipe(run_dir / rundir.RECIPE_FILE)
    else:
        recipe = resolve_recipe(recipe, **flags)
        run_dir = Path(out) if out else None  # None: a new runs/NAME-TIME, made once the checks have passed
    role = role_from_environment() if recipe.train.strategy == "multi_worker" else None
    joined = []  # the cluster, once formed: before TensorFlow runs anything (weights may need it)
    folders = [f for f in (recipe.data.train, recipe.data.val, recipe.data.test) if f]
    where = dict(kind="run", force=force, resume=resume, resumable=True, inputs=folders, data=folders)

    def before_heavy_work():
        if run_dir:
            outputs.check_output_dir(run_dir, **where)
        if role is not None:
            joined.append(Cluster(role, say))

    try:
        setup = prepare_run(recipe, before_heavy_work=before_heavy_work)
        if resume:
            _same_data_as_before(run_dir, setup)
        if run_dir is None:
            run_dir = rundir.new_run_dir(recipe.name)
        # Locked: no other command writes there. A run --force replaces is kept aside until this one finishes.
        claim = outputs.claiming_keeping_previous(run_dir, finished=_finished, say=say, **where)
        with claim, _watching(joined):
            return _train_in(run_dir, setup, resume, say, verbose, tensorboard, t_start,
                             joined[0] if joined else None)
    except WorkerLostError as exc:
        exc.run_dir = run_dir  # the `tltool` program restarts itself with --resume --out RUN_DIR
        raise
    except TltoolError as exc:
        if joined and not joined[0].planned:  # the workers wait for a plan: they get this line instead
            joined[0].broadcast_json({"stop": str(exc)})
        raise


def _train_in(run_dir: Path, setup: RunSetup, resume: bool, say, verbose: int, tensorboard: bool,
              t_start: float, cluster=None) -> FinetuneResult:
    """The run itself, in its claimed run directory."""
    recipe = setup.recipe
    skipped_at_start = _announce(setup, run_dir, say)
    if cluster is not None:
        _send_plan(cluster, setup, run_dir, resume)
    runtime = start_runtime(recipe, cluster)
    ctx = TrainingContext(setup, runtime, verbose, say)
    if resume:
        ctx.decisions = recorded_decisions(run_dir / rundir.RECIPE_FILE)
        _layer_of_a_resumed_run(run_dir, recipe)
    else:
        _record_start(run_dir, setup)  # first: a run killed from here on can be resumed
    try:
        if choose_feature_layer(ctx):  # the model's shape depends on it: measured before it is built
            save_recipe(recipe, run_dir / rundir.RECIPE_FILE, ctx.decisions)
            # Building the probe's network drew from Keras's seeded generators: start afresh, so that the run is
            # the one its recipe.yaml (which records the layer) repeats. The model reuses that network (its
            # weights are the file's; whatever training draws comes from the recipe's seeds).
            ctx.runtime = runtime = start_runtime(recipe, cluster)
        tm = build_model(setup, runtime, ctx.probe_network)
        ctx.probe_network = None
    except TltoolError:
        if not resume:  # e.g. a weights file that does not fit: nothing trained, and a resume would fail alike
            _forget_start(run_dir)
        raise
    progress = _start_or_resume(run_dir, tm, resume, say)
    timings = train_stages(ctx, tm, progress=progress, run_dir=run_dir, tensorboard=tensorboard)
    if ctx.decisions:  # values the run measured: recorded, so that a repeat or a resume takes them as given
        save_recipe(recipe, run_dir / rundir.RECIPE_FILE, ctx.decisions)
    if cluster is not None:
        tm = _outside_the_cluster(setup, tm)
    final = cached_final_features(ctx, tm) if cluster is None else None  # a worker's would be its shard's
    trust = fit_trust(ctx, tm, final)
    timings["trust_s"] = round(trust.seconds, 3)
    model = inference_model(tm, trust)
    eval_sets, probes, val_gap = _evaluate(model, setup, timings, _known_val_scores(final, tm, model), say)
    rundir.save_inference_model(model, run_dir / rundir.MODEL_FILE)
    timings["total_s"] = round(progress.elapsed_before + time.perf_counter() - t_start, 3)
    summary = run_summary(setup, eval_sets, timings, resumed=resume, trust=trust,
                          workers=cluster.num_workers if cluster is not None else 1, val_from_cache_gap=val_gap)
    rundir.write_summary(run_dir, summary)
    _write_report(run_dir, eval_sets, probes, setup.classes, trust.temperature, say)
    progress.finish_run()
    say(_done_line(summary, run_dir, skipped_at_start))
    say(f"Next: tltool export {run_dir} --format tflite (or savedmodel, keras, onnx); "
        f"tltool predict {run_dir} IMAGE...")
    return FinetuneResult(run_dir, summary, model, tm)


def _finished(run_dir: Path) -> bool:
    """Whether `run_dir` holds a finished run (one --resume would refuse)."""
    return (run_dir / rundir.SUMMARY_FILE).is_file() and RunProgress(run_dir).finished


# ------------------------------------------------------------------------------ multi-worker runs


def _worker_role(resume: bool, out, recipe, flags: dict) -> Role | None:
    """This process's role when it is one of a multi-worker run's other workers (not the chief), else None.

    A worker keeps no run directory, so `--resume` there (the command a restarted worker may be given) is
    told apart by TF_CONFIG alone; otherwise the recipe or --strategy must ask for multi_worker."""
    if not os.environ.get("TF_CONFIG"):
        return None
    if resume:
        saved = Path(out) / rundir.RECIPE_FILE if out else None
        asked = saved is None or not saved.is_file() or load_recipe(saved).train.strategy == "multi_worker"
    else:
        asked = resolve_recipe(recipe, **flags).train.strategy == "multi_worker"
    role = role_from_environment() if asked else None
    return role if role is not None and not role.is_chief else None


def _send_plan(cluster: Cluster, setup: RunSetup, run_dir: Path, resume: bool) -> None:
    """What every worker trains by: the chief's recipe and split; the workers' answer (each checks its own
    data against the chief's); then the chief's checkpoints (stages done, the last finished epoch)."""
    cluster.planned = True
    cluster.broadcast_json({"recipe": setup.recipe.to_dict(), "split": split_fingerprint(setup.split),
                            "resume": resume})
    failed = cluster.agree(True)
    # Loading weights into the cluster's variables is a collective too: every worker loads the same files.
    cluster.share_folder(RunProgress(run_dir).dir, None)
    if failed:
        raise DataError(f"Worker(s) {', '.join(map(str, failed))} of TF_CONFIG cannot train this run (their logs "
                        f"say why): every host needs the same images and weights at the same paths.")


def _watching(joined: list):
    """The block with the cluster's failures (if there is a cluster) turned into WorkerLostError."""
    return joined[0].watching() if joined else contextlib.nullcontext()


def _train_as_worker(role: Role, say, verbose: int) -> FinetuneResult:
    """One of a multi-worker run's other workers (see cluster.py)."""
    cluster = Cluster(role, say)
    with cluster.watching():
        return _work_for_the_chief(cluster, role, say, verbose)


def _work_for_the_chief(cluster: Cluster, role: Role, say, verbose: int) -> FinetuneResult:
    """The chief's plan, this worker's shard of the images, nothing written but scratch files."""
    plan = cluster.broadcast_json()
    if "stop" in plan:
        raise RecipeError(f"The chief of this multi-worker run stopped: {plan['stop']}")
    recipe = from_dict(plan["recipe"], "the chief's recipe")
    problem = None
    try:
        setup = prepare_run(recipe)
        if split_fingerprint(setup.split) != plan["split"]:
            problem = DataError(f"The images in {recipe.data.train} on this host are not the chief's (other "
                                f"files or classes): every host needs the same images at the same paths.")
    except TltoolError as exc:
        problem = exc
    failed = cluster.agree(problem is None)
    if problem is not None:
        raise problem
    if failed:
        raise DataError(f"Worker(s) {', '.join(map(str, failed))} of TF_CONFIG cannot train this run (their logs "
                        f"say why); stopping.")
    # The worker writes what the chief writes, where nobody reads it, and loads what the chief loads: saving
    # and loading weights touch variables MultiWorkerMirroredStrategy keeps in sync with a collective (the
    # optimizer's step count), so every worker must save and load at the same points.
    scratch = _worker_scratch(role)
    try:
        cluster.share_folder(None, scratch / CHECKPOINTS_DIR)
        runtime = start_runtime(recipe, cluster)
        tm = build_model(setup, runtime)
        ctx = TrainingContext(setup, runtime, verbose, say)
        progress = RunProgress(scratch)
        if plan["resume"]:
            progress.restore(tm.model, say)
        timings = train_stages(ctx, tm, progress=progress, run_dir=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    fit_trust(ctx, _outside_the_cluster(setup, tm))  # this worker's features, gathered by the chief
    say(f"Worker {cluster.index} of {cluster.num_workers} done; the chief writes the run directory.")
    return FinetuneResult(None, {"role": role.name, "workers": cluster.num_workers, "timings": timings})


def _worker_scratch(role: Role) -> Path:
    """An empty scratch folder for this worker, named after its place in this cluster (TF_CONFIG's addresses
    and its task). A worker killed and started again, as multi-worker runs restart them, empties the
    folder its killed process left (checkpoints, the size of the model) instead of leaving one behind for
    every kill. A folder of that name that is not this user's is left alone: a fresh one is used instead."""
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    key = json.dumps([cluster, role.task_type, role.task_index], sort_keys=True)
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    path = Path(tempfile.gettempdir()) / f"tltool-worker-{user}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    try:
        if path.is_dir() and not path.is_symlink() and _owned_by_this_user(path):
            shutil.rmtree(path)
        path.mkdir(mode=0o700)
        return path
    except OSError:  # someone else's, or not removable
        return Path(tempfile.mkdtemp(prefix="tltool-worker-"))


def _owned_by_this_user(path: Path) -> bool:
    return not hasattr(os, "getuid") or path.stat().st_uid == os.getuid()


def _outside_the_cluster(setup: RunSetup, tm):
    """A copy of the trained model outside the cluster's strategy, for what each worker does alone afterwards
    (features for calibration, evaluation, saving): a model built in MultiWorkerMirroredStrategy's scope
    would wait on the other workers in every prediction."""
    import tensorflow as tf

    copy = build_model(setup, Runtime(tf.distribute.get_strategy(), False))
    copy.model.set_weights(tm.model.get_weights())
    return copy


def _same_data_as_before(run_dir: Path, setup: RunSetup) -> None:
    """Refuse to resume on other data than the run started with; then train on the split it recorded."""
    manifest = read_manifest(run_dir)
    if manifest is None:  # a run from before tltool recorded its data: the folders as they are now
        return
    check_same_data(manifest, setup.split)
    setup.split = manifest_split(manifest)


def inference_model(tm, trust: Trust):
    """The model a run saves: `tm.model` (probabilities), with the OOD score as a second output when fitted."""
    if trust.ood is None:
        return tm.model
    return with_ood_output(tm, build_ood_scorer(trust.ood.bank, trust.ood.threshold, trust.ood.blanks))


def _resumable_run(out, recipe, other_args: dict) -> Path:
    """The run directory to resume, after refusing any argument that would change its saved settings."""
    if out is None:
        raise RecipeError("--resume needs --out: the run directory of the interrupted run.")
    given = [name for name, value in other_args.items() if value not in (None, (), [], False)]
    if recipe is not None or given:
        flags = {"overrides": "--set", "epochs": "--epochs", "fine_tune_epochs": "--fine-tune-epochs"}
        names = ", ".join(["RECIPE"] * (recipe is not None)
                          + [flags.get(n, f"--{n.replace('_', '-')}") for n in given])
        raise RecipeError(f"--resume continues a run with the settings saved in its recipe.yaml; drop {names}.")
    out, previous = Path(out), outputs.previous_dir(Path(out))
    if not (out / rundir.RECIPE_FILE).is_file() and (outputs.read_marker(previous) or {}).get("kind") == "run":
        raise RunDirError(f"Nothing to resume in {out}: the --force run that was to replace it was stopped before "
                          f"it began. The run it replaced is whole in {previous}: run the same --force command "
                          f"again, or move {previous} back to {out} to keep it.")
    return check_resumable(out)


def _announce(setup: RunSetup, run_dir: Path, say) -> int:
    """The run's first line; returns how many files the scan found unreadable (decoding may find more)."""
    split = setup.split
    say(f"tltool: {setup.spec.name} at {setup.image_size}px, {len(setup.classes)} classes, {len(split.train)} "
        f"training / {len(split.val)} validation" + (f" / {len(split.test)} test" if split.test else "")
        + f" images. Run directory: {run_dir}")
    if len(split.skips):
        say(f"Skipping {len(split.skips)} unreadable file(s); summary.json will list them (skipped_files).")
    return len(split.skips)


def _record_start(run_dir: Path, setup: RunSetup) -> None:
    """What a new run records before any work: its data, its recipe and its labels."""
    write_manifest(run_dir, setup.split)
    save_recipe(setup.recipe, run_dir / rundir.RECIPE_FILE)
    rundir.write_labels(run_dir, setup.classes)


def _forget_start(run_dir: Path) -> None:
    """Remove what `_record_start` wrote, so that the same command can run again in the same folder."""
    for name in (MANIFEST_FILE, rundir.RECIPE_FILE, rundir.LABELS_FILE):
        (run_dir / name).unlink(missing_ok=True)


def _layer_of_a_resumed_run(run_dir: Path, recipe) -> None:
    """A recipe.yaml that still says `head.layer: auto` was saved before the layer was measured (a run killed
    while measuring it: measured now) or by a tltool older than `head.layer`, whose runs read the top: it
    is the top when the run has trained anything."""
    if (recipe.head.layer == "auto" or recipe.head.grid is None) and (run_dir / rundir.HISTORY_FILE).exists():
        settle_unmeasured(recipe.head, "a run that trained before recording a measured layer")


def _start_or_resume(run_dir: Path, tm, resume: bool, say) -> RunProgress:
    """The run's resume state; a resumed run gets the weights of its finished stages."""
    progress = RunProgress(run_dir)
    if resume:
        progress.restore(tm.model, say)
    return progress


def _evaluate(model, setup: RunSetup, timings: dict, val_known=None, say=print):
    """The model's scores and metrics of val (and test): the summary's and the report's, from one pass of the
    image-level model over the image files. `val_known`: the validation images' scores from the features
    cached in training (KnownScores), taken instead of that pass when the model gives the same for an even
    sample of the files. Returns (eval sets, probes, the largest difference found on that sample: None when
    `val_known` was not given or a sampled file could not be read again)."""
    from tltool.evaluation.sets import KNOWN_SCORES_TOLERANCE, evaluate_run_sets, known_scores_difference
    from tltool.exporting.predictors import KerasPredictor

    t0 = time.perf_counter()
    predictor, known, gap = KerasPredictor(model, setup.classes), {}, None
    if val_known is not None:
        gap = known_scores_difference(predictor, setup.split.val, val_known, setup.split.skips)
        if gap <= KNOWN_SCORES_TOLERANCE:
            known["val"] = val_known
        else:
            say(f"Warning: The validation scores from the cached features differ from the saved model's by "
                f"{gap:.3g} (more than {KNOWN_SCORES_TOLERANCE}); evaluating every validation image instead.")
    result = evaluate_run_sets(predictor, {"val": setup.split.val, "test": setup.split.test}, setup.split.skips,
                               robustness=setup.recipe.trust.robustness, known=known)
    timings["evaluate_s"] = round(time.perf_counter() - t0, 3)
    return (*result, round(gap, 6) if gap is not None and math.isfinite(gap) else None)


def _known_val_scores(final: FinalFeatures | None, tm, model):
    """The saved model's scores of the validation images (KnownScores) from the final features the run
    computed from its cache (through the head, whose temperature is folded in, and the OOD scorer); None
    without them."""
    from tltool.engine.trust import on_features
    from tltool.evaluation.sets import KnownScores
    from tltool.models.ood import OOD_LAYER, Scores

    if final is None or final.val_rows is None:
        return None
    scorer = next((layer for layer in model.layers if layer.name == OOD_LAYER), None)
    ood = None if scorer is None else on_features(scorer, final.val_x).reshape(-1)
    return KnownScores(np.asarray(final.val_rows), Scores(on_features(tm.head, final.val_x), ood))


def run_summary(setup: RunSetup, eval_sets, timings: dict, resumed: bool, trust: Trust | None = None,
                workers: int = 1, val_from_cache_gap: float | None = None) -> dict:
    """The content of summary.json: what the run trained on and how well it did. `val_from_cache_gap`: see
    `_evaluate`."""
    recipe, classes = setup.recipe, setup.classes
    used = setup.split.without_skipped()  # files found broken only while decoding are not counted
    scores = {s.key: s.metrics for s in eval_sets}

    def score(split: str, metric: str):
        return round(float(scores[split][metric]), 6) if split in scores else None

    return {
        "name": recipe.name,
        "backbone": setup.spec.name,
        "weights": recipe.backbone.weights if not setup.weights.fell_back else "none (fallback)",
        "image_size": setup.image_size,
        "classes": classes,
        "num_classes": len(classes),
        "images": {"train": len(used.train), "val": len(used.val), "test": len(used.test) if used.test else None},
        "class_counts": {"train": used.train.counts(), "val": used.val.counts(),
                         "test": used.test.counts() if used.test else None},
        "val_accuracy": score("val", "accuracy"),
        "val_loss": score("val", "log_loss"),
        "test_accuracy": score("test", "accuracy"),
        "test_loss": score("test", "log_loss"),
        "val_from_cache_gap": val_from_cache_gap,
        "skipped_files": setup.split.skips.as_list(),
        "trust": trust.as_dict() if trust is not None else None,
        "timings": timings,
        "strategy": recipe.train.strategy,
        "workers": workers,
        "resumed": bool(resumed),
        "versions": _versions(),
    }


def _done_line(summary: dict, run_dir: Path, skipped_at_start: int) -> str:
    test = summary["test_accuracy"]
    return (f"Done in {summary['timings']['total_s']:.1f}s: val_accuracy {summary['val_accuracy']:.4f}"
            + (f", test_accuracy {test:.4f}" if test is not None else "")
            + _skipped_note(len(summary["skipped_files"]), skipped_at_start) + f". Run directory: {run_dir}")


def _skipped_note(skipped: int, at_start: int) -> str:
    """The files left out, counted once: those the first line announced and any found broken while decoding."""
    if not skipped:
        return ""
    later = skipped - at_start
    if not later:
        return f"; {skipped} unreadable file(s) skipped"
    if not at_start:
        return f"; {skipped} unreadable file(s) skipped (found while decoding)"
    return f"; {skipped} unreadable file(s) skipped ({later} of them found only while decoding)"


def _write_report(run_dir: Path, eval_sets, probes, classes, temperature, say) -> None:
    """metrics.json, plots/ and report.html; a failure only warns, since the run itself is complete by now."""
    from tltool.evaluation.sets import write_run_report

    try:
        t0 = time.perf_counter()
        write_run_report(run_dir, eval_sets, probes, classes, temperature)
        say(f"Report ({time.perf_counter() - t0:.1f}s): {run_dir / 'report.html'}")
    except Exception as exc:  # noqa: BLE001 - a report bug must not cost a finished training run
        warnings.warn(f"The run report could not be written ({type(exc).__name__}: {exc}). Write it with "
                      f"`tltool evaluate {run_dir} --data DIR`.", UserWarning, stacklevel=2)


def _versions() -> dict:
    import keras
    import tensorflow as tf

    from tltool import __version__

    return {"tltool": __version__, "tensorflow": tf.__version__, "keras": keras.__version__}
