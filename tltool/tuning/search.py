"""`tune`: a Keras Tuner search over a recipe's `tune.space`, every trial trained exactly as `finetune` trains.

Each trial is the base recipe with the trial's values set at their dotted keys. `RecipeHyperModel.build`
validates that recipe and builds its model; `RecipeHyperModel.fit` runs `finetune`'s own `train_stages`.
Trials that change only the head, the frozen stage's settings or the loss (and have no stage 2) train on
backbone features computed once for the whole search, so a head trial costs a few head epochs, not a pass
of every image through the backbone. Any other trial runs in full.

The output folder holds the Keras Tuner project (`search/`: one JSON file per trial, the oracle's state),
which is what makes re-running the same command resume, plus the reports written after every trial:
`summary.json`, `trials.csv`, `best.yaml` (a complete recipe for `tltool finetune`) and, at the end,
`trials.png`.

Distributed search uses Keras Tuner's own mechanism: with KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT
set, the process whose KERASTUNER_TUNER_ID contains "chief" runs the oracle (and writes the reports);
every other process is a worker that asks it for trials and runs them.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import yaml

from tltool import rundir
from tltool.errors import RunDirError, SearchFailedError, TltoolError, TuneError
from tltool.recipe import Recipe, from_dict
from tltool.tuning.space import HEAD_KEYS, SearchSpace, default_space, stripped_recipe, trial_recipe
from tltool.tuning.reports import BEST_FILE, fmt_value, format_table, last_line, write_reports

SEARCH_DIR = "search"            # the Keras Tuner project inside --out
_ENDED = ("COMPLETED", "FAILED", "INVALID")


@dataclass
class TuneResult:
    """What `tune` returns: the output folder, its summary, and the best trial's recipe (None on a worker)."""

    out_dir: Path
    summary: dict
    best_recipe: Recipe | None = None


# ------------------------------------------------------------------------------------------ training


@dataclass
class _Trial:
    recipe: Recipe
    tm: object
    split: object
    spec: object
    weights: object
    size: int
    strategy: object
    jit: bool
    features: object = None  # the search's precomputed features for a head trial


