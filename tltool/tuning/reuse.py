"""Trials of the same shape train one kept model, so Keras traces their train steps once, not per trial.

Each Keras `fit` of a new model traces its train and validation steps: about 1.5 s of a 5 s stage-2 trial
of MobileNetV2 on a CPU, a third of a default 20-trial search. Trials that differ only in values the
graph reads from variables can share one model and its traced steps:

- the dropout rate: the kept heads' dropout layers are `RateDropout`, whose rate is a variable;
- the label smoothing: their loss is `SmoothedCrossentropy`, whose smoothing is a variable;
- the learning rates: Keras's optimizers hold theirs in a variable already.

What changes the graph is in the key: the trial's cut (the unfreeze depth), its head's layers (dense units,
normalisation, l2), the classes and the optimizers. Each trial still starts from the state a model built
for it would have: the head's variables are copied from a freshly built head (its seeded initial weights,
its dropout rates and random-seed states), the backbone's top blocks are reset to their pretrained weights
(by the caller), and the optimizer's variables go back to their values before its first step. A kept
trial therefore trains to the same weights as a trial with its own model (tests/test_tune.py). Head
trials (stage 1 alone, on the search's features) keep their heads the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from dataclasses import dataclass, field

import keras

from tltool.engine.activations import split_at_cut
from tltool.engine.fitting import compile_model, make_optimizer
from tltool.engine.stages import TrainingContext
from tltool.evaluation.metrics import PROBABILITY_FLOOR
from tltool.models.transfer import TransferModel, build_head, with_new_head


#: The name of the kept models' metric of the log loss without label smoothing (`val_log_loss` in a fit's logs).
LOG_LOSS = "log_loss"


def clipped_log_loss(y_true, y_pred):
    """Each image's -log(probability of its true class), the probability clipped to [PROBABILITY_FLOOR, 1] as
    in `tltool.evaluation.metrics.log_loss`. Not Keras's categorical cross-entropy: on a softmax output Keras
    computes that from the logits, unclipped (one confidently wrong image can add 1000s)."""
    ops = keras.ops
    true_probability = ops.sum(ops.cast(y_true, y_pred.dtype) * y_pred, axis=-1)
    return -ops.log(ops.clip(true_probability, PROBABILITY_FLOOR, 1.0))


def log_loss_metric():
    return keras.metrics.MeanMetricWrapper(clipped_log_loss, name=LOG_LOSS)


class RateDropout(keras.layers.Layer):
    """`keras.layers.Dropout` with its rate in a variable: trials set it without a new trace.

    The same computation as Keras's Dropout (TensorFlow's `stateless_dropout`): with the same seed it drops
    the same units. At rate 0 it returns its input unchanged, as a head without dropout does.
    """

    def __init__(self, rate: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.rate = self.add_weight(shape=(), initializer=keras.initializers.Constant(rate), trainable=False,
                                    name="rate")

    def call(self, inputs, training=False):
        if not training:
            return inputs
        ops = keras.ops
        rate = ops.cast(self.rate, inputs.dtype)
        noise = keras.random.uniform(ops.shape(inputs), dtype=inputs.dtype, seed=self.seed_generator)
        return inputs * (1 / (1 - rate)) * ops.cast(noise >= rate, inputs.dtype)


class SmoothedCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy with its label smoothing in a variable (Keras's takes a number, fixed when
    the train step is traced): y_true * (1 - s) + s / classes, as Keras computes it."""

    def __init__(self, smoothing: float = 0.0):
        super().__init__(name="categorical_crossentropy")
        self.smoothing = keras.Variable(smoothing, trainable=False, dtype="float32", name="label_smoothing")

    def call(self, y_true, y_pred):
        ops = keras.ops
        smoothing = ops.cast(self.smoothing, y_pred.dtype)
        classes = ops.cast(ops.shape(y_true)[-1], y_pred.dtype)
        y_true = ops.cast(y_true, y_pred.dtype) * (1.0 - smoothing) + smoothing / classes
        return keras.losses.categorical_crossentropy(y_true, y_pred)


@dataclass
class _Kept:
    """A kept model, its splits at a cut (each `trainable` keeps its traced steps) and, for each of its
    models compiled so far, how (optimizer, jit), the loss whose smoothing trials set and its optimizer's
    state before any training."""

    tm: TransferModel
    strategy: object                              # the distribution strategy its variables belong to
    cuts: dict = field(default_factory=dict)      # cut -> CutModels
    compiled: dict = field(default_factory=dict)  # id(keras model) -> ((optimizer, jit), loss, optimizer state)

    def owns(self, model) -> bool:
        return (model is self.tm.head or model is self.tm.model
                or any(model is cut.trainable for cut in self.cuts.values()))


