"""`tltool tune`: search space, head trials on cached features, reports, resume, failures, CLI."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from click.testing import CliRunner

import tltool
from helpers import calibrated_backbone_weights, saved_model_accuracy, validation_paths
from tltool.cli import main
from tltool.engine.stages import build_model
from tltool.errors import RecipeError, SearchFailedError
from tltool.recipe import from_dict, load_recipe
from tltool.tuning.search import hyperband_budget, make_oracle

TINY = ["backbone.weights=none", "data.image_size=32", "data.batch_size=8", "frozen.epochs=2",
        "frozen.early_stopping=0", "fine_tune.epochs=0", "frozen.feature_views=0", "augment.flip=horizontal"]
HEAD_SPACE = {
    "head.dropout": {"choice": [0.0, 0.5]},
    "head.dense": {"choice": [0, 8]},
    "frozen.learning_rate": {"min": 1e-3, "max": 1e-2, "sampling": "log"},
}


def _recipe_file(tmp_path, space, **tune):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"tune": {"space": space, **tune}}))
    return path


def _run(recipe, data, out, lines=None, **kwargs):
    lines = [] if lines is None else lines
    return tltool.tune(recipe, data=data, out=out, overrides=TINY, verbose=1,
                       log=lambda message="", **_: lines.append(str(message)), **kwargs)


# ------------------------------------------------------------------------------------------ the space


@pytest.mark.parametrize("entry, message", [
    ({"choice": [0.1, 2.0]}, "`tune.space.head.dropout` to be between 0.0 and 0.95"),
    ({"min": 0.1}, "to give both `min` and `max`"),
    ({"min": 0.5, "max": 0.1}, "`tune.space.head.dropout.min` to be below `max`"),
    ({"min": 0.0, "max": 0.5, "sampling": "log"}, "log scale, so `min` must be above 0"),
    ({"min": 0.0, "max": 0.5, "smapling": "log"}, "Did you mean `sampling`?"),
    ({"boolean": True}, "needs a true/false field"),
    ({"min": 0.1, "max": 0.5, "step": 0.5, "sampling": "log"}, "`tune.space.head.dropout.step` is a factor"),
    (0.3, "to be one of {choice: [...]}"),
])
def test_space_entries_are_checked_against_the_field(entry, message):
    with pytest.raises(RecipeError, match="tune.space") as info:
        from_dict({"tune": {"space": {"head.dropout": entry}}})
    assert message in str(info.value)


def test_space_int_fields_and_untunable_keys_are_rejected():
    with pytest.raises(RecipeError, match=r"`tune.space.fine_tune.unfreeze.min` to be an integer"):
        from_dict({"tune": {"space": {"fine_tune.unfreeze": {"min": 1.5, "max": 3}}}})
    with pytest.raises(RecipeError, match="cannot be searched over"):
        from_dict({"tune": {"space": {"tune.max_trials": {"choice": [1, 2]}}}})
    with pytest.raises(RecipeError, match="`train.deterministic` cannot be searched over"):
        from_dict({"tune": {"space": {"train.deterministic": {"boolean": True}}}})
    with pytest.raises(RecipeError, match="layer sizes of at least 1"):
        from_dict({"tune": {"space": {"head.dense": {"choice": [-1]}}}})


def test_space_values_become_recipe_values():
    import keras_tuner as kt

    from tltool.tuning.space import SearchSpace, trial_epochs, trial_recipe

    space = SearchSpace({
        "head.dense": {"choice": [0, [16, 8]]},          # lists travel as JSON strings
        "fine_tune.unfreeze": {"min": 10, "max": 30, "step": 10},
        "head.dropout": {"min": 0.0, "max": 0.5, "step": 0.1},
        "frozen.cache_features": {"boolean": True},
        "data.image_size": {"choice": [None, 64]},
    })
    hp = kt.HyperParameters()
    space.declare(hp)
    assert isinstance(hp.values["fine_tune.unfreeze"], int) and isinstance(hp.values["head.dropout"], float)
    hp.values.update({"head.dense": json.dumps([16, 8]), "head.dropout": 0.1 + 0.1 + 0.1,
                      "data.image_size": "null", "tuner/epochs": 3})
    values = space.values(hp.values)
    assert values["head.dense"] == [16, 8] and values["head.dropout"] == 0.3 and values["data.image_size"] is None
    assert "tuner/epochs" not in values
    recipe = trial_recipe(from_dict({"frozen": {"epochs": 10}, "fine_tune": {"epochs": 4}}), values, budget=(2, 10))
    assert recipe.head.dense == [16, 8] and recipe.frozen.epochs == 2 and recipe.fine_tune.epochs == 1
    base = from_dict({"frozen": {"epochs": 10}, "fine_tune": {"epochs": 4}})
    for trial_values, budget in [(values, (2, 10)), ({"frozen.epochs": 30}, (1, 9)), ({}, None),
                                 ({"fine_tune.epochs": 0}, (9, 9))]:
        recipe = trial_recipe(base, trial_values, budget)  # the reports' epochs are the trial's own
        assert trial_epochs(base, trial_values, budget) == [recipe.frozen.epochs, recipe.fine_tune.epochs]
    assert SearchSpace({"head.dense": {"choice": [0, 32]}}).values({"head.dense": 0}) == {"head.dense": []}
    # What a key may take (the search computes the activations of every cut its unfreeze depths may ask for).
    assert space.possible("fine_tune.unfreeze") == [10, 20, 30] and space.possible("head.dense") == [0, [16, 8]]
    assert space.possible("frozen.cache_features") == [False, True]
    assert space.possible("head.dropout") == [] and space.possible("head.l2") == []  # a float range; not searched


def test_default_space_adds_stage_two_only_when_it_runs():
    from tltool.tuning.space import default_space

    assert "fine_tune.unfreeze" not in default_space(from_dict({"fine_tune": {"epochs": 0}}))
    space = default_space(from_dict({}))
    assert {"head.dropout", "head.dense", "frozen.learning_rate", "train.label_smoothing",
            "fine_tune.unfreeze", "fine_tune.learning_rate"} == set(space)
    from_dict({"tune": {"space": space}})  # valid by the recipe's own rules


# ------------------------------------------------------------------------------------------ searches


def test_head_search_reports_resumes_and_overwrites(tmp_path, image_folder):
    recipe = _recipe_file(tmp_path, HEAD_SPACE, algorithm="random")
    out = tmp_path / "search"
    lines = []
    result = _run(recipe, image_folder, out, lines, max_trials=3)

    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["trials_completed"] == 3 and len(summary["trials"]) == 3
    for trial in summary["trials"]:
        assert trial["status"] == "completed" and trial["worker"] == "tuner0" and trial["seconds"] > 0
        assert trial["cached_features"] is True  # head-only space: no trial ran the backbone
        assert set(trial["hyperparameters"]) == set(HEAD_SPACE)
        # An accuracy over the 6 validation images (2 of the 8 of each class): a whole number of them.
        assert trial["val_accuracy"] * 6 == pytest.approx(round(trial["val_accuracy"] * 6), abs=1e-6)
    best = summary["best"]
    assert best["val_accuracy"] == max(t["val_accuracy"] for t in summary["trials"])
    assert sum("Computing features of" in line for line in lines) == 2  # train + val, once for all trials
    assert any(line.startswith("Trial 3/3 [tuner0] val_accuracy") for line in lines)
    assert "Best: trial" in lines[-2]
    # One numbering wherever a user reads it: the terminal, trials.csv, best.yaml and summary.json.
    assert f"Best: trial {best['trial']}," in lines[-2] and best["trial"] == int(best["trial_id"]) + 1
    # The best of several scores on the same images flatters the winner: the search says so.
    assert lines[-1].startswith("As the best of 3 trials scored on the same validation images, that score "
                                "flatters it")
    assert lines[-1].endswith("(tltool evaluate RUN --data TEST_FOLDER).")  # the command as the CLI takes it
    assert (out / "best.yaml").read_text().startswith(f"# Best recipe of a tltool search: trial {best['trial']}, ")
    assert "of 3 completed trial(s) of 3 planned" in (out / "best.yaml").read_text().splitlines()[0]

    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["trial_id"] for r in rows] == [t["trial_id"] for t in summary["trials"]]
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    best_recipe = load_recipe(out / "best.yaml")
    assert best_recipe == result.best_recipe
    for key, value in best["hyperparameters"].items():
        section, name = key.split(".")
        assert getattr(getattr(best_recipe, section), name) == value
    assert best_recipe.data.train == str(image_folder.resolve())

    # Same command, more trials: the three finished ones are kept as they are, one new one runs.
    lines = []
    resumed = _run(recipe, image_folder, out, lines, max_trials=4).summary
    assert any("3 trial(s) already done" in line for line in lines)
    assert resumed["trials_completed"] == 4 and resumed["trials"][:3] == summary["trials"]
    # Nothing left to do: no trial, no feature extraction.
    lines = []
    _run(recipe, image_folder, out, lines, max_trials=4)
    assert not any(line.startswith("Trial ") or "Computing features" in line for line in lines)

    fresh = _run(recipe, image_folder, out, max_trials=1, overwrite=True).summary
    assert len(fresh["trials"]) == 1


TWO_CUTS = {"fine_tune.unfreeze": {"choice": [1, 3]}, "head.dense": {"choice": [8]}}


def _fresh_runtime(recipe, cluster=None, keep_session=False):
    """start_runtime as a search of one trial would start it: a fresh Keras session."""
    from tltool.engine.setup import start_runtime

    return start_runtime(recipe, cluster)


def _searches_with_a_shared_and_with_own_backbones(tmp_path, image_folder, monkeypatch, overrides: list,
                                                   space=TWO_CUTS):
    """The same stage-2 grid search twice: cut trials sharing one backbone, then each building its own.
    Returns ([(values, val_loss)] and the backbones built, for each; the shared search's log lines)."""
    from tltool.engine import stages
    from tltool.models import transfer
    from tltool.tuning import search as search_module
    from tltool.tuning.search import TrialRunner

    built = []
    build = transfer._build_backbone
    monkeypatch.setattr(transfer, "_build_backbone", lambda *a, **k: built.append(1) or build(*a, **k))
    # Stage 2 always kept, at a learning rate that moves the backbone: a trial that started from the weights
    # an earlier trial left would score differently.
    monkeypatch.setattr(stages, "_keep_stage2_only_if_better",
                        lambda ctx, tm, after_stage1, stage1_kept, stage2_kept: stage2_kept)
    trials = 1
    for entry in space.values():
        trials *= len(entry["choice"])
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    overrides = TINY + [f"backbone.weights={weights}", "head.layer=top", "head.grid=1", "fine_tune.epochs=1",
                        "fine_tune.early_stopping=0", "fine_tune.learning_rate=0.01"] + overrides

    def search(out, lines):
        monkeypatch.setenv("TLTOOL_CACHE_DIR", str(out / "cache"))
        built.clear()
        summary = tltool.tune(_recipe_file(tmp_path, space, algorithm="grid"), data=image_folder, out=out,
                              verbose=1, max_trials=trials, overrides=overrides,
                              log=lambda message="", **_: lines.append(str(message))).summary
        assert summary["trials_completed"] == trials
        return [(t["hyperparameters"], t["val_loss"]) for t in summary["trials"]], len(built), summary

    lines = []
    shared, shared_builds, summary = search(tmp_path / "shared", lines)
    # The same search with every trial building its own backbone, in a fresh Keras session.
    monkeypatch.setattr(TrialRunner, "_cut_trial_model", lambda self, setup, runtime: build_model(setup, runtime))
    monkeypatch.setattr(search_module, "start_runtime", _fresh_runtime)
    own, own_builds, _ = search(tmp_path / "own", [])
    return (shared, shared_builds), (own, own_builds), summary, lines


def test_a_trial_is_scored_with_the_weights_it_kept(tmp_path, image_folder, monkeypatch):
    """A trial's val_accuracy and val_loss are read from the validation pass of the epoch whose weights it
    kept: they must be the trained model's own on the validation rows, whether stage 2's best epoch stayed
    or the trial went back to stage 1's model (the large learning rate spoils stage 2)."""
    from tltool.evaluation.metrics import accuracy, log_loss
    from tltool.tuning.search import TrialRunner

    checked = []
    train = TrialRunner.train

    def checking(self, trial):
        scores = train(self, trial)
        probs, labels = TrialRunner._val_probabilities(trial), trial.features.val_y
        kept = trial.ctx.kept_epoch
        checked.append((scores, log_loss(labels, probs), accuracy(labels, probs), kept["stage"]))
        from_fit.append("val_log_loss" in kept)
        return scores

    from_fit = []

    monkeypatch.setattr(TrialRunner, "train", checking)
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path / "cache"))
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    space = {"fine_tune.learning_rate": {"choice": [1e-4, 3.0]}, "train.label_smoothing": {"choice": [0.0, 0.2]}}
    overrides = TINY + [f"backbone.weights={weights}", "head.layer=top", "head.grid=1", "frozen.epochs=4",
                        "frozen.early_stopping=1", "fine_tune.epochs=2", "fine_tune.early_stopping=1",
                        "fine_tune.unfreeze=1"]
    summary = tltool.tune(_recipe_file(tmp_path, space, algorithm="grid"), data=image_folder, out=tmp_path / "s",
                          verbose=0, max_trials=4, overrides=overrides).summary
    assert summary["trials_completed"] == 4 and all(t["cached_activations"] for t in summary["trials"])
    for scores, loss, acc, _ in checked:
        assert scores["val_loss"] == pytest.approx(loss, rel=1e-4)
        assert scores["val_accuracy"] == pytest.approx(acc, abs=1e-6)
    assert {stage for *_, stage in checked} == {1, 2}
    assert all(from_fit)  # scored from the fit's own validation pass (kept models log the log loss)


