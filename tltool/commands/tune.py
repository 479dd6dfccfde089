"""`tune`: a Keras Tuner search over a recipe's `tune.space`, every trial trained exactly as `finetune` trains.

The output folder holds the Keras Tuner project (`search/`: one JSON file per trial, the oracle's state),
which is what makes re-running the same command resume, plus the reports written after every trial:
`summary.json`, `trials.csv`, `best.yaml` (a complete recipe for `tltool finetune`) and, at the end,
`trials.png`. The search machinery is in tuning/search.py, the distributed roles in tuning/distributed.py.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from tltool import outputs, rundir
from tltool.engine.feature_layer import choose_feature_layer, settle_unmeasured
from tltool.engine.setup import prepare_run, resolve_recipe, start_runtime
from tltool.engine.stages import TrainingContext
from tltool.errors import RecipeError, RunDirError, SearchFailedError
from tltool.recipe import Recipe, from_dict, load_recipe
from tltool.tuning.distributed import distributed_role, oracle_address
from tltool.tuning.reports import BEST_FILE, fmt_epochs, format_table, trial_number, write_reports
from tltool.tuning.search import (UNLIMITED, RecipeHyperModel, RecipeTuner, TrialRunner, hyperband_budget,
                                  make_oracle)
from tltool.tuning.space import SearchSpace, default_space

SEARCH_DIR = "search"            # the Keras Tuner project inside --out
_ENDED = ("COMPLETED", "FAILED", "INVALID")


@dataclass
class TuneResult:
    """What `tune` returns: the output folder, its summary, and the best trial's recipe (None on a worker)."""

    out_dir: Path
    summary: dict
    best_recipe: Recipe | None = None


def tune(recipe=None, *, data=None, val_data=None, test_data=None, backbone=None, weights=None, image_size=None,
         batch_size=None, seed=None, algorithm=None, max_trials=None, objective=None, out=None, overwrite=False,
         overrides=(), verbose: int = 1, log=print) -> TuneResult:
    """Search the recipe's `tune.space` with Keras Tuner; every trial trains as `finetune` does.

    Args:
        recipe: path of a YAML recipe, a `Recipe`, or None for the defaults.
        data, val_data, test_data, backbone, weights, image_size, batch_size, seed: override the recipe,
            as for `finetune`.
        algorithm: `hyperband`, `bayesian`, `random` or `grid`; default the recipe's `tune.algorithm`.
        max_trials: most trials; default the recipe's `tune.max_trials`.
        objective: `val_accuracy` (maximised) or `val_loss` (minimised); default the recipe's.
        out: output folder; default runs/NAME-tune. Re-running with the same folder resumes the search.
        overwrite: delete what `out` holds and start afresh.
        overrides: `dotted.key=value` strings, as `--set`.
        verbose: 0 silent, 1 progress bars, 2 one line per epoch (for logs).
        log: where messages go.

    Returns:
        TuneResult: the output folder, the summary written to its summary.json, and the best recipe.

    Raises:
        SearchFailedError: when every trial failed (the reports are written first).
    """
    base = _search_recipe(recipe, dict(data=data, val_data=val_data, test_data=test_data, backbone=backbone,
                                       weights=weights, image_size=image_size, batch_size=batch_size, seed=seed),
                          dict(algorithm=algorithm, max_trials=max_trials, objective=objective), overrides)
    say = log if verbose else (lambda *a, **k: None)
    role = distributed_role()
    space = _search_space(base)
    out = Path(out) if out else Path("runs") / f"{base.name}-tune"
    # The chief only hands out trials: it needs neither data nor weights. Workers and a single process check
    # them before --overwrite wipes anything.
    setup = prepare_run(base) if role != "chief" else None
    runner = TrialRunner(setup, space, verbose=verbose, log=say) if setup is not None else None
    # Every trial's model reads the backbone where the base recipe's does. In a distributed search the chief
    # has no images, and workers measuring each on their own might not agree: there it is the top.
    if role == "single":
        ctx = TrainingContext(setup, start_runtime(base), verbose, say)
        choose_feature_layer(ctx, unfreeze=runner.deepest_blocks)
        # Its pass over the plain images serves the search's features, its decoded images the views', and its
        # network the models that extract and train on them.
        runner.probe_rows, runner.decoded, runner.probe_network = ctx.probe_rows, ctx.decoded, ctx.probe_network
    elif base.head.mode == "pooled" and (base.head.layer == "auto" or base.head.grid is None):
        say(settle_unmeasured(base.head, "not measured in a distributed search") + ".")
    resuming, lock = _prepare_out(out, base, overwrite) if role != "worker" else (False, None)
    try:
        return _tune_in(out, base, space, setup, runner, role, resuming, say)
    finally:
        if lock is not None:
            lock.release()


