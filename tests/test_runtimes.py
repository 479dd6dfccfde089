"""Exports loaded in the runtimes users have: MediaPipe Tasks' ImageClassifier and LiteRT for every TFLite
variant, with nothing but the file; TF Serving's REST request shape for the SavedModel."""

import base64
import json

import numpy as np
import pytest
from helpers import image_paths, load_saved_model, tiny_trained_run, validation_paths
from serving_rest import rest_predict

import tltool
from tltool.data.images import load_image

LABELS = ["blue", "green", "red"]
VARIANTS = ["none", "float16", "dynamic", "int8"]
RECIPE_INFO = ("export.author=Ada Example", "export.license=Apache-2.0", "export.model_version=v3",
               "export.description=Tells red, green and blue apart.")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_trained_run(tmp_path_factory.mktemp("runtimes-run"), calibrate_on_noise=True,
                            overrides=RECIPE_INFO)


@pytest.fixture(scope="module")
def tflite_files(run_dir):
    """Every TFLite variant, exported (and checked) as `tltool export RUN --format tflite` does."""
    files = {}
    for quantize in VARIANTS:
        result = tltool.export(run_dir, "tflite", quantize=quantize)
        files[quantize] = (run_dir / "export" / ("tflite" if quantize == "none" else f"tflite-{quantize}")
                           / "model.tflite")
        assert result["mediapipe"]["checked"] and result["mediapipe"]["labels_match"], result["mediapipe"]
    return files


@pytest.fixture(scope="module")
def images(run_dir):
    """The validation images at the model's size, and the Keras model's answers on them."""
    pixels = np.stack([load_image(p, 32) for p in validation_paths(run_dir)])
    out = load_saved_model(run_dir / "model.keras")(pixels.astype(np.float32), training=False)
    return pixels, np.asarray(out["probabilities"]), np.asarray(out["ood_score"]).reshape(-1)


def mediapipe_classify(path, pixels):
    """What an app gets from MediaPipe Tasks' ImageClassifier for each image: [(head name, {name: score})]."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions
    from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions

    options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=-1)
    with ImageClassifier.create_from_options(options) as classifier:
        results = [classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(p)))
                   for p in pixels]
    return [[(head.head_name, {c.category_name: c.score for c in head.categories})
             for head in result.classifications] for result in results]


def litert_run(path, pixels):
    """LiteRT's interpreter on the file alone: plain pixels in (uint8 for int8 files), outputs in graph order."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], pixels.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], pixels.astype(inp["dtype"]))
    interpreter.invoke()
    outputs = []
    for detail in interpreter.get_output_details():
        scale, zero = detail["quantization"] if detail["dtype"] != np.float32 else (1.0, 0)
        outputs.append((interpreter.get_tensor(detail["index"]).astype(np.float32) - zero) * scale)
    return outputs