class TrialRunner:
    """Builds and trains one trial's model: the data, the weights and the shared features it needs."""

    def __init__(self, base: Recipe, split, verbose: int = 1, log=print):
        self.base = base
        self.verbose = verbose
        self.log = log
        self._splits = {self._split_key(base): split}
        self._features = None

    @staticmethod
    def _split_key(recipe: Recipe) -> str:
        data = dict(recipe.to_dict()["data"])
        data.pop("image_size"), data.pop("batch_size")
        return json.dumps([data, recipe.seed], sort_keys=True)

    def split_for(self, recipe: Recipe):
        from tltool.engine.stages import load_split_data

        key = self._split_key(recipe)
        if key not in self._splits:
            self._splits[key] = load_split_data(recipe)
        return self._splits[key]

    def is_head_trial(self, recipe: Recipe) -> bool:
        return (recipe.fine_tune.epochs == 0 and recipe.frozen.epochs > 0 and recipe.frozen.cache_features
                and stripped_recipe(recipe) == stripped_recipe(self.base))

    def all_head_trials(self, space: SearchSpace) -> bool:
        return set(space.keys) <= HEAD_KEYS and self.is_head_trial(self.base)

    def features(self):
        """The base recipe's stage-1 features, computed (or read from the feature cache) once per search."""
        if self._features is None:
            from tltool.models.backbones import get_backbone_spec, resolve_weights
            from tltool.engine.stages import TrainingContext, prepare_runtime, stage1_features
            from tltool.models.transfer import build_transfer_model

            base = self.base
            spec = get_backbone_spec(base.backbone.name)
            size = base.data.image_size or spec.default_size
            weights = resolve_weights(spec, base.backbone.weights, base.backbone.fallback,
                                      classic=base.head.mode == "classic", image_size=size)
            split = self.split_for(base)
            strategy, jit = prepare_runtime(base)
            with strategy.scope():
                tm = build_transfer_model(spec, weights, len(split.train.classes), size, base.head, seed=base.seed)
                ctx = TrainingContext(base, split, size, weights.pretrained, self.verbose, self.log, jit)
                self._features = stage1_features(ctx, tm.feature_extractor, spec, weights.fingerprint)
            del tm
            gc.collect()
        return self._features

    def build(self, recipe: Recipe) -> _Trial:
        from tltool.models.backbones import check_image_size, get_backbone_spec, resolve_weights
        from tltool.engine.stages import prepare_runtime
        from tltool.models.transfer import TransferModel, build_head, build_transfer_model

        spec = get_backbone_spec(recipe.backbone.name)
        size = recipe.data.image_size or spec.default_size
        check_image_size(spec, size)
        split = self.split_for(recipe)
        num_classes = len(split.train.classes)
        if self.is_head_trial(recipe):
            features = self.features()
            strategy, jit = prepare_runtime(recipe)
            with strategy.scope():
                head = build_head(features.train_x.shape[1], num_classes, recipe.head, seed=recipe.seed)
            return _Trial(recipe, TransferModel(head, None, None, head), split, spec, None, size, strategy, jit,
                          features)
        weights = resolve_weights(spec, recipe.backbone.weights, recipe.backbone.fallback,
                                  classic=recipe.head.mode == "classic", image_size=size)
        strategy, jit = prepare_runtime(recipe)
        with strategy.scope():
            tm = build_transfer_model(spec, weights, num_classes, size, recipe.head, seed=recipe.seed)
        return _Trial(recipe, tm, split, spec, weights, size, strategy, jit)

    def train(self, trial: _Trial) -> dict:
        """`finetune`'s two stages on the trial's model, then its validation loss and accuracy."""
        from tltool.engine.stages import TrainingContext, train_stages
        from tltool.engine.fitting import compile_model

        watch = _NanWatch()
        pretrained = trial.weights.pretrained if trial.weights is not None else True
        ctx = TrainingContext(trial.recipe, trial.split, trial.size, pretrained, verbose=0,
                              log=lambda *a, **k: None, jit_compile=trial.jit)
        train_stages(ctx, trial.tm, trial.strategy, trial.spec, trial.weights, features=trial.features,
                     extra_callbacks=[watch])
        if watch.epoch is not None:
            raise kt.errors.FailedTrialError(f"The loss became NaN in epoch {watch.epoch + 1}: the learning rate "
                                             f"is probably too high.")
        if trial.features is not None:
            # One eager call of the head on the validation features (no tracing), scored as evaluate() would.
            from tltool.evaluation.metrics import accuracy, log_loss

            probs = np.asarray(trial.tm.head(trial.features.val_x.astype(np.float32), training=False))
            val_loss, val_acc = log_loss(trial.features.val_y, probs), accuracy(trial.features.val_y, probs)
        else:
            compile_model(trial.tm.model, "adam", 1e-3, 0.0)
            val_loss, val_acc = trial.tm.model.evaluate(ctx.images(trial.split.val, training=False), verbose=0)
        if not math.isfinite(val_loss):
            raise kt.errors.FailedTrialError("The validation loss is NaN: the learning rate is probably too high.")
        return {"val_accuracy": float(val_acc), "val_loss": float(val_loss),
                "cached_features": float(trial.features is not None)}


class _NanWatch(keras.callbacks.Callback):
    """Notes the first epoch whose loss turned NaN (TerminateOnNaN then stops the stage)."""

    def __init__(self):
        super().__init__()
        self.epoch = None
        self._current = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if self.epoch is None and loss is not None and not math.isfinite(float(loss)):
            self.epoch = self._current


class RecipeHyperModel(kt.HyperModel):
    """A Keras Tuner HyperModel whose models are recipes: `build` validates the trial's recipe and builds its
    model, `fit` trains it with `finetune`'s own stages and returns its validation loss and accuracy."""

    def __init__(self, base: Recipe, space: SearchSpace, runner: TrialRunner | None, budget_epochs: int | None):
        super().__init__(name="tltool")
        self.base = base
        self.space = space
        self.runner = runner
        self.budget_epochs = budget_epochs
        self._trial: _Trial | None = None

    def declare_hyperparameters(self, hp):
        self.space.declare(hp)

    def recipe(self, hp) -> Recipe:
        budget = None
        if self.budget_epochs and "tuner/epochs" in hp.values:  # Hyperband's budget for this round
            budget = (int(hp.values["tuner/epochs"]), self.budget_epochs)
        try:
            return trial_recipe(self.base, self.space.values(hp.values), budget)
        except TltoolError as exc:
            raise kt.errors.FailedTrialError(str(exc)) from None

    def build(self, hp):
        try:
            self._trial = self.runner.build(self.recipe(hp))
        except TltoolError as exc:
            raise kt.errors.FailedTrialError(str(exc)) from None
        except _resource_errors() as exc:
            raise kt.errors.FailedTrialError(f"Out of memory building the model: {_first_line(exc)}") from None
        return self._trial.tm.model

    def fit(self, hp, model, *args, **kwargs):
        trial, self._trial = self._trial, None
        try:
            return self.runner.train(trial)
        except TltoolError as exc:
            raise kt.errors.FailedTrialError(str(exc)) from None
        except _resource_errors() as exc:
            raise kt.errors.FailedTrialError(f"Out of memory: {_first_line(exc)}") from None