def test_a_kept_model_s_log_loss_metric_is_tltool_s_clipped_log_loss():
    """On a softmax output, Keras's categorical cross-entropy is computed from the logits, unclipped: one
    confidently wrong image would make a trial's val_loss unbounded. The kept models' metric is log_loss's."""
    import keras
    import numpy as np

    from tltool.evaluation.metrics import log_loss
    from tltool.tuning.reuse import LOG_LOSS, log_loss_metric

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", kernel_initializer="identity")(inputs))
    model.compile(loss="categorical_crossentropy", metrics=[log_loss_metric()])
    x = np.array([[0.0, 1.0], [0.0, 200.0], [2.0, 0.0]], np.float32)  # the second: p(class 0) underflows to 0
    labels = np.array([1, 0, 0])
    scores = model.evaluate(x, keras.utils.to_categorical(labels, 2), batch_size=2, return_dict=True, verbose=0)
    assert scores["loss"] > 60  # Keras's own, from the logits: the second image alone adds 200 / 3
    assert scores[LOG_LOSS] == pytest.approx(log_loss(labels, model.predict(x, verbose=0)), rel=1e-6)


def test_stage2_trials_share_one_activation_cache_and_one_backbone(tmp_path, image_folder, monkeypatch):
    (shared, shared_builds), (own, own_builds), summary, lines = _searches_with_a_shared_and_with_own_backbones(
        tmp_path, image_folder, monkeypatch, [])
    assert all(t["cached_activations"] is True for t in summary["trials"])
    assert any("Stage-2 trials train on activations cached at" in line and "top 3 blocks" in line
               for line in lines)
    # One cache entry: the activations at the deepest cut (3 blocks), from which stage 1's features and
    # the 1-block trial's activations were computed; no image went through the backbone a second time.
    cache = tmp_path / "shared" / "cache"
    assert len([entry for entry in cache.iterdir() if entry.is_dir()]) == 1
    assert sum("Computing features of" in line for line in lines) == 2  # train + val, once for all trials

    # Every trial building its own backbone: the same scores.
    assert shared_builds == 1 and own_builds == 3  # the search's features (and the cut trials' backbone)
    assert [values for values, _ in shared] == [values for values, _ in own]
    assert [loss for _, loss in shared] == pytest.approx([loss for _, loss in own], rel=1e-5)