def litert_signature_run(path, pixels):
    """LiteRT's signature runner: named input in, named outputs out (dequantized as in `litert_run`)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_signature_list() == {
        "serving_default": {"inputs": ["pixels"], "outputs": ["ood_score", "probabilities"]}}
    runner = interpreter.get_signature_runner("serving_default")
    dtype = runner.get_input_details()["pixels"]["dtype"]
    outputs = {}
    for name, value in runner(pixels=pixels.astype(dtype)).items():
        scale, zero = runner.get_output_details()[name]["quantization"] if value.dtype != np.float32 else (1.0, 0)
        outputs[name] = (value.astype(np.float32) - zero) * scale
    return outputs


@pytest.mark.parametrize("quantize", VARIANTS)
def test_every_tflite_variant_loads_in_mediapipe_and_litert_with_the_class_names(tflite_files, images, quantize):
    pixels, keras_probs, keras_ood = images
    path = tflite_files[quantize]
    answers = mediapipe_classify(path, pixels)
    assert all([name for name, _ in heads] == ["probabilities", "ood_score"] for heads in answers)
    assert all(sorted(heads[0][1]) == LABELS for heads in answers)  # names, not None
    mp_probs = np.array([[heads[0][1][label] for label in LABELS] for heads in answers])
    mp_ood = np.array([heads[1][1]["out_of_distribution"] for heads in answers])
    probs, ood = litert_run(path, pixels)
    assert probs.shape == (len(pixels), 3) and ood.shape == (len(pixels), 1)  # probabilities first
    by_name = litert_signature_run(path, pixels)  # LiteRT's signature runner names the same outputs
    np.testing.assert_array_equal(by_name["probabilities"], probs)
    np.testing.assert_array_equal(by_name["ood_score"], ood)
    # Both runtimes compute the same from the same file, and both agree with the Keras model.
    np.testing.assert_allclose(mp_probs, probs, atol=1e-5)
    np.testing.assert_allclose(mp_ood, ood.reshape(-1), atol=1e-5)
    agreement = (mp_probs.argmax(1) == keras_probs.argmax(1)).mean()
    if quantize in ("none", "float16"):
        assert agreement == 1.0
        np.testing.assert_allclose(mp_probs, keras_probs, atol=2e-2)
        np.testing.assert_allclose(mp_ood, keras_ood, atol=2e-2)
    else:  # within the export's tolerance for quantized models: the same class for nearly every image
        assert agreement >= 0.8


def test_int8_input_takes_the_image_bytes_as_they_are(tflite_files):
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(tflite_files["int8"])).get_input_details()[0]
    assert detail["dtype"] == np.uint8 and detail["quantization"] == (1.0, 0)


def test_standard_metadata_describes_the_model(run_dir, tflite_files):
    import zipfile

    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    from tltool.exporting.metadata import metadata_entries

    path = tflite_files["none"]
    data = path.read_bytes()
    model = fb.ModelMetadata.GetRootAsModelMetadata(metadata_entries(path, data)["TFLITE_METADATA"], 0)
    assert (model.Name(), model.Version(), model.Author(), model.License()) == (
        b"run", b"v3", b"Ada Example", b"Apache-2.0")
    assert model.Description() == b"Tells red, green and blue apart."
    assert model.MinParserVersion() == b"1.0.0"
    image = model.SubgraphMetadata(0).InputTensorMetadata(0)
    assert image.Content().ContentPropertiesType() == fb.ContentProperties.ImageProperties
    properties = fb.ImageProperties()
    properties.Init(image.Content().ContentProperties().Bytes, image.Content().ContentProperties().Pos)
    assert properties.ColorSpace() == fb.ColorSpaceType.RGB
    unit = image.ProcessUnits(0)
    assert unit.OptionsType() == fb.ProcessUnitOptions.NormalizationOptions
    norm = fb.NormalizationOptions()
    norm.Init(unit.Options().Bytes, unit.Options().Pos)
    assert norm.MeanAsNumpy().tolist() == [0.0] and norm.StdAsNumpy().tolist() == [1.0]  # plain 0..255 pixels
    probabilities = model.SubgraphMetadata(0).OutputTensorMetadata(0)
    assert probabilities.Name() == b"probabilities"
    label_file = probabilities.AssociatedFiles(0)
    assert label_file.Type() == fb.AssociatedFileType.TENSOR_AXIS_LABELS
    with zipfile.ZipFile(path) as archive:  # the label files travel appended to the model
        assert archive.read(label_file.Name().decode()).decode().split("\n") == LABELS
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    # The run's name and tltool's own entry are still there for `tltool predict`.
    assert tltool.load_predictor(path).labels == LABELS


def test_the_export_report_names_the_runtimes_that_loaded_it(run_dir, tflite_files):
    report = json.loads((tflite_files["int8"].parent / "export.json").read_text())
    assert report["runtime"].startswith("ai-edge-litert ")
    assert report["mediapipe"]["n_images"] == 6 and report["mediapipe"]["top1_agreement"] == 1.0


def test_files_exported_before_the_standard_metadata_still_load(tflite_files, images, tmp_path):
    """A file with tltool's own entry alone (as tltool wrote them before), and no labels.txt beside it."""
    from tensorflow.lite.tools import flatbuffer_utils

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_files["none"].read_bytes()))
    tree.metadata = [m for m in tree.metadata if m.name not in (b"TFLITE_METADATA", "TFLITE_METADATA")]
    old = tmp_path / "model.tflite"
    old.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(tree)))  # the zip is gone as well
    predictor = tltool.load_predictor(old)
    assert predictor.labels == LABELS
    pixels, keras_probs, _ = images
    np.testing.assert_allclose(predictor.predict(pixels), keras_probs, atol=1e-3)