def _resource_errors():
    import tensorflow as tf

    return (tf.errors.ResourceExhaustedError, MemoryError)


def _first_line(exc) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


# ------------------------------------------------------------------------------------------ oracle and tuner


class _TrialLog:
    """Oracle mixin: which tuner ran each trial and for how long, saved with the oracle's state.

    Lives in the oracle because in a distributed search only the chief's oracle sees every trial.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trial_log: dict[str, dict] = {}
        self.after_end_trial = None

    def create_trial(self, tuner_id):
        trial = super().create_trial(tuner_id)
        if trial.status == "RUNNING":
            entry = self.trial_log.get(trial.trial_id)
            if entry is None or "seconds" in entry:  # new, or a crashed trial sent for another run
                self.trial_log[trial.trial_id] = {"worker": tuner_id, "start": time.time()}
        return trial

    def end_trial(self, trial):
        entry = self.trial_log.get(trial.trial_id)
        if entry is not None:
            entry["seconds"] = round(time.time() - entry["start"], 3)
        super().end_trial(trial)
        if self.after_end_trial is not None:
            self.after_end_trial(self, trial)

    def get_state(self):
        state = super().get_state()
        state["tltool_trial_log"] = self.trial_log
        return state

    def set_state(self, state):
        super().set_state(state)
        self.trial_log = state.get("tltool_trial_log", {})


_ORACLES = {"random": "RandomSearchOracle", "bayesian": "BayesianOptimizationOracle", "grid": "GridSearchOracle",
            "hyperband": "HyperbandOracle"}


def make_oracle(algorithm: str, objective: str, max_trials: int, seed: int, budget_epochs: int):
    """The Keras Tuner oracle of `algorithm`, recording workers and times, never stopping on failed trials."""
    base_cls = getattr(kt.oracles, _ORACLES[algorithm])
    cls = type(f"Tltool{base_cls.__name__}", (_TrialLog, base_cls), {})
    direction = "min" if objective.endswith("loss") else "max"
    # A failed trial is recorded and the search goes on; Keras Tuner would stop after 3 in a row.
    common = {"objective": kt.Objective(objective, direction), "seed": seed,
              "max_consecutive_failed_trials": 10 ** 9}
    if algorithm == "hyperband":
        oracle = cls(max_epochs=budget_epochs, factor=3, **common)
        oracle.max_trials = max_trials  # Hyperband sizes itself from max_epochs; cap it as asked
        return oracle
    return cls(max_trials=max_trials, **common)


class RecipeTuner(kt.Tuner):
    """A Keras Tuner `Tuner` running `RecipeHyperModel` trials, with one progress line per trial."""

    def __init__(self, *args, role: str = "single", log=print, **kwargs):
        self.role = role
        self.say = log
        self.trials_run = 0
        self._results = None
        self._t0 = 0.0
        super().__init__(*args, **kwargs)

    def _populate_initial_space(self):
        # The space has no conditional parts: declaring it is enough, and it needs no data (the chief has none).
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def run_trial(self, trial, *args, **kwargs):
        # No per-epoch checkpoints: best.yaml, not a saved model, is what a search hands on.
        hp = trial.hyperparameters
        with _forget_trial_gradients():
            # build() starts with `prepare_runtime`, whose keras.backend.clear_session() also collects garbage:
            # Keras Tuner's own `_try_build` would clear and collect a second time.
            model = self.hypermodel.build(hp)
            self._results = self.hypermodel.fit(hp, model)
        return self._results

    def search(self, *args, **kwargs):
        if self.role == "chief":
            self.save()
            serve_oracle(self.oracle)
            return
        super().search(verbose=0)

    def on_trial_begin(self, trial):
        self._results = None
        self._t0 = time.perf_counter()
        super().on_trial_begin(trial)

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.trials_run += 1
        seconds = time.perf_counter() - self._t0
        name = self.oracle.objective.name
        values = self.hypermodel.space.values(trial.hyperparameters.values)
        shown = ", ".join(f"{k}={fmt_value(v)}" for k, v in values.items())
        if trial.status == "COMPLETED" and self._results:
            how = "on cached features" if self._results.get("cached_features") else "in full"
            outcome = f"{name} {self._results[name]:.4f} ({how})"
        else:
            outcome = f"FAILED: {last_line(trial.message)}"
        total = self.oracle.max_trials
        self.say(f"Trial {int(trial.trial_id) + 1}{f'/{total}' if total else ''} [{self.tuner_id}] {outcome} in "
                 f"{seconds:.1f}s  {shown}")
        self.hypermodel._trial = None
        self._results = None


@contextlib.contextmanager
def _forget_trial_gradients():
    """Drop the gradient functions a trial registered in TensorFlow's process-wide registry.

    Tracing a Keras train step registers one (the optimizer all-reduces gradients through
    `tf.custom_gradient`, even on one device), and the registry then keeps that trial's whole graph alive:
    about 3 MB a trial, which clear_session() does not free. Once the trial is over, nothing can ask for
    the gradient of its train step, so its entries can go.
    """
    from tensorflow.python.framework import ops

    registry = getattr(getattr(ops, "_gradient_registry", None), "_registry", None)
    before = set(registry) if isinstance(registry, dict) else None
    try:
        yield
    finally:
        if before is not None:
            for name in set(registry) - before:
                if str(name).startswith("CustomGradient-"):
                    registry.pop(name, None)


def serve_oracle(oracle, poll: float = 0.5) -> None:
    """Run the chief's oracle as Keras Tuner's gRPC service until every worker has been told to stop.

    Keras Tuner's own `start_server` checks for the end every 20 s; this checks every `poll` seconds.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise TuneError(f"The chief cannot listen on {address}: is the address this machine's and the port free? "
                        f"Set KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT accordingly.")
    server.start()
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll)
    finally:
        server.stop(grace=2).wait()