class KeptModels:
    """The trials' models by shape (see the module's docstring): cut trials' and head trials'. At most `size`
    are kept, the least recently used dropped with its traced steps, so that a space of many shapes keeps
    memory bounded."""

    def __init__(self, size: int = 8):
        self.size = size
        self._kept: OrderedDict[str, _Kept] = OrderedDict()

    @staticmethod
    def key(setup) -> str:
        """What makes two trials' graphs differ: everything but the values read from variables."""
        recipe = setup.recipe
        head = dataclasses.asdict(recipe.head)
        head.pop("dropout")
        return json.dumps([head, recipe.fine_tune.unfreeze, len(setup.classes), recipe.frozen.optimizer,
                           recipe.fine_tune.optimizer], sort_keys=True, default=str)

    def model_for(self, kept_tm: TransferModel, setup, runtime) -> TransferModel:
        """The model of a cut trial of `setup`'s recipe on the shared backbone (back at its pretrained weights):
        the kept one of its shape with a fresh head's state, else a new one, kept."""
        recipe = setup.recipe
        return self._take("cut " + self.key(setup), runtime, kept_tm.backbone.output_shape[-1], setup,
                          lambda: with_new_head(kept_tm, len(setup.classes), recipe.head, seed=recipe.seed,
                                                dropout=RateDropout))

    def head_for(self, width: int, setup, runtime) -> TransferModel:
        """The model of a head trial (its head alone, on the search's features of `width`): as `model_for`."""
        def new_head():
            head = build_head(width, len(setup.classes), setup.recipe.head, seed=setup.recipe.seed,
                              dropout=RateDropout)
            return TransferModel(head, None, None, head)

        return self._take("head " + self.key(setup), runtime, width, setup, new_head)

    def _take(self, key: str, runtime, width: int, setup, build) -> TransferModel:
        """The kept model at `key` with a freshly built head's state, else `build()`'s, kept. Variables belong
        to the strategy that made them: under another one the model is built anew."""
        recipe = setup.recipe
        with runtime.strategy.scope():
            kept = self._kept.get(key)
            if kept is None or kept.strategy is not runtime.strategy:
                self._kept[key] = _Kept(build(), runtime.strategy)
                self._kept.move_to_end(key)
                while len(self._kept) > self.size:
                    self._kept.popitem(last=False)
                return self._kept[key].tm
            self._kept.move_to_end(key)
            fresh = build_head(width, len(setup.classes), recipe.head, seed=recipe.seed, dropout=RateDropout)
            for variable, value in zip(kept.tm.head.variables, fresh.variables):
                variable.assign(value)
        return kept.tm

    def _kept_with(self, model) -> _Kept | None:
        return next((kept for kept in self._kept.values() if kept.owns(model)), None)

    def cut_models(self, tm, cut: str):
        """`split_at_cut(tm, cut)`, made once for a kept model."""
        kept = next((kept for kept in self._kept.values() if kept.tm is tm), None)
        if kept is None:
            return split_at_cut(tm, cut)
        if cut not in kept.cuts:
            kept.cuts[cut] = split_at_cut(tm, cut)
        return kept.cuts[cut]

    def compile(self, model, optimizer: str, learning_rate: float, label_smoothing: float, jit_compile) -> None:
        """Compile `model` for a stage. A kept model compiled the same way before keeps its traced steps: its
        optimizer starts afresh (its state before the first step, then the stage's learning rate) and the
        smoothing is set."""
        kept = self._kept_with(model)
        how = (optimizer, jit_compile)
        before = kept.compiled.get(id(model)) if kept is not None else None
        if before is not None and before[0] == how:
            _, loss, fresh_state = before
            for variable, value in zip(model.optimizer.variables, fresh_state):
                variable.assign(value)
            model.optimizer.learning_rate = learning_rate
            loss.smoothing.assign(label_smoothing)
            return
        if kept is None:  # a trial's own model: compiled as finetune compiles
            compile_model(model, optimizer, learning_rate, label_smoothing, jit_compile)
            return
        loss = SmoothedCrossentropy(label_smoothing)
        # The log loss without smoothing as a metric too: a trial's score is its kept epoch's validation pass
        # (see TrialRunner.train), and its loss must not depend on the trial's smoothing.
        model.compile(optimizer=make_optimizer(optimizer, learning_rate), loss=loss,
                      metrics=["accuracy", log_loss_metric()],
                      jit_compile=jit_compile)
        # Built now (as `fit` would build it, for the variables that train), so that its fresh state can be
        # kept: zeros for most optimizers, not all (a mixed-precision loss scale starts at 2 ** 15).
        model.optimizer.build(model.trainable_variables)
        kept.compiled[id(model)] = (how, loss, [variable.numpy() for variable in model.optimizer.variables])


@dataclass
class ReusingContext(TrainingContext):
    """A trial's TrainingContext whose kept models keep their traced steps: compiling and splitting at the cut
    go through `kept` (any other model is compiled and split as `finetune` does)."""

    kept: KeptModels | None = None

    def compile(self, model, stage_cfg) -> None:
        self.kept.compile(model, stage_cfg.optimizer, stage_cfg.learning_rate, self.recipe.train.label_smoothing,
                          self.runtime.jit_compile)

    def cut_models(self, tm, cut: str):
        return self.kept.cut_models(tm, cut)
