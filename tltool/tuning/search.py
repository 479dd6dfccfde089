"""The search machinery of `tune`: a Keras Tuner HyperModel whose models are recipes, its oracle and tuner.

Each trial is the base recipe with the trial's values set at their dotted keys. `RecipeHyperModel.build`
validates that recipe and builds its model; `RecipeHyperModel.fit` runs the engine's own `train_stages`,
so a trial trains exactly as `finetune` does. Trials that change only the head, the frozen stage's
settings or the loss (and have no stage 2) train on backbone features computed once for the whole search,
so a head trial costs a few head epochs, not a pass of every image through the backbone. Any other trial
runs in full.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import math
import time
import warnings
from dataclasses import dataclass

import keras
import keras_tuner as kt
from keras_tuner.src.engine.oracle import synchronized
import numpy as np

from tltool.data.pipelines import DecodedImages
from tltool.engine.activations import ActivationsAt, activation_megabytes, model_outputs
from tltool.engine.fitting import compile_model
from tltool.engine.setup import prepare_run, start_runtime
from tltool.engine.stages import (TrainingContext, activation_cut, build_model, cut_features, stage1_features,
                                  train_stages)
from tltool.errors import TltoolError
from tltool.evaluation.metrics import accuracy, log_loss
from tltool.files import atomic_write_text
from tltool.models.backbones import FALLBACK_WARNING
from tltool.models.transfer import TransferModel, fine_tune_cut, layers_above
from tltool.recipe import Recipe
from tltool.tuning.distributed import guard_worker, serve_oracle
from tltool.tuning.reuse import LOG_LOSS, KeptModels, ReusingContext
from tltool.tuning.reports import fmt_epochs, fmt_value, last_line, trial_number
from tltool.tuning.space import BUDGET_KEY, HEAD_KEYS, SearchSpace, stripped_recipe, trial_budget, trial_recipe


def _durable_save_json(path, obj) -> str:
    """Keras Tuner's `utils.save_json`, written durably and atomically (see files.py).

    Keras Tuner writes `oracle.json` and every `trial.json` in place: a crash while writing left a truncated
    file, and every later resume of the search raised on it until `--overwrite` threw the search away. All
    its JSON goes through this one function (Stateful.save, Tuner's trial files); tests/test_dependency_apis.py
    fails if that stops being so.
    """
    if "://" in str(path):  # a remote file system (gs://...): Keras Tuner's own writer
        return _keras_tuner_save_json(path, obj)
    text = json.dumps(obj)
    atomic_write_text(path, text)
    return text


_keras_tuner_save_json = kt.src.utils.save_json
kt.src.utils.save_json = _durable_save_json


@dataclass
class _Trial:
    """One trial's model and what trains it: `features` is the search's precomputed ones (with activations
    at the trial's cut for a stage-2 trial), None for a trial that runs in full."""

    tm: object
    ctx: object
    features: object = None


class _KeptBackbone:
    """The cut trials' model (the one the search's activations were computed with, else the first cut
    trial's), the pretrained weights of its backbone's layers above `cut` (the deepest cut: no trial trains
    below it; None: the whole backbone) and the strategy it was built under."""

    def __init__(self, tm: TransferModel, strategy, cut: str | None):
        self.tm, self.strategy = tm, strategy
        self.variables = [v for layer in layers_above(tm.backbone, cut) for v in layer.weights]
        self.weights = [v.numpy() for v in self.variables]
        called = [op for op in (tm.backbone, tm.preprocess) if op is not None]
        self._calls = [(op, len(op._inbound_nodes), len(op._outbound_nodes)) for op in called]

    def reset(self) -> None:
        """Back to the pretrained weights, and forget the calls later trials made: Keras records each call of
        a layer in its node lists (tests/test_dependency_apis.py), which would keep every finished trial's
        head and traced train steps alive (measured: about 7 MB a trial)."""
        for variable, value in zip(self.variables, self.weights):
            variable.assign(value)
        for op, inbound, outbound in self._calls:
            del op._inbound_nodes[inbound:]
            del op._outbound_nodes[outbound:]


class TrialRunner:
    """Builds and trains one trial's model: the data, the weights and the shared features it needs.

    Two caches serve the whole search. Head trials (no stage 2) train on the base recipe's stage-1 features.
    Stage-2 trials train on activations cached once at the deepest cut the space may ask for (the most
    blocks of `fine_tune.unfreeze`): a trial unfreezing fewer blocks runs the blocks in between once, not a
    pass of every image through the backbone. Those trials also share one built backbone, reset to its
    pretrained weights for each (see `_cut_trial_model`).
    """

    def __init__(self, base_setup, space: SearchSpace | None = None, verbose: int = 1, log=print):
        self.base = base_setup.recipe
        self.verbose = verbose
        self.log = log
        self._splits = {self._split_key(self.base): base_setup.split}
        self._features = None
        most = space.largest("fine_tune.unfreeze") if space is not None else None
        self.deepest_blocks = max(self.base.fine_tune.unfreeze, int(most or 0))
        #: the unfreeze depths trials may take, whose activations are computed together (see features_at_cut)
        depths = space.possible("fine_tune.unfreeze") if space is not None else []
        self.unfreeze_depths = sorted({self.base.fine_tune.unfreeze, *(int(d) for d in depths)})
        #: rows the layer measurement's pass computed (feature_layer.py), and the images it decoded, handed to
        #: the first extraction
        self.probe_rows = {}
        self.decoded = DecodedImages()
        #: the backbone network the layer measurement built, for the base model's extraction and then the kept
        #: backbone of cut trials (see `build_model`), instead of building it twice more
        self.probe_network = None
        self._deep = None        # StageFeatures at the deepest cut; False when stage 2 trials stream images
        self._at_cut = {}        # cut -> StageFeatures with the activations at that cut
        self._kept = None        # _KeptBackbone: the backbone every cut trial trains on
        #: trials' models by shape, which keep their traced train steps (see reuse.py)
        self.kept_models = KeptModels()

    @staticmethod
    def _split_key(recipe: Recipe) -> str:
        data = dict(recipe.to_dict()["data"])
        data.pop("image_size"), data.pop("batch_size")
        return json.dumps([data, recipe.seed], sort_keys=True)

    def setup_for(self, recipe: Recipe, weights: bool = True):
        """The trial's run set up, reusing the split of any earlier trial with the same data settings."""
        key = self._split_key(recipe)
        with warnings.catch_warnings():
            # A fall back to random weights was said by the search's own setup (`base_setup`), once.
            warnings.filterwarnings("ignore", message=FALLBACK_WARNING, category=UserWarning)
            setup = prepare_run(recipe, weights=weights, split=self._splits.get(key))
        self._splits[key] = setup.split
        return setup

    def _shares_features(self, recipe: Recipe) -> bool:
        return (recipe.frozen.epochs > 0 and recipe.frozen.cache_features
                and stripped_recipe(recipe) == stripped_recipe(self.base))

    def is_head_trial(self, recipe: Recipe) -> bool:
        return recipe.fine_tune.epochs == 0 and self._shares_features(recipe)

    def is_cut_trial(self, recipe: Recipe) -> bool:
        """Whether the trial's stage 2 can train on the search's activations at the deepest cut."""
        return (recipe.fine_tune.epochs > 0 and recipe.fine_tune.activation_budget_mb > 0
                and 0 < recipe.fine_tune.unfreeze <= self.deepest_blocks
                and recipe.fine_tune.activation_budget_mb == self.base.fine_tune.activation_budget_mb
                and self._shares_features(recipe))

    def all_head_trials(self, space: SearchSpace) -> bool:
        return set(space.keys) <= HEAD_KEYS and self.is_head_trial(self.base)

    def features(self):
        """The base recipe's stage-1 features, computed (or read from the feature cache) once per search."""
        if self._features is None:
            self._features = self._with_base_model(lambda ctx, tm: stage1_features(ctx, tm.feature_extractor))
        return self._features

    def deep_features(self):
        """The base recipe's activations at the deepest cut the search may use, and stage 1's features from
        them, computed (or read from the feature cache) once per search; None when stage 2 must stream
        images (the reason is in the log)."""
        if self._deep is None:
            def extract(ctx, tm):
                cut = activation_cut(ctx, tm, blocks=self.deepest_blocks)
                if cut is None:
                    return False
                self.log(f"Stage-2 trials train on activations cached at {cut.cut} (the top "
                         f"{self.deepest_blocks} blocks, the most the search unfreezes).")
                found = cut_features(ctx, cut)
                # The backbone every cut trial trains on: built once for the whole search.
                self._kept = _KeptBackbone(tm, ctx.runtime.strategy, cut.cut)
                return found

            self._deep = self._with_base_model(extract)
            if self._deep:
                self._at_cut[self._deep.cut] = self._deep
                if self._features is None:
                    self._features = dataclasses.replace(self._deep, train_acts=None, val_acts=None, cut="")
        return self._deep or None

    def _with_base_model(self, compute):
        setup = self.setup_for(self.base)
        runtime = start_runtime(self.base)
        tm = build_model(setup, runtime, self.probe_network)
        ctx = TrainingContext(setup, runtime, self.verbose, self.log)
        ctx.probe_rows, self.probe_rows = self.probe_rows, {}
        ctx.decoded, self.decoded = self.decoded, DecodedImages()
        with runtime.strategy.scope():
            found = compute(ctx, tm)
        del tm
        gc.collect()
        return found

    def features_at_cut(self, tm, setup):
        """The search's features with the activations at the trial's cut, from those at the deepest cut. The
        first trial that needs a shallower cut computes those of every cut the space may ask for (within the
        activation budget): one pass down to the shallowest instead of one pass per cut."""
        deep = self.deep_features()
        if deep is None:
            return None
        recipe = setup.recipe
        cut, _, _ = fine_tune_cut(tm.backbone, setup.spec, recipe.fine_tune.unfreeze)
        if cut is None:
            return None
        if cut not in self._at_cut:
            budget = recipe.fine_tune.activation_budget_mb - self._kept_megabytes()
            cuts = self._cuts_to_compute(tm, setup, deep, cut, budget)
            at_cuts = ActivationsAt(tm.backbone, deep.cut, cuts)
            for at, train_acts, val_acts in zip(cuts, at_cuts(deep.train_acts), at_cuts(deep.val_acts)):
                found = dataclasses.replace(deep, cut=at, train_acts=train_acts, val_acts=val_acts)
                if _megabytes(found) > budget:
                    return found  # used by this trial only: memory stays within the budget
                self._at_cut[at] = found
        return self._at_cut[cut]

    def _cuts_to_compute(self, tm, setup, deep, cut: str, budget_mb: float) -> list[str]:
        """`cut` and, when they fit `budget_mb` with it, the other cuts the space may ask for, not computed yet."""
        others = {fine_tune_cut(tm.backbone, setup.spec, depth)[0] for depth in self.unfreeze_depths}
        others -= {cut, deep.cut, None, *self._at_cut}
        cuts = [cut] + sorted(others)
        images, views = deep.train_acts.shape[0], deep.train_acts.shape[1] - 1
        megabytes = [activation_megabytes(int(np.prod(tm.backbone.get_layer(at).output.shape[1:])), images, views,
                                          len(deep.val_acts)) for at in cuts]
        return cuts if sum(megabytes) <= budget_mb else [cut]

    def _kept_megabytes(self) -> float:
        return sum(_megabytes(f) for f in self._at_cut.values())

    def build(self, recipe: Recipe) -> _Trial:
        if self.is_head_trial(recipe):
            setup = self.setup_for(recipe, weights=False)
            features = self.features()
            runtime = start_runtime(recipe, keep_session=True)
            tm = self.kept_models.head_for(features.width, setup, runtime)
            return _Trial(tm, self._quiet(setup, runtime), features)
        setup = self.setup_for(recipe)
        if not self.is_cut_trial(recipe):  # a model of its own: nothing traced to keep
            runtime = start_runtime(recipe)
            return _Trial(build_model(setup, runtime), self._quiet(setup, runtime))
        runtime = start_runtime(recipe, keep_session=True)
        tm = self._cut_trial_model(setup, runtime)
        return _Trial(tm, self._quiet(setup, runtime), self.features_at_cut(tm, setup))

    def _cut_trial_model(self, setup, runtime) -> TransferModel:
        """A cut trial's model: the kept backbone (see `_KeptBackbone`), back at its pretrained weights, under a
        fresh head. Cut trials share the base recipe's backbone, and building it and loading its weights cost
        more than a short trial's training (about 1.7 s of 5 for MobileNetV2); and trials of the same shape
        train one model, whose train steps Keras traced once (see reuse.py). Another strategy builds anew:
        variables belong to the strategy that made them."""
        kept = self._kept
        if kept is None or kept.strategy is not runtime.strategy:  # e.g. stage 2 streams: no activations
            tm = build_model(setup, runtime, self.probe_network)
            self.probe_network = None
            cut, _, _ = fine_tune_cut(tm.backbone, setup.spec, self.deepest_blocks)
            self._kept = _KeptBackbone(tm, runtime.strategy, cut)
            return tm
        kept.reset()
        return self.kept_models.model_for(kept.tm, setup, runtime)

    def _quiet(self, setup, runtime) -> TrainingContext:
        return ReusingContext(setup, runtime, verbose=0, log=lambda *a, **k: None, kept=self.kept_models)

    def train(self, trial: _Trial) -> dict:
        """`finetune`'s two stages on the trial's model, then its validation loss and accuracy."""
        watch = _NanWatch()
        train_stages(trial.ctx, trial.tm, features=trial.features, extra_callbacks=[watch])
        if watch.epoch is not None:
            raise kt.errors.FailedTrialError(f"The loss became NaN in epoch {watch.epoch + 1}: the learning rate "
                                             f"is probably too high.")
        kept = trial.ctx.kept_epoch or {}
        if trial.features is not None and f"val_{LOG_LOSS}" in kept:
            # The kept epoch's own validation pass: the model holds that epoch's weights, and scoring the
            # validation rows again cost 3.8 s of an 80 s default search.
            val_loss, val_acc = kept[f"val_{LOG_LOSS}"], kept["val_accuracy"]
        elif trial.features is not None:
            probs = self._val_probabilities(trial)
            val_loss, val_acc = log_loss(trial.features.val_y, probs), accuracy(trial.features.val_y, probs)
        else:
            compile_model(trial.tm.model, "adam", 1e-3, 0.0)
            val_loss, val_acc = trial.tm.model.evaluate(trial.ctx.images(trial.ctx.split.val, training=False),
                                                        verbose=0)
        if not math.isfinite(val_loss):
            raise kt.errors.FailedTrialError("The validation loss is NaN: the learning rate is probably too high.")
        cached_activations = trial.features is not None and trial.features.train_acts is not None
        return {"val_accuracy": float(val_acc), "val_loss": float(val_loss),
                "cached_features": float(trial.features is not None),
                "cached_activations": float(cached_activations)}

    @staticmethod
    def _val_probabilities(trial: _Trial, batch_size: int = 256) -> np.ndarray:
        """The trained model's probabilities for the validation images, from the cached rows the trial used:
        the same as the whole model on the images (the part below them is frozen), without that pass."""
        features = trial.features
        if features.train_acts is None:
            model, rows = trial.tm.head, features.val_x
        else:
            model, rows = trial.ctx.cut_models(trial.tm, features.cut).trainable, features.val_acts
        return model_outputs(model, rows, batch_size)


def _megabytes(features) -> float:
    return (features.train_acts.nbytes + features.val_acts.nbytes) / 1e6


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
        try:
            return trial_recipe(self.base, self.space.values(hp.values), trial_budget(hp.values, self.budget_epochs))
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
    """Oracle mixin: which tuner ran each trial and for how long, saved with the oracle's state; and a worker
    with no trial left to start waits while other workers' trials are out (`_others_may_hand_back`).

    Lives in the oracle because in a distributed search only the chief's oracle sees every trial.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trial_log: dict[str, dict] = {}
        self.after_end_trial = None

    @synchronized  # with the chief's thread that requeues a lost worker's trial
    def create_trial(self, tuner_id):
        if self._others_may_hand_back(tuner_id):
            # All trials are handed out, but another worker's may come back (the chief requeues the trial of
            # a worker it loses): this one waits for it instead of leaving (see guard_worker for the pause).
            return kt.engine.trial.Trial(self.get_space(), status="IDLE")
        trial = super().create_trial(tuner_id)
        if trial.status == "RUNNING":
            entry = self.trial_log.get(trial.trial_id)
            if entry is None or "seconds" in entry:  # new, or a crashed trial sent for another run
                self.trial_log[trial.trial_id] = {"worker": tuner_id, "start": time.time()}
        return trial

    def _others_may_hand_back(self, tuner_id) -> bool:
        return (bool(self.max_trials) and len(self.trials) >= self.max_trials and not self._retry_queue
                and tuner_id not in self.ongoing_trials and bool(self.ongoing_trials))

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


class _BudgetInTrials:
    """HyperbandOracle mixin: every trial it makes carries the search's budget (see space.trial_budget), so
    that the worker training it and the reports scale its epochs by the one budget of this oracle."""

    def populate_space(self, trial_id):
        found = super().populate_space(trial_id)
        if found.get("status") == "RUNNING":
            found["values"][BUDGET_KEY] = self.max_epochs
        return found


_ORACLES = {"random": "RandomSearchOracle", "bayesian": "BayesianOptimizationOracle", "grid": "GridSearchOracle",
            "hyperband": "HyperbandOracle"}


class _ResumableGrid:
    """GridSearchOracle mixin: its walk through the grid survives a reload.

    Keras Tuner's grid oracle keeps the order of the combinations tried (`_ordered_ids`) and the trials
    whose next combination is due (`_populate_next`) in memory only, not in oracle.json: a search resumed
    after a crash raised KeyError on the first trial it finished. Both are rebuilt here from the trials.
    """

    def reload(self):
        super().reload()
        from keras_tuner.src.tuners.gridsearch import LinkedList

        ids = [i for i in self.start_order if i in self.trials]
        ordered = sorted(ids, key=functools.cmp_to_key(
            lambda a, b: self._compare(self.trials[a].hyperparameters.values, self.trials[b].hyperparameters.values)))
        self._ordered_ids = LinkedList()
        for trial_id in ordered:
            self._ordered_ids.insert(trial_id)
        # Every trial's next combination is looked at again; those already tried are skipped.
        self._populate_next = [i for i in ids if i not in self._retry_queue]


#: No limit, where Keras Tuner wants a number: Hyperband's passes over its brackets (max_trials ends the
#: search), failed trials in a row.
UNLIMITED = 10 ** 9
#: Hyperband's reduction factor: each round keeps a third of its trials and trains them 3 times longer.
HYPERBAND_FACTOR = 3


def hyperband_budget(max_trials: int, factor: int = HYPERBAND_FACTOR) -> int:
    """Hyperband's `max_epochs` for a search of `max_trials`, in budget units: a trial given `b` of them trains
    b / budget of each stage's epochs (see `trial_recipe`).

    The budget is the largest power of `factor` whose first bracket fits in `max_trials`, so that the search
    trains its best early trials with the full epochs. A budget of factor**k opens with a bracket of
    factor**k trials at 1/factor**k of the epochs, keeps the best third of them for 3 times the epochs, and so
    on down to one trial at the full epochs: (factor**(k+1) - 1) / (factor - 1) trials (20 trials: a budget of
    9, a first bracket of 9 + 3 + 1 = 13). A budget sized from the epochs instead (30 epochs: a first bracket
    of 52 trials) left every trial of a 20-trial search at 2 of 30 epochs, promoting none.
    """
    budget = 1
    while (budget * factor ** 2 - 1) // (factor - 1) <= max_trials:  # the next power's first bracket fits
        budget *= factor
    return budget


def make_oracle(algorithm: str, objective: str, max_trials: int, seed: int, budget_epochs: int):
    """The Keras Tuner oracle of `algorithm`, recording workers and times, never stopping on failed trials.
    `budget_epochs` is Hyperband's `max_epochs` (see `hyperband_budget`)."""
    base_cls = getattr(kt.oracles, _ORACLES[algorithm])
    mixins = (_TrialLog, *{"grid": (_ResumableGrid,), "hyperband": (_BudgetInTrials,)}.get(algorithm, ()))
    cls = type(f"Tltool{base_cls.__name__}", (*mixins, base_cls), {})
    direction = "min" if objective.endswith("loss") else "max"
    # A failed trial is recorded and the search goes on; Keras Tuner would stop after 3 in a row.
    common = {"objective": kt.Objective(objective, direction), "seed": seed,
              "max_consecutive_failed_trials": UNLIMITED}
    if algorithm == "hyperband":
        # Brackets follow one another until max_trials: one pass over them may be shorter (a budget of 1 is
        # a bracket of 1 trial), and Keras Tuner would end the search after it.
        oracle = cls(max_epochs=budget_epochs, factor=HYPERBAND_FACTOR, hyperband_iterations=UNLIMITED, **common)
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
        if role == "worker":  # Keras Tuner made self.oracle a client of the chief's oracle just now
            guard_worker(self.oracle, self.tuner_id)

    def _populate_initial_space(self):
        # The space has no conditional parts: declaring it is enough, and it needs no data (the chief has none).
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def run_trial(self, trial, *args, **kwargs):
        # No per-epoch checkpoints: best.yaml, not a saved model, is what a search hands on.
        hp = trial.hyperparameters
        with _forget_trial_gradients():
            # Not Keras Tuner's own `_try_build`: its keras.backend.clear_session() would empty TensorFlow's
            # caches of the kept models' traced steps (see start_runtime's `keep_session`).
            model = self.hypermodel.build(hp)
            self._results = self.hypermodel.fit(hp, model)
        return self._results

    def search(self, *args, **kwargs):
        if self.role == "chief":
            self.save()
            serve_oracle(self.oracle, log=self.say)
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
            how = ("on cached activations" if self._results.get("cached_activations")
                   else "on cached features" if self._results.get("cached_features") else "in full")
            if "tuner/epochs" in trial.hyperparameters.values:  # Hyperband: say how long this round trains
                recipe = self.hypermodel.recipe(trial.hyperparameters)
                how += f", {fmt_epochs([recipe.frozen.epochs, recipe.fine_tune.epochs])} epochs"
            outcome = f"{name} {self._results[name]:.4f} ({how})"
        else:
            outcome = f"FAILED: {last_line(trial.message)}"
        total = self.oracle.max_trials
        self.say(f"Trial {trial_number(trial.trial_id)}{f'/{total}' if total else ''} [{self.tuner_id}] {outcome} in "
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
