"""The head's input normalisation (`head.normalize`): centred on the training features, a fixed length, a
classifier that starts from zero, and the centre set from the cached features of a real run."""

import json

import keras
import numpy as np

import tltool
from helpers import calibrated_backbone_weights, tiny_values
from tltool.data.images import load_image
from tltool.models.transfer import HEAD_CENTER, build_head, center_head
from tltool.recipe import HeadConfig


def _features(rng, n: int = 40, d: int = 24) -> np.ndarray:
    return (rng.gamma(2.0, 1.5, (n, d)) + 3.0).astype(np.float32)  # positive, with a large common part


def test_a_normalised_head_starts_uniform_and_ignores_the_features_scale_about_their_mean():
    rng = np.random.default_rng(0)
    features = _features(rng)
    head = build_head(features.shape[1], 3, HeadConfig(dropout=0.0))
    center_head(head, features)
    np.testing.assert_allclose(head.predict(features, verbose=0), 1 / 3, atol=1e-6)  # the classifier is zero

    head.get_layer("predictions").set_weights([rng.normal(size=(24, 3)).astype(np.float32), np.zeros(3, np.float32)])
    mean = features.mean(axis=0)
    stretched = mean + 25.0 * (features - mean)  # the same directions from the mean, 25 times as far
    np.testing.assert_allclose(head.predict(stretched, verbose=0), head.predict(features, verbose=0), atol=1e-5)


def test_an_unnormalised_head_is_the_plain_one():
    head = build_head(24, 3, HeadConfig(normalize=False))
    assert [layer.name for layer in head.layers] == ["features", "head_dropout", "predictions"]
    center_head(head, np.ones((4, 24)))  # nothing to centre: no error


def test_a_run_centres_its_head_on_the_plain_training_features(image_folder, tmp_path):
    weights = calibrated_backbone_weights(tmp_path / "backbone.weights.h5", images=image_folder)
    result = tltool.finetune(data=image_folder, out=tmp_path / "run", verbose=0, overrides=tiny_values(32) + [
        f"backbone.weights={weights}", "frozen.feature_views=2", "augment.rotation=0.1", "fine_tune.epochs=0"])
    parts = result.model_parts
    train_paths = [row[0] for row in json.loads((result.run_dir / "data.json").read_text())["files"]["train"]]
    pixels = np.stack([load_image(p, 32) for p in train_paths]).astype(np.float32)
    plain_mean = parts.feature_extractor.predict(pixels, verbose=0).mean(axis=0)

    saved = keras.models.load_model(result.run_dir / "model.keras", compile=False)
    centre = saved.get_layer("head").get_layer(HEAD_CENTER).get_weights()[0]
    assert np.abs(plain_mean).max() > 0.01  # features worth centring
    np.testing.assert_allclose(centre, plain_mean, rtol=0.01, atol=1e-3)  # float16 cache: about 3 digits