def _tune_in(out: Path, base: Recipe, space: SearchSpace, setup, runner: TrialRunner | None, role: str,
             resuming: bool, say) -> TuneResult:
    """The search itself, in its claimed output folder."""
    if runner is not None:
        say(f"tltool tune: {base.tune.algorithm} search of {len(space.keys)} value(s) ({', '.join(space.keys)}), "
            f"up to {base.tune.max_trials} trials; {setup.spec.name} at {setup.image_size}px, "
            f"{len(setup.classes)} classes, {len(setup.split.train)} training / {len(setup.split.val)} validation "
            f"images.")
    tuner = _make_tuner(base, space, runner, out, role, say)
    finished = 0 if role == "worker" else _finished_trials(tuner)
    if runner is not None and finished < base.tune.max_trials:
        _precompute(runner, space, base, say)
    # Everything alive now (TensorFlow, Keras, the features) lives through the search: freezing it out of
    # the garbage collector's view makes the collection after each trial scan only that trial's objects
    # (milliseconds instead of ~0.3 s a trial).
    gc.collect()
    gc.freeze()
    try:
        return _run_search(tuner, out, base, space, role, resuming, say)
    finally:
        gc.unfreeze()


def _precompute(runner: TrialRunner, space: SearchSpace, base: Recipe, say) -> None:
    """Compute once, before the first trial, what the search's trials share (so the first trial's time is
    its own)."""
    if runner.all_head_trials(space):
        say("Every trial changes only the head: computing the backbone's features once for all of them.")
        runner.features()
    elif runner.is_cut_trial(base):
        runner.deep_features()
    runner.probe_rows = {}  # what neither used is of no use to trials that run in full


def _search_recipe(recipe, flags: dict, search: dict, overrides) -> Recipe:
    """The base recipe of the search, with the search flags as `tune.*` overrides."""
    extra = [f"tune.{key}={value}" for key, value in search.items() if value is not None]
    resolved = resolve_recipe(recipe, **flags, overrides=tuple(overrides) + tuple(extra))
    if resolved.train.strategy == "multi_worker":
        raise RecipeError("train.strategy multi_worker trains one run on several hosts (tltool finetune); a "
                          "search spreads its trials over hosts with tune's chief/worker mode instead (see README).")
    return resolved


def _search_space(base: Recipe) -> SearchSpace:
    space = SearchSpace(base.tune.space or default_space(base))
    if not base.tune.space:
        from_dict({**base.to_dict(), "tune": {**base.to_dict()["tune"], "space": space.space}})  # validates it
    return space


def _finished_trials(tuner) -> int:
    return sum(t.status in _ENDED for t in tuner.oracle.trials.values())


def _make_tuner(base: Recipe, space: SearchSpace, runner, out: Path, role: str, say) -> RecipeTuner:
    """The Keras Tuner tuner of the search (reloading its project in `out`, if any), with tltool's reports."""
    hyperband = base.tune.algorithm == "hyperband"
    budget = hyperband_budget(base.tune.max_trials)
    hypermodel = RecipeHyperModel(base, space, runner, budget if hyperband else None)
    oracle = make_oracle(base.tune.algorithm, base.tune.objective, base.tune.max_trials, base.seed, budget)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras Tuner prints "Reloading Tuner from ..."
        tuner = RecipeTuner(oracle=oracle, hypermodel=hypermodel, directory=str(out), project_name=SEARCH_DIR,
                            overwrite=False, role=role, log=say)
    if hyperband and role != "worker":  # a resumed search keeps the budget it started with (--max-trials may grow)
        hypermodel.budget_epochs = tuner.oracle.max_epochs
        tuner.oracle.hyperband_iterations = UNLIMITED  # searches saved by earlier versions stopped after one pass
    if role != "worker":
        tuner.oracle.after_end_trial = _reporter(out, base, space, role, say)
        tuner.oracle.verbose = 0  # Keras Tuner's own display would repeat (and clear) what tltool prints
    return tuner


def _reporter(out: Path, base: Recipe, space: SearchSpace, role: str, say):
    """The oracle's hook after each trial: rewrite the reports; the chief also shows every trial as it ends
    (workers print their own)."""
    def after_end_trial(oracle, trial):
        summary = write_reports(out, oracle, base, space)
        if role == "chief":
            record = next(r for r in summary["trials"] if r["trial_id"] == trial.trial_id)
            outcome = (f"{oracle.objective.name} {record[oracle.objective.name]:.4f}"
                       if record["status"] == "completed" else f"FAILED: {record.get('error')}")
            say(f"Trial {trial_number(record['trial_id'])} [{record['worker']}] {outcome} "
                f"({summary['trials_completed']} completed so far)")

    return after_end_trial


