"""The cached-feature frozen stage: same model, cache hits, partial invalidation."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import tltool
from helpers import calibrated_backbone_weights, make_image_folder, tiny_values
from tltool.data.folders import SkipLog
from tltool.engine.features import FeatureCache, cached_features, file_key


def test_head_on_cached_features_equals_the_full_model(tmp_path, image_folder):
    """The head trained on cached features goes into the image-level model unchanged: same predictions."""
    from tltool.data.images import load_image

    # Calibrated random weights: features that carry the images' colours (an uncalibrated random
    # MobileNetV2 gives features of about 1e-13, on which every model is constant).
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    result = tltool.finetune(data=image_folder, out=tmp_path / "run", verbose=0,
                             overrides=tiny_values(32) + ["fine_tune.epochs=0", "frozen.epochs=20",
                                                          "frozen.learning_rate=0.01", "frozen.early_stopping=0",
                                                          f"backbone.weights={weights}"])
    model = result.model
    extractor = next(layer for layer in model.get_layer("feature_extractor").layers
                     if layer.name.startswith("mobilenetv2"))
    assert extractor.trainable is False
    # The float16 features stage 1 trained on, read back from the run's own cache entry.
    entries = [p for p in Path(os.environ["TLTOOL_CACHE_DIR"]).iterdir() if p.is_dir()]
    assert len(entries) == 1
    cache = FeatureCache(entries[0], touch=False)
    paths = sorted(str(p) for p in image_folder.rglob("*.*"))  # all 24 images, 8 of each of the 3 classes
    assert {Path(p).parent.name for p in paths} == {"blue", "green", "red"}
    assert all(file_key(p) in cache for p in paths)
    feats = cache.get([file_key(p) for p in paths]).astype("float32")
    assert feats.shape == (24, 1280)
    # Non-trivial features: far from zero, and they vary from image to image.
    spread = feats.std(axis=0)
    assert spread.mean() > 0.1 and (spread > 1e-2).mean() > 0.9, spread.mean()

    pixels = np.stack([load_image(p, 32) for p in paths]).astype("float32")
    full = model.predict(pixels, verbose=0)["probabilities"]
    on_features = result.model_parts.head.predict(feats, verbose=0)  # the head that stage 1 trained
    np.testing.assert_allclose(full, on_features, atol=5e-4)  # float16 storage of the features
    # A model whose answer does not depend on the image would match trivially: this one does depend on it.
    assert np.ptp(full, axis=0).max() > 0.3 and len(set(full.argmax(1).tolist())) >= 2
    assert np.abs(full - full.mean(axis=0)).max() > 100 * np.abs(full - on_features).max()


def test_second_run_reads_features_from_the_cache(tmp_path, image_folder):
    first = tltool.finetune(data=image_folder, out=tmp_path / "a", verbose=0, overrides=tiny_values(32))
    second = tltool.finetune(data=image_folder, out=tmp_path / "b", verbose=0, overrides=tiny_values(32))
    assert first.summary["timings"]["feature_images"] == 24
    assert second.summary["timings"]["feature_images"] == 0
    assert second.summary["timings"]["features_s"] == 0


def test_changed_file_invalidates_only_itself(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    tltool.finetune(data=data, out=tmp_path / "a", verbose=0, overrides=tiny_values(32))
    changed = sorted((data / "red").iterdir())[0]
    later = time.time() + 5
    os.utime(changed, (later, later))
    again = tltool.finetune(data=data, out=tmp_path / "b", verbose=0, overrides=tiny_values(32))
    assert again.summary["timings"]["feature_images"] == 1


def test_augmented_views_are_cached_too(tmp_path, image_folder):
    values = tiny_values(32) + ["frozen.feature_views=2", "augment.rotation=0.1"]
    first = tltool.finetune(data=image_folder, out=tmp_path / "a", verbose=0, overrides=values)
    assert first.summary["timings"]["feature_images"] == 18 * 3 + 6
    second = tltool.finetune(data=image_folder, out=tmp_path / "b", verbose=0, overrides=values)
    assert second.summary["timings"]["feature_images"] == 0


def test_cache_is_float16_memory_mapped_and_ignores_half_written_shards(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.add(["a", "b"], np.array([[1, 2], [3, 4]], np.float32))
    (tmp_path / "orphan.npy").write_bytes(b"partial")  # a crash between array and index: no index, ignored
    again = FeatureCache(tmp_path)
    assert "a" in again and "b" in again
    rows = again.get(["b", "a"])
    assert rows.dtype == np.float16 and rows.tolist() == [[3, 4], [1, 2]]
    shard = next(p for p in tmp_path.glob("*.json"))
    assert json.loads(shard.read_text()) == ["a", "b"]
    assert isinstance(again._array(shard.stem), np.memmap)


def test_a_damaged_shard_is_recomputed_not_a_crash(tmp_path, image_folder):
    """Shards are written atomically, but a disk or a copy can still damage one afterwards: its rows are
    computed again, as for an unreadable index, instead of the run failing while reading them."""
    first = tltool.finetune(data=image_folder, out=tmp_path / "a", verbose=0, overrides=tiny_values(32))
    assert first.summary["timings"]["feature_images"] == 24
    shards = sorted(Path(os.environ["TLTOOL_CACHE_DIR"]).rglob("*.npy"))
    assert shards
    for shard, damage in zip(shards, [lambda b: b[:100], lambda b: b[:-2], lambda b: b"junk" * 40] * len(shards)):
        shard.write_bytes(damage(shard.read_bytes()))
    again = tltool.finetune(data=image_folder, out=tmp_path / "b", verbose=0, overrides=tiny_values(32))
    assert again.summary["timings"]["feature_images"] == 24
    assert again.summary["val_accuracy"] == first.summary["val_accuracy"]


def test_unreadable_files_are_left_out_of_the_features(tmp_path, image_folder):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    bad = data / "red" / "zz_truncated.jpg"
    good = next((data / "red").glob("*.jpg")).read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    paths = sorted(str(p) for p in (data / "red").iterdir())
    import keras

    extractor = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D()])
    skips = SkipLog()
    feats, rows, stats = cached_features(extractor, FeatureCache(tmp_path / "cache"), paths, 32, 4, skips,
                                         verbose=0)
    assert len(rows) == len(paths) - 1 and str(bad) in skips
    assert feats.shape == (len(paths) - 1, 3)
    assert stats.computed == len(paths)



@pytest.mark.parametrize("budget_images", [None, 2])
def test_each_image_is_decoded_once_for_all_its_views(tmp_path, image_folder, monkeypatch, budget_images):
    """Views re-decode nothing the pass before decoded (a 12-megapixel JPEG decodes in about 13 ms, more than
    a small backbone's forward pass); past the budget images are decoded again; the features are the same."""
    import keras

    import tltool.data.pipelines as pipelines
    from tltool.data.pipelines import DecodedImages, augmentation_layer
    from tltool.recipe import AugmentConfig

    paths = sorted(str(p) for p in Path(image_folder).rglob("*.png"))[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths.append(str(broken))
    decodes = []
    real_load = pipelines.load_image
    monkeypatch.setattr(pipelines, "load_image", lambda path, size=None: decodes.append(path) or real_load(path, size))
    extractor = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D()])
    views = 3

    def features(decoded):
        augment = augmentation_layer(AugmentConfig(flip="horizontal", rotation=0.1), seed=0)
        decodes.clear()
        rows, index, _ = cached_features(extractor, None, paths, 32, 4, SkipLog(), views=views, augment=augment,
                                         augment_key="k", verbose=0, decoded=decoded)
        return rows, index, list(decodes)

    plain = features(None)
    held = None if budget_images is None else budget_images * 32 * 32 * 3 / 1e6
    kept = features(DecodedImages() if held is None else DecodedImages(held))
    good = len(paths) - 1
    assert len(plain[2]) == len(paths) * (1 + views)
    once = good if budget_images is None else budget_images
    assert len(kept[2]) == good + (good - once) * views + (1 + views)  # the broken file is tried in every pass
    np.testing.assert_array_equal(kept[0], plain[0])
    np.testing.assert_array_equal(kept[1], plain[1])

