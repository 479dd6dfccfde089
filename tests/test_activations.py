"""Stage 2 on cached activations: the same training as streaming the same images through the whole backbone."""

import keras
import numpy as np

from helpers import calibrated_backbone_weights, tiny_values
from tltool.engine.activations import ActivationsAt, split_at_cut
from tltool.engine.features import augmentation_key, extractor_key
from tltool.engine.setup import prepare_run, resolve_recipe, start_runtime
from tltool.engine.stages import TrainingContext, activation_cut, build_model, cut_features, run_stage2
from tltool.models.transfer import fine_tune_cut
from tltool.recipe import load_recipe


def _weights_after_cut(tm, cut: str) -> list[np.ndarray]:
    names = [layer.name for layer in tm.backbone.layers]
    after = tm.backbone.layers[names.index(cut) + 1:]
    return [np.asarray(w) for layer in after for w in layer.weights] + [np.asarray(w) for w in tm.head.weights]


def test_stage2_on_cached_activations_equals_streaming_the_same_images(image_folder, tmp_path):
    # A backbone with calibrated BatchNorm statistics: a random one's activations in inference mode are
    # ~1e-10, below float16. No augmentation: the images streamed every epoch are exactly the one view the cache holds. SGD, not
    # Adam: Adam's step is about lr * sign(gradient) for tiny gradients, which turns the float16 rounding
    # of the cached activations into full-size differences.
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    recipe = resolve_recipe(None, data=image_folder, overrides=tiny_values(32) + [
        "augment.flip=none", "augment.rotation=0", "head.dropout=0", "fine_tune.epochs=1", "fine_tune.unfreeze=2",
        "fine_tune.early_stopping=0", "fine_tune.optimizer=sgd", "fine_tune.learning_rate=0.001",
        "frozen.epochs=1", f"backbone.weights={weights}"])
    setup = prepare_run(recipe)
    runtime = start_runtime(recipe)
    ctx = TrainingContext(setup, runtime, verbose=0)
    cached, streamed = build_model(setup, runtime), build_model(setup, runtime)
    streamed.model.set_weights(cached.model.get_weights())
    cut = activation_cut(ctx, cached)
    assert cut is not None
    before = _weights_after_cut(cached, cut.cut)

    run_stage2(ctx, cached, cut, cut_features(ctx, cut))
    run_stage2(ctx, streamed)

    after_cached = _weights_after_cut(cached, cut.cut)
    after_streamed = _weights_after_cut(streamed, cut.cut)
    change = max(np.abs(a - b).max() for a, b in zip(before, after_cached))
    gap = max(np.abs(a - b).max() for a, b in zip(after_cached, after_streamed))
    trained_cached = [bool(np.any(a != w0)) for w0, a in zip(before, after_cached)]
    trained_streamed = [bool(np.any(b != w0)) for w0, b in zip(before, after_streamed)]
    assert change > 1e-3  # it trained
    assert trained_cached == trained_streamed  # the same weights train (BatchNorm stays frozen in both)
    assert gap < 0.02 * change  # the same training, up to the float16 rounding of the cached activations
    keras.backend.clear_session()


def test_activation_budget_sends_stage2_back_to_images(image_folder):
    messages = []
    recipe = resolve_recipe(None, data=image_folder, overrides=tiny_values(32) + ["fine_tune.activation_budget_mb=0.001"])
    setup = prepare_run(recipe)
    runtime = start_runtime(recipe)
    ctx = TrainingContext(setup, runtime, verbose=1, log=messages.append)
    assert activation_cut(ctx, build_model(setup, runtime)) is None
    assert any("Stage 2 will stream images: the activations at" in m and "activation_budget_mb" in m
               for m in messages)
    keras.backend.clear_session()


def test_cache_key_covers_cut_views_and_augmentation():
    key = dict(backbone="mobilenet_v2", weights_fingerprint="file:abc", image_size=96, preprocessing="tf",
               head_mode="pooled", pooling="avg")
    assert len({extractor_key(**key), extractor_key(**key, cut="block_14_add"),
                extractor_key(**key, cut="block_15_add"), extractor_key(**key, reads="block_12_add:1"),
                extractor_key(**key, reads="block_12_add:2")}) == 5
    base = load_recipe(None)
    changed = [load_recipe(None, overrides=[o]) for o in ("augment.rotation=0.2", "augment.flip=none", "seed=7")]
    assert len({augmentation_key(r) for r in [base, *changed]}) == 4