def distributed_role() -> str:
    """"single", "chief" or "worker", from Keras Tuner's environment variables (checked, with what to fix)."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [name for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(name)]
    if missing:
        raise TuneError(f"KERASTUNER_ORACLE_IP is set, so this is a distributed search, but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not. Set KERASTUNER_ORACLE_PORT and "
                        f"KERASTUNER_TUNER_ID (chief, worker0, worker1, ...), or unset KERASTUNER_ORACLE_IP.")
    if not os.environ["KERASTUNER_ORACLE_PORT"].isdigit():
        raise TuneError(f"Expected KERASTUNER_ORACLE_PORT to be a port number. "
                        f"Received: KERASTUNER_ORACLE_PORT={os.environ['KERASTUNER_ORACLE_PORT']}")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


# ------------------------------------------------------------------------------------------ reports




# ------------------------------------------------------------------------------------------ the command


def _prepare_out(out: Path, base: Recipe, overwrite: bool) -> bool:
    """Make `out` ready; returns True when it holds a search of the same recipe to resume."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} is a file, not a folder. Choose another --out.")
    if overwrite:
        rundir.prepare_output_dir(out, force=True)
    elif out.is_dir() and any(out.iterdir()):
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
        return True
    out.mkdir(parents=True, exist_ok=True)
    header = ("# Resolved recipe of this tltool search. Re-running the same `tltool tune` command with this --out\n"
              "# resumes the search; --max-trials may grow between runs.\n")
    rundir.atomic_write_text(out / rundir.RECIPE_FILE, header + base.to_yaml())
    return False


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
        verbose: 0 silent, 1 progress.
        log: where messages go.

    Returns:
        TuneResult: the output folder, the summary written to its summary.json, and the best recipe.

    Raises:
        SearchFailedError: when every trial failed (the reports are written first).
    """
    from tltool.models.backbones import check_image_size, get_backbone_spec, resolve_weights
    from tltool.engine.stages import load_split_data, require_training_data, resolve_recipe

    extra = [f"tune.{key}={value}" for key, value in
             (("algorithm", algorithm), ("max_trials", max_trials), ("objective", objective)) if value is not None]
    base = resolve_recipe(recipe, data=data, val_data=val_data, test_data=test_data, backbone=backbone,
                          weights=weights, image_size=image_size, batch_size=batch_size, seed=seed,
                          overrides=tuple(overrides) + tuple(extra))
    say = log if verbose else (lambda *a, **k: None)
    role = distributed_role()
    space = SearchSpace(base.tune.space or default_space(base))
    if not base.tune.space:
        from_dict({**base.to_dict(), "tune": {**base.to_dict()["tune"], "space": space.space}})  # validates it
    out = Path(out) if out else Path("runs") / f"{base.name}-tune"
    budget = max(2, base.frozen.epochs, base.fine_tune.epochs)  # Hyperband's max_epochs

    runner = None
    if role != "chief":  # the chief only hands out trials: it needs neither data nor weights
        spec = get_backbone_spec(base.backbone.name)
        size = base.data.image_size or spec.default_size
        check_image_size(spec, size)
        resolve_weights(spec, base.backbone.weights, base.backbone.fallback, classic=base.head.mode == "classic",
                        image_size=size)
        require_training_data(base)
    split = load_split_data(base) if role != "chief" else None  # the data is checked before --overwrite wipes
    resuming = False
    if role != "worker":
        resuming = _prepare_out(out, base, overwrite)
    if role != "chief":
        runner = TrialRunner(base, split, verbose=verbose, log=say)
        say(f"tltool tune: {base.tune.algorithm} search of {len(space.keys)} value(s) "
            f"({', '.join(space.keys)}), up to {base.tune.max_trials} trials; {spec.name} at {size}px, "
            f"{len(split.train.classes)} classes, {len(split.train)} training / {len(split.val)} validation images.")

    hypermodel = RecipeHyperModel(base, space, runner, budget if base.tune.algorithm == "hyperband" else None)
    oracle = make_oracle(base.tune.algorithm, base.tune.objective, base.tune.max_trials, base.seed, budget)
    with contextlib.redirect_stdout(io.StringIO()):  # Keras Tuner prints "Reloading Tuner from ..."
        tuner = RecipeTuner(oracle=oracle, hypermodel=hypermodel, directory=str(out), project_name=SEARCH_DIR,
                            overwrite=False, role=role, log=say)
    finished = 0 if role == "worker" else sum(t.status in _ENDED for t in tuner.oracle.trials.values())
    if runner is not None and runner.all_head_trials(space) and finished < base.tune.max_trials:
        say("Every trial changes only the head: computing the backbone's features once for all of them.")
        runner.features()
    if role != "worker":
        def after_end_trial(oracle, trial):
            summary = write_reports(out, oracle, base, space)
            if role == "chief":  # workers print their own trials; the chief shows every trial as it ends
                record = next(r for r in summary["trials"] if r["trial_id"] == trial.trial_id)
                outcome = (f"{oracle.objective.name} {record[oracle.objective.name]:.4f}"
                           if record["status"] == "completed" else f"FAILED: {record.get('error')}")
                say(f"Trial {int(record['trial_id']) + 1} [{record['worker']}] {outcome} "
                    f"({summary['trials_completed']} completed so far)")

        tuner.oracle.after_end_trial = after_end_trial
        tuner.oracle.verbose = 0  # Keras Tuner's own display would repeat (and clear) what tltool prints
    # Everything alive now (TensorFlow, Keras, the features) lives through the search: freezing it out of
    # the garbage collector's view makes the collection after each trial scan only that trial's objects
    # (milliseconds instead of ~0.3 s a trial).
    gc.collect()
    gc.freeze()
    try:
        return _run_search(tuner, out, base, space, role, resuming, say)
    finally:
        gc.unfreeze()


class _NoRetracingWarnings(logging.Filter):
    """A search builds a new model per trial, so TensorFlow's "triggered tf.function retracing" is expected."""

    def filter(self, record):
        return "retracing" not in record.getMessage()


def _run_search(tuner, out: Path, base: Recipe, space: SearchSpace, role: str, resuming: bool, say) -> TuneResult:
    from keras_tuner.src import config as kt_config

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
        address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
        say(f"Worker {tuner.tuner_id}: asking the chief at {address} for trials.")
        tuner.search()
        say(f"Worker {tuner.tuner_id}: ran {tuner.trials_run} trial(s); the chief has the results.")
        return TuneResult(out, {"worker": tuner.tuner_id, "trials_run": tuner.trials_run})
    if resuming:
        finished = sum(t.status in _ENDED for t in tuner.oracle.trials.values())
        say(f"Resuming the search in {out}: {finished} trial(s) already done.")
    if role == "chief":
        say(f"Chief: serving the search on {os.environ['KERASTUNER_ORACLE_IP']}:"
            f"{os.environ['KERASTUNER_ORACLE_PORT']}; start workers with the same command and "
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
    say(f"Best: trial {best['trial_id']}, {name} {best[name]:.4f}. Train it with: "
        f"tltool finetune {out / BEST_FILE} --out runs/{base.name}-best")
    from tltool.recipe import load_recipe

    return TuneResult(out, summary, load_recipe(out / BEST_FILE))