def test_the_first_shallower_trial_computes_the_activations_of_every_cut_of_the_space(tmp_path, image_folder,
                                                                                      monkeypatch):
    """One pass from the deepest cut down to the shallowest serves every shallower trial; within the
    activation budget only (room for one more cut: each shallower trial makes a pass of its own)."""
    from tltool.tuning import search as search_module

    passes = []  # (rows, deep width, widths at the cuts) of each pass: the training rows, then the validation's
    real = search_module.ActivationsAt

    class Counting(real):
        def __call__(self, activations, batch_size=256):
            passes.append((activations.size // activations.shape[-1], activations.shape[-1], self.widths))
            return super().__call__(activations, batch_size)

    monkeypatch.setattr(search_module, "ActivationsAt", Counting)
    space = {"fine_tune.unfreeze": {"choice": [3, 2, 1]}}
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    overrides = TINY + [f"backbone.weights={weights}", "head.layer=top", "head.grid=1", "fine_tune.epochs=1"]

    def search(out, budget_mb=None):
        monkeypatch.setenv("TLTOOL_CACHE_DIR", str(out / "cache"))
        passes.clear()
        extra = [f"fine_tune.activation_budget_mb={budget_mb}"] if budget_mb else []
        summary = tltool.tune(_recipe_file(tmp_path, space, algorithm="grid"), data=image_folder, out=out,
                              verbose=0, max_trials=3, overrides=overrides + extra).summary
        assert summary["trials_completed"] == 3 and all(t["cached_activations"] for t in summary["trials"])
        return list(passes), [t["val_loss"] for t in summary["trials"]]

    together, losses = search(tmp_path / "together")
    # The 2-block trial's pass (over the training rows, then the validation rows) served the 1-block trial.
    assert len(together) == 2 and all(len(widths) == 2 for _, _, widths in together)
    rows, deep_width, widths = together[0][0] + together[1][0], together[0][1], together[0][2]
    # Room for the deepest cut's activations and either shallower cut's, not both.
    budget = 2 * rows * (deep_width + max(widths) + min(widths) / 2) / 1e6
    one_at_a_time, alone = search(tmp_path / "alone", budget)
    assert [len(cut_widths) for _, _, cut_widths in one_at_a_time] == [1, 1, 1, 1]  # two trials, two passes each
    assert alone == pytest.approx(losses, rel=1e-5)


@pytest.fixture
def compiled(monkeypatch) -> list:
    """The names of the Keras models compiled while the test runs, in order."""
    import keras

    names = []
    compile_ = keras.Model.compile
    monkeypatch.setattr(keras.Model, "compile", lambda self, *a, **k: names.append(self.name) or compile_(
        self, *a, **k))
    return names


def test_stage2_trials_of_one_shape_train_one_model_traced_once(tmp_path, image_folder, monkeypatch, compiled):
    """Trials that differ only in dropout and label smoothing train one kept model, whose train
    steps Keras traced once, and score as trials with their own models do."""
    # (The learning rate, a variable of Keras's own, is set as the next test shows.)
    space = {"head.dropout": {"choice": [0.0, 0.5]}, "train.label_smoothing": {"choice": [0.0, 0.2]},
             "head.dense": {"choice": [8]}}
    (kept, _), (own, _), summary, _ = _searches_with_a_shared_and_with_own_backbones(
        tmp_path, image_folder, monkeypatch, ["fine_tune.unfreeze=2"], space)
    # 4 trials x 2 stages: the first trial compiled both of its models, the 3 others none; then every trial
    # with its own model compiles both.
    assert compiled.count("head") == 1 + 4 and compiled.count("above_cut_and_head") == 1 + 4
    assert [values for values, _ in kept] == [values for values, _ in own]
    assert [loss for _, loss in kept] == pytest.approx([loss for _, loss in own], rel=1e-5)
    assert len({round(loss, 6) for _, loss in kept}) == 4  # every value changed what was trained


def test_head_trials_of_one_shape_train_one_kept_head(tmp_path, image_folder, monkeypatch, compiled):
    """Head trials (stage 1 alone, on the search's features) keep their heads as cut trials keep their models:
    one compile for trials differing in dropout and learning rate, the scores of trials with their own
    heads. They also keep the Keras session the search started: clearing it (or setting TensorFlow's seed)
    empties TensorFlow's caches of the kept models' traced steps, whose first calls then cost 0.2 to 1 s
    each; they score as trials each in a fresh session do."""
    import keras

    from tltool.models.transfer import TransferModel, build_head
    from tltool.tuning import search as search_module
    from tltool.tuning.reuse import KeptModels

    cleared = []
    clear_session = keras.backend.clear_session
    monkeypatch.setattr(keras.backend, "clear_session", lambda *a, **k: cleared.append(1) or clear_session(*a, **k))

    space = {"head.dropout": {"choice": [0.0, 0.5]}, "frozen.learning_rate": {"choice": [0.01, 0.003]},
             "head.dense": {"choice": [8]}}
    recipe = _recipe_file(tmp_path, space, algorithm="grid")
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    overrides = TINY + [f"backbone.weights={weights}", "head.layer=top", "head.grid=1"]

    def search(out):
        monkeypatch.setenv("TLTOOL_CACHE_DIR", str(out / "cache"))
        cleared.clear()
        summary = tltool.tune(recipe, data=image_folder, out=out, overrides=overrides, max_trials=4,
                              verbose=0).summary
        assert summary["trials_completed"] == 4 and all(t["cached_features"] for t in summary["trials"])
        return [(t["hyperparameters"], t["val_loss"]) for t in summary["trials"]], len(cleared)

    kept, kept_sessions = search(tmp_path / "kept")
    assert compiled.count("head") == 1
    def own_head(self, width, setup, runtime):
        head = build_head(width, len(setup.classes), setup.recipe.head, seed=setup.recipe.seed)
        return TransferModel(head, None, None, head)

    # The same search with every trial building its own head, in a fresh Keras session.
    monkeypatch.setattr(KeptModels, "head_for", own_head)
    monkeypatch.setattr(search_module, "start_runtime", _fresh_runtime)
    own, own_sessions = search(tmp_path / "own")
    assert compiled.count("head") == 1 + 4
    assert own_sessions == kept_sessions + 4  # one for each trial
    assert [values for values, _ in kept] == [values for values, _ in own]
    assert [loss for _, loss in kept] == pytest.approx([loss for _, loss in own], rel=1e-5)
    assert len({round(loss, 6) for _, loss in kept}) == 4  # every value changed what was trained


def test_stage2_trials_that_stream_images_share_one_backbone(tmp_path, image_folder, monkeypatch):
    (shared, shared_builds), (own, own_builds), summary, lines = _searches_with_a_shared_and_with_own_backbones(
        # Deterministic ops: streamed training is otherwise not repeatable to 1e-5 on CPU (measured: 4e-4
        # apart between two searches that each built their own backbones).
        tmp_path, image_folder, monkeypatch, ["fine_tune.activation_budget_mb=0.001", "train.deterministic=true"])
    assert not any(t["cached_activations"] for t in summary["trials"])
    assert any("Stage 2 will stream images" in line for line in lines)
    # The search's features, then the first cut trial's backbone, kept for the second; the same scores as
    # when every trial builds its own.
    assert shared_builds == 2 and own_builds == 3
    assert [values for values, _ in shared] == [values for values, _ in own]
    assert [loss for _, loss in shared] == pytest.approx([loss for _, loss in own], rel=1e-5)


def test_a_search_measuring_the_layer_passes_the_plain_images_through_the_backbone_once(tmp_path, image_folder):
    """The layer measurement's pass keeps the activations at the search's deepest cut (not the base recipe's
    shallower one), and the search's features take them: the plain training images are computed once."""
    space = {"fine_tune.unfreeze": {"choice": [1, 3]}}
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    overrides = TINY + [f"backbone.weights={weights}", "head.layer=auto", "head.grid=null",
                        "fine_tune.epochs=1", "fine_tune.unfreeze=1", f"train.cache_dir={tmp_path / 'cache'}"]
    lines = []
    summary = tltool.tune(_recipe_file(tmp_path, space, algorithm="grid"), data=image_folder,
                          out=tmp_path / "t", verbose=1, max_trials=1, overrides=overrides,
                          log=lambda message="", **_: lines.append(str(message))).summary
    assert summary["trials_completed"] == 1 and summary["trials"][0]["cached_activations"] is True
    assert any("top 3 blocks" in line for line in lines)
    computed = [line for line in lines if line.startswith("Computing features of")]
    assert len(computed) == 2, computed  # the probe's pass over the training images, then the validation
    assert "and the activations stage 2 would train on" in computed[0]


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path, image_folder):
    space = {"frozen.epochs": {"choice": [0, 2]},           # 0: the trial's recipe trains nothing
             "frozen.learning_rate": {"choice": [1e-3, 1e38]},  # 1e38: the loss diverges
             "frozen.optimizer": {"choice": ["sgd"]}}
    recipe = _recipe_file(tmp_path, space, algorithm="grid")
    summary = _run(recipe, image_folder, tmp_path / "out", max_trials=4).summary

    by_values = {(t["hyperparameters"]["frozen.epochs"], t["hyperparameters"]["frozen.learning_rate"]): t
                 for t in summary["trials"]}
    assert len(by_values) == 4 and summary["trials_completed"] == 1 and summary["trials_failed"] == 3
    assert by_values[(2, 1e-3)]["status"] == "completed"
    assert "nothing would train" in by_values[(0, 1e-3)]["error"]
    assert "Training diverged" in by_values[(2, 1e38)]["error"] and by_values[(2, 1e38)]["val_accuracy"] is None
    assert summary["best"]["hyperparameters"]["frozen.learning_rate"] == 1e-3


def test_a_search_where_every_trial_fails_says_so(tmp_path, image_folder):
    recipe = _recipe_file(tmp_path, {"frozen.epochs": {"choice": [0]}}, algorithm="grid")
    with pytest.raises(SearchFailedError, match="All 1 trial\\(s\\) failed; the last error: .*nothing would train"):
        _run(recipe, image_folder, tmp_path / "out", max_trials=2)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["best"] is None


# ------------------------------------------------------------------------------------------ CLI


def test_cli_tune_then_finetune_the_best_recipe(tmp_path, image_folder):
    recipe = _recipe_file(tmp_path, {"head.dropout": {"choice": [0.1, 0.4]}})
    out = tmp_path / "search"
    sets = [arg for item in TINY for arg in ("--set", item)]
    runner = CliRunner()
    result = runner.invoke(main, ["tune", str(recipe), "--data", str(image_folder), *sets, "--algorithm", "random",
                                  "--max-trials", "2", "--objective", "val_loss", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Best: trial" in result.output and f"tltool finetune {out / 'best.yaml'}" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == {"name": "val_loss", "direction": "min"}
    assert summary["best"]["val_loss"] == min(t["val_loss"] for t in summary["trials"])

    # best.yaml is a complete recipe: finetune takes it as it is.
    result = runner.invoke(main, ["finetune", str(out / "best.yaml"), "--out", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 0, result.output
    accuracy, _ = saved_model_accuracy(tmp_path / "run", validation_paths(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val_accuracy"] == pytest.approx(accuracy,
                                                                                                       abs=1e-6)


def test_cli_tune_errors(tmp_path, image_folder, monkeypatch):
    runner = CliRunner()
    bad = _recipe_file(tmp_path, {"head.dropout": {"min": 0.5, "max": 0.1}})
    result = runner.invoke(main, ["tune", str(bad), "--data", str(image_folder)])
    assert result.exit_code == 2 and "`tune.space.head.dropout.min` to be below `max`" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(main, ["tune", "--data", str(image_folder), "--algorithm", "annealing"])
    assert result.exit_code == 2 and "'annealing' is not one of" in result.output

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    sets = [arg for item in TINY for arg in ("--set", item)]
    result = runner.invoke(main, ["tune", "--data", str(image_folder), *sets, "--out", str(busy)])
    assert result.exit_code == 2 and "holds no tltool search" in result.output

    # A folder holding a search of another recipe is not silently mixed with this one.
    other = tmp_path / "other"
    (other / "search").mkdir(parents=True)
    (other / "recipe.yaml").write_text(yaml.safe_dump(from_dict({"head": {"dropout": 0.4}}).to_dict()))
    result = runner.invoke(main, ["tune", "--data", str(image_folder), *sets, "--out", str(other)])
    assert result.exit_code == 2 and "holds a search of a different recipe" in result.output
    assert "--overwrite" in result.output

    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    result = runner.invoke(main, ["tune", "--data", str(image_folder), *sets])
    assert result.exit_code == 2 and "KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID are not" in result.output



def test_ctrl_c_in_a_search_says_how_to_continue(monkeypatch, image_folder):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tltool, "tune", interrupted)
    result = CliRunner().invoke(main, ["tune", "--data", str(image_folder)])
    assert result.exit_code == 130
    assert "Interrupted. Finished trials are kept; run the same command again" in result.stderr


# ------------------------------------------------------------------------------------------ Hyperband


@pytest.mark.parametrize("max_trials, budget", [(1, 1), (3, 1), (4, 3), (12, 3), (13, 9), (20, 9), (40, 27)])
def test_hyperband_budget_lets_the_first_bracket_finish_within_the_trials(max_trials, budget):
    assert hyperband_budget(max_trials) == budget
    # Keras Tuner's own count of the first bracket's trials (its rounds: factor**k, ..., 3, 1 trials).
    oracle = make_oracle("hyperband", "val_accuracy", max_trials, 0, budget)
    first = oracle._get_num_brackets() - 1
    assert sum(oracle._get_size(first, r) for r in range(first + 1)) <= max_trials
    assert oracle._get_epochs(first, first) == budget  # its last round trains the full epochs


def test_hyperband_search_trains_its_best_early_trial_with_the_full_epochs(tmp_path, image_folder):
    overrides = [o for o in TINY if not o.startswith("frozen.epochs")] + ["frozen.epochs=6"]
    lines = []
    result = tltool.tune(_recipe_file(tmp_path, HEAD_SPACE, algorithm="hyperband"), data=image_folder,
                         out=tmp_path / "search", overrides=overrides, max_trials=4, verbose=1,
                         log=lambda message="", **_: lines.append(str(message)))
    trials = result.summary["trials"]
    # A budget of 3: three trials at 2 of the 6 epochs, then the best of them again at all 6.
    assert [t["epochs"] for t in trials] == [[2, 0], [2, 0], [2, 0], [6, 0]]
    assert result.summary["best"]["trial_id"] == trials[3]["trial_id"]  # the only one trained in full
    top = max(t["val_accuracy"] for t in trials[:3])
    assert trials[3]["hyperparameters"] in [t["hyperparameters"] for t in trials[:3] if t["val_accuracy"] == top]
    assert any(line.startswith("Trial 4/4") and ", 6+0 epochs)" in line for line in lines)
    assert "trained longest, 6+0 epochs" in lines[-2]
    assert next(csv.DictReader((tmp_path / "search" / "trials.csv").open()))["epochs"] == "2+0"


def test_the_best_of_a_hyperband_search_is_one_of_its_longest_trials():
    from tltool.tuning.reports import _trained_longest

    early = {"trial_id": "0", "val_accuracy": 0.9, "budget_epochs": 3}  # a lucky score after a third of the epochs
    full = {"trial_id": "1", "val_accuracy": 0.8, "budget_epochs": 9}
    assert _trained_longest([early, full]) == [full]
    plain = [{"trial_id": "0", "val_accuracy": 0.9}, {"trial_id": "1", "val_accuracy": 0.8}]  # not Hyperband
    assert _trained_longest(plain) == plain


def test_a_resumed_hyperband_search_keeps_the_budget_it_started_with(tmp_path, image_folder):
    overrides = [o for o in TINY if not o.startswith("frozen.epochs")] + ["frozen.epochs=6"]
    recipe, out = _recipe_file(tmp_path, HEAD_SPACE, algorithm="hyperband"), tmp_path / "search"
    lines = []
    for max_trials in (3, 4):  # a budget of 1 (every trial in full), then --max-trials 4, whose budget is 3
        result = tltool.tune(recipe, data=image_folder, out=out, overrides=overrides, max_trials=max_trials,
                             verbose=1, log=lambda message="", **_: lines.append(str(message)))
    assert [t["epochs"] for t in result.summary["trials"]] == [[6, 0]] * 4
    assert any(line.startswith("Trial 4/4") and ", 6+0 epochs)" in line for line in lines)  # as trained


def test_accuracy_ties_go_to_the_lower_validation_loss():
    from tltool.tuning.reports import _merit

    records = [{"val_accuracy": 0.94, "val_loss": 0.20}, {"val_accuracy": 0.94, "val_loss": 0.15},
               {"val_accuracy": 0.93, "val_loss": 0.10}]
    assert max(records, key=_merit("val_accuracy", "max")) is records[1]
    assert max(records, key=_merit("val_loss", "min")) is records[2]


def test_each_hyperband_trial_carries_the_budget_of_the_oracle_that_made_it(tmp_path):
    """A worker of a distributed search sizes its own budget from its own --max-trials: the budget the trial
    carries from the chief's oracle decides its epochs, in training and in the reports."""
    from tltool.tuning.reports import trial_records
    from tltool.tuning.search import RecipeHyperModel
    from tltool.tuning.space import SearchSpace

    space = SearchSpace(HEAD_SPACE)
    base = from_dict({"frozen": {"epochs": 6}, "fine_tune": {"epochs": 3}})
    oracle = make_oracle("hyperband", "val_accuracy", 4, 0, hyperband_budget(4))  # the chief's: a budget of 3
    oracle._set_project_dir(str(tmp_path), "search")
    hp = oracle.get_space()
    space.declare(hp)
    oracle.update_space(hp)
    trial = oracle.create_trial("worker0")
    worker = RecipeHyperModel(base, space, None, hyperband_budget(40))  # started with --max-trials 40: 27
    recipe = worker.recipe(trial.hyperparameters)
    assert [recipe.frozen.epochs, recipe.fine_tune.epochs] == [2, 1]  # a third of 6+3 (of 27: 1+1)

    oracle.update_trial(trial.trial_id, {"val_accuracy": 0.5, "val_loss": 1.0})
    trial.status = "COMPLETED"
    oracle.end_trial(trial)
    assert trial_records(oracle, space, base)[0]["epochs"] == [2, 1]


def test_a_fall_back_to_random_weights_is_said_once_per_search(tmp_path, image_folder, monkeypatch):
    """Offline, with `backbone.fallback: none`, the search says once that it trains from random weights,
    not once more for every trial."""
    import urllib.error
    import warnings

    import keras

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    overrides = [o for o in TINY if not o.startswith("backbone.weights")] + ["backbone.weights=imagenet",
                                                                            "backbone.fallback=none"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = tltool.tune(_recipe_file(tmp_path, HEAD_SPACE, algorithm="random"), data=image_folder,
                             out=tmp_path / "search", overrides=overrides, max_trials=3, verbose=0)
    assert result.summary["trials_completed"] == 3
    assert len([w for w in caught if "training from RANDOM initialisation" in str(w.message)]) == 1


def test_a_kept_model_s_optimizer_starts_each_trial_as_a_fresh_one():
    """Back to its state before its first step, not to zeros: a mixed-precision loss scale starts at 2 ** 15
    (zeroed, every gradient would be scaled to 0). The learning rate is the new trial's."""
    import keras
    import numpy as np
    import tensorflow as tf

    from tltool.engine.fitting import fit_stage
    from tltool.models.transfer import TransferModel
    from tltool.tuning.reuse import KeptModels, _Kept

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(4)(inputs)
        model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", dtype="float32")(hidden))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    kept = KeptModels()
    kept._kept["shape"] = _Kept(TransferModel(model, None, None, model), tf.distribute.get_strategy())
    data = tf.data.Dataset.from_tensor_slices((np.random.default_rng(0).random((40, 8), np.float32),
                                               tf.one_hot(np.arange(40) % 3, 3))).batch(16)

    def state():  # [(variable name, its first value)], by position: Keras numbers the paths (adam_1/...)
        return [(v.path.rsplit("/", 1)[-1], float(np.ravel(v.numpy())[0])) for v in model.optimizer.variables]

    kept.compile(model, "adam", 1e-3, 0.0, False)
    fresh = state()
    assert ("dynamic_scale", 2 ** 15) in fresh and ("learning_rate", pytest.approx(1e-3)) in fresh
    fit_stage(model, data, data, 2, [], verbose=0)
    assert state() != fresh
    kept.compile(model, "adam", 2e-3, 0.1, False)
    restored = state()
    assert [name for name, _ in restored] == [name for name, _ in fresh]
    assert [value for _, value in restored] == pytest.approx(
        [2e-3 if name == "learning_rate" and value == pytest.approx(1e-3) else value for name, value in fresh])
