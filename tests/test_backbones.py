"""The backbone registry, checked against the real Keras networks."""

import keras
import numpy as np
import pytest

from tltool.models.backbones import (backbone_blocks, get_backbone_spec, graph_cuts, list_backbones,
                                     preprocessing_layer, resolve_weights)
from tltool.errors import BackboneError, WeightsError

REQUIRED = ["vgg16", "vgg19", "resnet50", "resnet50_v2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
            "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_b0",
            "efficientnet_v2_s", "convnext_tiny", "xception", "inception_v3", "densenet121"]


def test_required_backbones_are_registered():
    assert set(REQUIRED) <= set(list_backbones())
    assert list_backbones("efficientnet_b*") == ["efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
                                                  "efficientnet_b3"]


#: Blocks of some families, as their papers count them (MobileNetV2: 17 inverted residual blocks).
KNOWN_BLOCKS = {"vgg16": 5, "resnet50": 16, "resnet50_v2": 16, "mobilenet": 13, "mobilenet_v2": 17,
                "efficientnet_b0": 16, "inception_v3": 11}


@pytest.mark.parametrize("name", list_backbones())
def test_spec_matches_the_real_network(name):
    """Build each backbone with random weights at its smallest size: the declared feature width, and blocks
    that are real cuts of the network (what follows a block end computes the output from it alone)."""
    spec = get_backbone_spec(name)
    size = max(spec.min_size, 32)
    net = spec.constructor_fn()(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg",
                                **dict(spec.extra_kwargs))
    assert net.output_shape == (None, spec.feature_size)
    blocks = backbone_blocks(net, spec)
    assert len(blocks) == KNOWN_BLOCKS.get(name, len(blocks)) and len(blocks) >= 3  # ConvNeXt: 3 stage ends
    assert set(blocks) <= set(graph_cuts(net))
    middle = net.get_layer(blocks[len(blocks) // 2]).output
    bottom, top = keras.Model(net.input, middle), keras.Model(middle, net.output)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(top(bottom(pixels))), np.asarray(net(pixels)), rtol=1e-4, atol=1e-5)
    keras.backend.clear_session()


def test_graph_cuts_exclude_layers_a_shortcut_jumps_over():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(4, name="b")(a)
    c = keras.layers.Add(name="c")([a, b])  # the shortcut from a jumps over b
    out = keras.layers.Dense(2, name="d")(c)
    assert graph_cuts(keras.Model(inputs, out))[1:] == ["a", "c"]  # [0] is the input layer


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(BackboneError, match=r"Unknown backbone `mobilenetv2x`\. Did you mean `mobilenet_v2`"):
        get_backbone_spec("mobilenetv2x")
    assert get_backbone_spec("MobileNetV2").name == "mobilenet_v2"
    assert get_backbone_spec("resnet-50").name == "resnet50"


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "densenet121"])
def test_preprocessing_layer_matches_keras_preprocess_input(name):
    spec = get_backbone_spec(name)
    module = {"mobilenet_v2": keras.applications.mobilenet_v2, "resnet50": keras.applications.resnet50,
              "densenet121": keras.applications.densenet}[name]
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    ours = keras.ops.convert_to_numpy(preprocessing_layer(spec)(pixels))
    theirs = module.preprocess_input(pixels.copy())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)


def test_networks_with_builtin_preprocessing_get_no_layer():
    assert preprocessing_layer(get_backbone_spec("efficientnet_b0")) is None


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="Weights file not found"):
        resolve_weights(get_backbone_spec("mobilenet_v2"), str(tmp_path / "nope.weights.h5"))


def test_offline_imagenet_fails_fast_with_instructions(monkeypatch, tmp_path):
    """No network in tests: make Keras's download raise as it does offline, with an empty cache."""
    import urllib.error

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    spec = get_backbone_spec("mobilenet_v2")
    with pytest.raises(WeightsError, match=r"Cannot get ImageNet weights for mobilenet_v2.*--weights PATH.*"
                                           r"--weights none"):
        resolve_weights(spec, "imagenet")
    with pytest.warns(UserWarning, match="RANDOM initialisation"):
        resolved = resolve_weights(spec, "imagenet", fallback="none")
    assert resolved.kind == "none" and resolved.fell_back


def test_offline_download_shows_only_tltools_message(monkeypatch, tmp_path, capsys):
    """Keras announces "Downloading data from URL" before it connects; offline, the user sees our error alone."""
    import urllib.error

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("keras.src.utils.file_utils.urlretrieve", offline)  # Keras's real get_file runs
    # The message names the whole file to fetch elsewhere (Keras's own message, cut short, lost its name).
    with pytest.raises(WeightsError, match=r"Cannot get ImageNet weights for mobilenet_v2 .*Temporary failure.* "
                                           r"download https://\S+/mobilenet_v2_weights\S+_no_top\.h5 elsewhere"):
        resolve_weights(get_backbone_spec("mobilenet_v2"), "imagenet")
    out, err = capsys.readouterr()
    assert "Downloading data from" not in out + err


@pytest.mark.parametrize("name", ["vgg16", "mobilenet", "mobilenet_v3_small", "resnet50"])
def test_classic_head_keeps_everything_up_to_the_original_classifier(name):
    """Classic mode cuts at the input of the 1000-way layer, even where that layer is a 1x1 convolution."""
    from tltool.models.backbones import ResolvedWeights
    from tltool.models.transfer import build_transfer_model
    from tltool.recipe import HeadConfig

    spec = get_backbone_spec(name)
    tm = build_transfer_model(spec, ResolvedWeights("none", None, "random"), 3, 32, HeadConfig(mode="classic"))
    assert tm.feature_extractor.output_shape == (None, spec.classic_feature_size)
    assert tm.model.output_shape == (None, 3)
    keras.backend.clear_session()