def test_activations_at_a_deeper_cut_give_those_at_shallower_ones(image_folder, tmp_path):
    # tune caches one set of activations at the deepest cut its space may use; trials unfreezing fewer
    # blocks run the blocks in between on them, for all their cuts in one pass. That must equal extracting at
    # each trial's own cut.
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    recipe = resolve_recipe(None, data=image_folder, overrides=tiny_values(32) + [f"backbone.weights={weights}"])
    setup = prepare_run(recipe)
    tm = build_model(setup, start_runtime(recipe))
    deep_cut, _, _ = fine_tune_cut(tm.backbone, setup.spec, 6)
    cuts = [fine_tune_cut(tm.backbone, setup.spec, blocks)[0] for blocks in (1, 4)]
    pixels = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    deep = np.asarray(split_at_cut(tm, deep_cut).extractor(pixels)).astype(np.float16)

    together = ActivationsAt(tm.backbone, deep_cut, cuts)(deep.reshape(2, 3, -1))

    for cut, bridged in zip(cuts, together):
        direct = np.asarray(split_at_cut(tm, cut).extractor(pixels))
        assert bridged.shape == (2, 3, direct.shape[-1])
        scale = np.abs(direct).max()
        assert scale > 1e-3
        assert np.abs(bridged.reshape(6, -1).astype(np.float32) - direct).max() < 0.01 * scale  # float16 rounding
        alone, = ActivationsAt(tm.backbone, deep_cut, [cut])(deep.reshape(2, 3, -1))
        np.testing.assert_array_equal(alone, bridged)  # the same rows as a pass for that cut alone
    assert together[0].shape[-1] != together[1].shape[-1]  # two cuts of different widths, told apart
    keras.backend.clear_session()


def test_stage2_on_cached_activations_trains_with_the_head_penalty(image_folder):
    recipe = resolve_recipe(None, data=image_folder, overrides=tiny_values(32) + ["head.l2=0.5"])
    setup = prepare_run(recipe)
    runtime = start_runtime(recipe)
    ctx = TrainingContext(setup, runtime, verbose=0)
    tm = build_model(setup, runtime)
    cut = activation_cut(ctx, tm)
    run_stage2(ctx, tm, cut, cut_features(ctx, cut))
    kernel = tm.head.get_layer("predictions").kernel
    assert len(cut.trainable.losses) == 1
    penalty = 0.5 * np.sum(np.asarray(kernel) ** 2)
    np.testing.assert_allclose(float(cut.trainable.losses[0]), penalty, rtol=1e-5)


def test_pooled_rows_computes_each_distinct_row_once(monkeypatch):
    # The measured decisions pool the plain and mirrored rows, then every view (those two again), and
    # stage 1 all of them once more: each row goes through the top blocks once.
    import tltool.engine.activations as activations

    inputs = keras.Input((12,))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="relu")(inputs))
    computed = []
    real = activations.pooled_features

    def counting(features_model, rows, batch_size=256):
        computed.append(len(rows))
        return real(features_model, rows, batch_size)

    monkeypatch.setattr(activations, "pooled_features", counting)
    rng = np.random.default_rng(0)
    views = rng.normal(size=(5, 4, 12)).astype(np.float16)  # 5 images, 4 views each
    pooled = activations.PooledRows(model)

    first_two = pooled(views[:, :2])
    every_view = pooled(views)
    again = pooled(views)

    assert computed == [10, 10]  # the first two views, then only the two views not seen yet
    expected = real(model, views.reshape(20, 12)).reshape(5, 4, 3)
    np.testing.assert_array_equal(every_view, expected)
    np.testing.assert_array_equal(again, expected)
    np.testing.assert_array_equal(first_two, expected[:, :2])
    assert pooled(views[:0]).shape == (0, 4, 3)
