"""`tltool stylize`: neural style transfer on small images with random backbone weights (no download)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from salted_data import textured, write_broken_files

import tltool
from tltool.cli import main
from tltool.errors import BackboneError, DataError
from tltool.models.backbones import get_backbone_spec

# Random weights give losses of another scale than ImageNet's: weights that let the style term lead.
FAST = dict(weights="none", size=64, content_weight=1.0, style_weight=1.0, tv_weight=0.0, verbose=0)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    Image.fromarray(textured(1, 64)).resize((64, 48)).save(folder / "content.png")  # 4:3, like a photo
    stripes = (np.indices((80, 80)).sum(0) // 6 % 2 * 200).astype(np.uint8)
    Image.fromarray(np.stack([stripes, 255 - stripes, stripes // 2], -1)).save(folder / "style.jpg")
    return folder / "content.png", folder / "style.jpg"


def test_style_loss_falls_tenfold_and_the_outputs_are_written(pictures, tmp_path):
    content, style = pictures
    result = tltool.stylize(content, style, steps=30, optimizer="lbfgs", out=tmp_path / "out", **FAST)
    history = result.summary["history"]
    assert history[0]["step"] == 0 and history[-1]["step"] == 30
    assert history[-1]["style"] < history[0]["style"] / 10
    assert history[-1]["content"] < 0.1 * history[0]["style"]  # the content stays near the photo's
    png = Image.open(tmp_path / "out" / "result.png")
    assert png.format == "PNG" and png.size == (64, 48) and png.mode == "RGB"
    assert result.image.shape == (48, 64, 3) and result.image.dtype == np.uint8
    sheet = Image.open(tmp_path / "out" / "sheet.png")
    assert sheet.height == 48 and sheet.width > 3 * 48
    assert Image.open(tmp_path / "out" / "loss.png").format == "PNG"
    saved = json.loads((tmp_path / "out" / "stylize.json").read_text())
    assert saved["settings"]["optimizer"] == "lbfgs" and saved["steps_done"] == 30 and not saved["interrupted"]
    assert saved["timings"]["per_step_s"] > 0
    # The written recipe repeats the run: the same settings, the same image.
    again = tltool.stylize(content, style, tmp_path / "out" / "recipe.yaml", out=tmp_path / "again", verbose=0)
    assert again.summary["settings"] == saved["settings"]
    np.testing.assert_array_equal(again.image, result.image)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_the_same_seed_gives_the_same_image(pictures, tmp_path, optimizer):
    content, style = pictures
    runs = [tltool.stylize(content, style, steps=5, optimizer=optimizer, init="noise", seed=7,
                           out=tmp_path / f"run{i}", **FAST) for i in range(2)]
    np.testing.assert_array_equal(runs[0].image, runs[1].image)
    other = tltool.stylize(content, style, steps=5, optimizer=optimizer, init="noise", seed=8,
                           out=tmp_path / "other", **FAST)
    assert not np.array_equal(other.image, runs[0].image)


def test_bad_inputs_get_one_line(pictures, tmp_path):
    content, style = pictures
    write_broken_files(tmp_path / "broken")
    with pytest.raises(DataError, match="content image .* does not exist"):
        tltool.stylize(tmp_path / "missing.png", style, **FAST)
    with pytest.raises(DataError, match="style image .*truncated.jpg cannot be read: truncated"):
        tltool.stylize(content, tmp_path / "broken" / "truncated.jpg", **FAST)
    with pytest.raises(DataError, match=r"--size 20 makes the result 20x15 px.*Pass --size 43 or more"):
        tltool.stylize(content, style, **{**FAST, "size": 20})
    with pytest.raises(BackboneError, match="resnet50 declares no content and style layers.*vgg19"):
        tltool.stylize(content, style, backbone="resnet50", **FAST)
    for args, message in ([[str(tmp_path / "missing.png"), str(style)], "does not exist"],
                          [[str(content), str(style), "--backbone", "resnet50"], "declares no content"]):
        shown = CliRunner().invoke(main, ["stylize", *args, "--weights", "none", "--size", "64"])
        assert shown.exit_code == 2 and message in shown.output and "Traceback" not in shown.output


def test_every_declared_layer_exists_in_its_backbone():
    import keras

    for name in ("vgg16", "vgg19", "mobilenet_v2"):
        spec = get_backbone_spec(name)
        net = spec.constructor_fn()(include_top=False, weights=None, input_shape=(64, 64, 3))
        names = {layer.name for layer in net.layers}
        assert set(spec.content_layers) | set(spec.style_layers) <= names, name
        assert len(spec.style_loss_weights) == 3, name
        keras.backend.clear_session()


def test_loss_weights_default_to_the_backbones(pictures, tmp_path):
    content, style = pictures
    mobile = tltool.stylize(content, style, backbone="mobilenet_v2", weights="none", size=64, steps=1,
                            out=tmp_path / "mobile", verbose=0)
    assert mobile.summary["loss_weights"] == {"content": 1e3, "style": 1e6, "tv": 1.0}
    vgg = tltool.stylize(content, style, weights="none", size=64, steps=1, style_weight=0.5, out=tmp_path / "vgg",
                         verbose=0)
    assert vgg.summary["loss_weights"] == {"content": 1e4, "style": 0.5, "tv": 30.0}


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_keeps_the_image_so_far(pictures, tmp_path, stop, code):
    content, style = pictures
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "tltool", "stylize", str(content), str(style), "--weights",
                                "none", "--size", "64", "--steps", "100000", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    seen = ""
    while "/100000" not in seen:  # the progress bar has started: some steps are done
        assert process.poll() is None and time.monotonic() < deadline, seen
        seen += process.stdout.read(1)
    time.sleep(1.0)
    process.send_signal(stop)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == code, seen + rest
    assert "the image so far is in" in rest
    saved = json.loads((out / "stylize.json").read_text())
    assert saved["interrupted"] and saved["steps_done"] >= 1
    assert Image.open(out / "result.png").size == (64, 48)


def test_ctrl_c_during_the_optimisation_waits_for_the_end_of_the_step():
    """Ctrl-C raised wherever the main thread is can land in a finalizer of TensorFlow's, which drops it and
    the run goes on: within ctrl_c_at_safe_points it is only recorded, and raised at the step's end."""
    from tltool import interrupts

    before = signal.getsignal(signal.SIGINT)
    with interrupts.ctrl_c_at_safe_points():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler has run: nothing was raised
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
    interrupts.check()  # nothing left recorded