def _prepare_out(out: Path, base: Recipe, overwrite: bool):
    """Claim (and lock) `out` for the search; returns (True when it holds a search of the same recipe to
    resume, the lock to hold while searching)."""
    folders = [f for f in (base.data.train, base.data.val, base.data.test) if f]
    checks = dict(inputs=folders, data=folders, flag="--overwrite")
    resuming = not overwrite and out.is_dir() and outputs.has_content(out)
    if resuming:
        saved = out / rundir.RECIPE_FILE
        if not (out / SEARCH_DIR).is_dir() or not saved.is_file():
            raise RunDirError(f"Output folder {out} is not empty and holds no tltool search. Choose another --out, "
                              f"or pass --overwrite to replace its contents.")
        before = _comparable(yaml.safe_load(saved.read_text(encoding="utf-8")))
        now = _comparable(base.to_dict())
        if before != now:
            diff = _first_difference(before, now)
            raise RunDirError(f"{out} holds a search of a different recipe (first difference: {diff}). Pass "
                              f"--overwrite to start afresh there, or choose another --out.")
    lock = outputs.claim_output_dir(out, "search", force=overwrite, resume=resuming, **checks)
    if not resuming:
        header = ("# Resolved recipe of this tltool search. Re-running the same `tltool tune` command with this "
                  "--out\n# resumes the search; --max-trials may grow between runs.\n")
        rundir.atomic_write_text(out / rundir.RECIPE_FILE, header + base.to_yaml())
    return resuming, lock


def _comparable(tree: dict) -> dict:
    tree = json.loads(json.dumps(tree))
    tree.get("tune", {}).pop("max_trials", None)  # a search may be extended
    return tree


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} then, {b!r} now"


class _NoRetracingWarnings(logging.Filter):
    """A search builds a new model per trial, so TensorFlow's "triggered tf.function retracing" is expected."""

    def filter(self, record):
        return "retracing" not in record.getMessage()


def _run_search(tuner, out: Path, base: Recipe, space: SearchSpace, role: str, resuming: bool, say) -> TuneResult:
    from keras_tuner.src import config as kt_config  # no public switch; see tests/test_dependency_apis.py

    quiet = _NoRetracingWarnings()
    logging.getLogger("tensorflow").addFilter(quiet)
    debug, kt_config.DEBUG = kt_config.DEBUG, False  # a failed trial is one line of ours, not a traceback
    try:
        return _search(tuner, out, base, space, role, resuming, say)
    finally:
        kt_config.DEBUG = debug
        logging.getLogger("tensorflow").removeFilter(quiet)


def _search(tuner, out: Path, base: Recipe, space: SearchSpace, role: str, resuming: bool, say) -> TuneResult:
    if role == "worker":
        say(f"Worker {tuner.tuner_id}: asking the chief at {oracle_address()} for trials.")
        tuner.search()
        say(f"Worker {tuner.tuner_id}: ran {tuner.trials_run} trial(s); the chief has the results.")
        return TuneResult(out, {"worker": tuner.tuner_id, "trials_run": tuner.trials_run})
    if resuming:
        say(f"Resuming the search in {out}: {_finished_trials(tuner)} trial(s) already done.")
    if role == "chief":
        say(f"Chief: serving the search on {oracle_address()}; start workers with the same command and "
            f"KERASTUNER_TUNER_ID=worker0, worker1, ...")
    tuner.search()
    summary = write_reports(out, tuner.oracle, base, space, plot=True)
    say("")
    say(format_table(summary))
    if summary["best"] is None:
        failed = [r for r in summary["trials"] if r.get("error")]
        last = failed[-1]["error"] if failed else "no trial ran"
        raise SearchFailedError(f"All {len(summary['trials'])} trial(s) failed; the last error: {last}. "
                                f"See {out / rundir.SUMMARY_FILE}.")
    best = summary["best"]
    name = summary["objective"]["name"]
    trained = (f" (the best of the trials Hyperband trained longest, {fmt_epochs(best['epochs'])} epochs)"
               if "epochs" in best else "")
    say(f"Best: trial {trial_number(best['trial_id'])}, {name} {best[name]:.4f}{trained}. Train it with: "
        f"tltool finetune {out / BEST_FILE} --out runs/{base.name}-best")
    scored = summary["trials_completed"]  # completed with a score
    if scored > 1:  # the largest of several noisy scores is likely above the chosen trial's true one
        say(f"As the best of {scored} trials scored on the same validation images, that score flatters it: "
            f"judge the trained run on images no trial saw (tltool evaluate RUN --data TEST_FOLDER).")
    return TuneResult(out, summary, load_recipe(out / BEST_FILE))
