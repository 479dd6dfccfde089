"""The cached-feature frozen stage: same model, cache hits, partial invalidation."""

import json
import os
import time

import numpy as np
import pytest

import tltool
from helpers import make_image_folder, tiny_values
from tltool.data.folders import SkipLog
from tltool.engine.features import FeatureCache, cached_features, compute_features


def test_head_on_cached_features_equals_the_full_model(tmp_path, image_folder):
    """The head trained on features goes into the image-level model unchanged: same predictions."""
    result = tltool.finetune(data=image_folder, out=tmp_path / "run", verbose=0,
                             overrides=tiny_values(32) + ["fine_tune.epochs=0"])
    model = result.model
    extractor = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))
    head = model.get_layer("head")
    paths = sorted(str(p) for p in image_folder.rglob("*.*"))[:6]
    feats, ok = compute_features(result.model_parts.feature_extractor, paths, 32, 4, SkipLog(), verbose=0)
    assert ok.all()
    from tltool.data.images import load_image

    pixels = np.stack([load_image(p, 32) for p in paths]).astype("float32")
    full = model.predict(pixels, verbose=0)
    on_features = head.predict(feats.astype("float32"), verbose=0)
    np.testing.assert_allclose(full, on_features, atol=2e-3)  # float16 storage of the features
    assert extractor.trainable is False


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


@pytest.mark.parametrize("flag", ["cache_features=false"])
def test_frozen_stage_without_cache_still_trains(tmp_path, image_folder, flag):
    result = tltool.finetune(data=image_folder, out=tmp_path / "run", verbose=0,
                             overrides=tiny_values(32) + [f"frozen.{flag}", "fine_tune.epochs=0"])
    assert result.summary["timings"]["feature_images"] == 0
    assert result.summary["timings"]["stage1_s"] > 0