def test_a_declared_input_normalisation_is_applied(tflite_files, images, tmp_path):
    """Model Maker's float files take (pixel - 127.5) / 127.5, as their metadata says: predict follows it."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    from tltool.exporting.metadata import embed_tflite_metadata, metadata_entries
    from tltool.exporting.tflite_metadata import append_files

    path = tflite_files["none"]
    data = path.read_bytes()
    model = fb.ModelMetadataT.InitFromObj(
        fb.ModelMetadata.GetRootAsModelMetadata(metadata_entries(path, data)["TFLITE_METADATA"], 0))
    options = model.subgraphMetadata[0].inputTensorMetadata[0].processUnits[0].options
    options.mean, options.std = [127.5], [127.5]
    import flatbuffers

    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), b"M001")
    normalised = tmp_path / "model.tflite"
    normalised.write_bytes(append_files(embed_tflite_metadata(data, {}, {"TFLITE_METADATA": bytes(builder.Output())}),
                                        {"labels.txt": "\n".join(LABELS).encode()}))
    pixels = images[0]
    expected, _ = litert_run(path, (pixels.astype(np.float32) - 127.5) / 127.5)
    np.testing.assert_allclose(tltool.load_predictor(normalised).predict(pixels), expected, atol=1e-6)
    assert not np.allclose(expected, litert_run(path, pixels)[0], atol=1e-3)  # so the test can fail


def test_savedmodel_answers_a_tf_serving_rest_predict_request(run_dir):
    """TF Serving's REST API: a `predict` body with base64 images, decoded to a string tensor for the
    `serving_default` signature, and the row-format response an app parses."""
    import tensorflow as tf

    tltool.export(run_dir, "savedmodel")
    loaded = tf.saved_model.load(str(run_dir / "export" / "savedmodel" / "1"))
    files = [p for p in image_paths(run_dir.parent / "images")][::5]
    body = json.dumps({"signature_name": "serving_default",
                       "instances": [{"b64": base64.b64encode(p.read_bytes()).decode("ascii")} for p in files]})
    response = json.loads(json.dumps(rest_predict(loaded.signatures, body)))  # JSON all the way
    predictions = response["predictions"]
    assert len(predictions) == len(files)
    expected = tltool.load_predictor(run_dir).scores(np.stack([load_image(p, 32) for p in files]))
    for row, probs, ood in zip(predictions, expected.probabilities, expected.ood_score):
        assert set(row) == {"probabilities", "label", "score", "top_k_labels", "top_k_scores", "ood_score",
                            "is_unknown"}
        assert row["label"] == LABELS[int(np.argmax(probs))] and row["top_k_labels"][0] == row["label"]
        assert row["score"] == pytest.approx(float(probs.max()), abs=0.02)  # TF's decoder and resize, not Pillow's
        assert len(row["probabilities"]) == 3 and row["top_k_scores"] == sorted(row["top_k_scores"], reverse=True)
        assert row["is_unknown"] == (row["ood_score"] > 1)
        if abs(ood - 1) > 0.2:  # the score moves a little with TF's decoder; the verdict must not
            assert row["is_unknown"] == bool(ood > 1)