@pytest.mark.parametrize("flag", ["cache_features=false"])
def test_frozen_stage_without_cache_still_trains(tmp_path, image_folder, flag):
    result = tltool.finetune(data=image_folder, out=tmp_path / "run", verbose=0,
                             overrides=tiny_values(32) + [f"frozen.{flag}", "fine_tune.epochs=0"])
    assert result.summary["timings"]["feature_images"] == 0
    assert result.summary["timings"]["stage1_s"] > 0


def test_the_plain_images_and_every_view_share_one_traced_backbone(image_folder):
    import keras

    from tltool.data.pipelines import augmentation_layer
    from tltool.engine.features import MIRROR, _FORWARD_FNS, compute_outputs
    from tltool.recipe import AugmentConfig

    net = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False, weights=None, pooling="avg")
    paths = sorted(str(p) for p in Path(image_folder).rglob("*.png"))[:6]
    augment = augmentation_layer(AugmentConfig(flip="horizontal", rotation=0.1), seed=0)
    for view in (None, MIRROR, augment, augment):
        compute_outputs(net, paths, 32, 4, SkipLog(), augment=view)
    forward, = _FORWARD_FNS[net].values()
    assert forward.experimental_get_tracing_count() == 1  # a backbone trace costs about a second


def test_a_fit_on_cached_features_is_one_pass_per_epoch_with_new_views_from_one_iterator():
    """Cached-feature datasets are repeated for `fit` (one iterator for the whole fit, not one per epoch),
    and each epoch is still one pass: every image once, each with a view drawn anew."""
    import keras
    import tensorflow as tf

    from tltool.engine.fitting import features_dataset, fit_stage, one_iterator_per_fit

    rows, views, epochs = 10, 4, 3
    # Row i, view v has the features (i, v): what the model sees tells which image and which view.
    feats = np.array([[[i, v] for v in range(views)] for i in range(rows)], dtype=np.float16)
    labels = np.arange(rows) % 2
    train, val = features_dataset(feats, labels, 2, 4, True, 0), features_dataset(feats[:, 0], labels, 2, 4, False, None)
    repeated_train, repeated_val, steps = one_iterator_per_fit(train, val)
    assert steps == {"steps_per_epoch": 3, "validation_steps": 3}  # ceil(10 / 4): the last batch is short
    assert int(repeated_train.cardinality()) == int(repeated_val.cardinality()) == tf.data.INFINITE_CARDINALITY

    seen = []

    class Record(keras.layers.Layer):
        def call(self, x, training=None):
            if training:
                seen.append(keras.ops.convert_to_numpy(x))
            return x

    model = keras.Sequential([keras.Input((2,)), Record(), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "categorical_crossentropy", run_eagerly=True)
    fitted = fit_stage(model, train, val, epochs, callbacks=[], verbose=0)
    assert len(fitted.history["val_loss"]) == epochs
    passes = np.concatenate(seen).reshape(epochs, rows, 2)
    for one_pass in passes:
        assert sorted(one_pass[:, 0].astype(int)) == list(range(rows))
    by_image = [dict(zip(p[:, 0].astype(int), p[:, 1].astype(int))) for p in passes]
    assert by_image[0] != by_image[1] != by_image[2]

    # Images streamed from files (unreadable ones dropped: length unknown) are left to Keras's epochs.
    streamed = train.filter(lambda x, y: True)
    assert one_iterator_per_fit(streamed, val)[2] == {}
    # Without tf.data's autotuning thread: with it, a stage-2 `fit` on cached activations returned 0.3 to
    # 2.5 s after its last epoch (8 s of a 20-trial search), too irregular to time in a test.
    assert train.options().autotune.enabled is False and repeated_val.options().autotune.enabled is False


def test_features_alike_for_every_image_are_called_out(tmp_path, image_folder):
    """A random backbone (weights: none) gives every image the same stored features: the run says the model
    cannot learn and what to use instead. A backbone whose features differ does not get the warning."""
    import warnings

    with pytest.warns(UserWarning, match=r"same features, so the model cannot learn.*weights: none.*--weights imagenet"):
        tltool.finetune(data=image_folder, out=tmp_path / "random", verbose=0, overrides=tiny_values(32))
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tltool.finetune(data=image_folder, out=tmp_path / "calibrated", verbose=0,
                        overrides=tiny_values(32) + [f"backbone.weights={weights}"])
    assert not [w for w in caught if "same features" in str(w.message)]
