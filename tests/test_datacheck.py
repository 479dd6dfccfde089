"""`tltool data check`, reading odd and broken images, and clean errors for bad input."""

from __future__ import annotations

import ast
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import tltool
from helpers import make_image_folder, tiny_recipe_args, tiny_values
from salted_data import BROKEN_KINDS, make_salted_folder, textured, write_broken_files, write_odd_files
from tltool.data import check as datacheck
from tltool.cli import main
from tltool.data.folders import scan_folder
from tltool.errors import DataError
from tltool.data.images import ImageReadError, load_image

PACKAGE = Path(tltool.__file__).parent


@pytest.fixture(scope="module")
def salted(tmp_path_factory):
    return make_salted_folder(tmp_path_factory.mktemp("salted"))


@pytest.fixture(scope="module")
def salted_report(salted):
    return datacheck.check_data(salted)


def textured_folder(root: Path, classes=("cats", "dogs"), per_class=4, first_seed=0) -> Path:
    seed = first_seed
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            seed += 1
            Image.fromarray(textured(seed)).save(root / name / f"{name}_{i}.png")
    return root


# ------------------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("size", [None, 32])
def test_odd_images_decode_to_the_right_pixels(tmp_path, size):
    expected = write_odd_files(tmp_path)
    for name, colour in expected.items():
        pixels = load_image(tmp_path / name, size)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3, name
        tolerance = 12 if name.lower().endswith((".jpg", ".jpeg")) else 1
        corner = pixels[0, 0].astype(int)
        assert np.abs(corner - np.array(colour)).max() <= tolerance, (name, tuple(corner), colour)
    # EXIF orientation 6 turns the stored 60x40 (w x h) picture upright: 40 wide, 60 high.
    assert load_image(tmp_path / "exif_rotated.jpg").shape == (60, 40, 3)
    # The transparent corner is white, the opaque rest keeps its colour.
    assert tuple(load_image(tmp_path / "alpha.png")[-1, -1]) == (220, 30, 30)
    assert tuple(load_image(tmp_path / "palette_transparent.png")[-1, -1]) == (220, 30, 30)
    assert load_image(tmp_path / "tiny.png").shape == (1, 1, 3)


def test_large_jpeg_decodes_small_and_is_noted(tmp_path, monkeypatch):
    photo = Image.fromarray(textured(5, 64)).resize((3000, 2000))
    (tmp_path / "a").mkdir()
    photo.save(tmp_path / "a" / "big.jpg", quality=80)
    assert load_image(tmp_path / "a" / "big.jpg", 32).shape == (32, 32, 3)
    monkeypatch.setattr(datacheck, "LARGE_PIXELS", 5_000_000)
    report = datacheck.check_data(tmp_path)
    assert report["folders"]["train"]["odd"]["very large"] == ["a/big.jpg"]


@pytest.mark.parametrize("size", [None, 32])
def test_broken_files_raise_image_read_error_with_their_kind(tmp_path, size):
    write_broken_files(tmp_path)
    for name, kind in BROKEN_KINDS.items():
        with pytest.raises(ImageReadError) as info:
            load_image(tmp_path / name, size)
        assert info.value.kind == kind, (name, str(info.value))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_guard_follows_pillow_limit(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100), (1, 2, 3)).save(tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    with pytest.raises(ImageReadError, match="too large") as info:
        load_image(tmp_path / "x.png")
    assert info.value.kind == "too_large"


def test_scanning_in_threads_keeps_warnings_working(salted):
    # Decoding threads must not scramble the process's warning filters (catch_warnings is not thread-safe).
    before = list(warnings.filters)
    with pytest.warns(UserWarning, match="`empty_class`"):
        folder = scan_folder(salted)
    assert folder.classes == ["blue", "red"] and folder.empty_classes == ["empty_class"]
    assert list(warnings.filters) == before


def test_class_folder_with_a_line_break_is_refused(tmp_path):
    make_image_folder(tmp_path, classes=("red", "gr\neen"), per_class=2)
    with pytest.raises(DataError, match="line break"):
        scan_folder(tmp_path)
    report = datacheck.check_data(tmp_path)
    assert "bad_class_name" in {p["code"] for p in report["problems"]}


def test_class_folders_differing_only_in_case_are_warned_of(tmp_path):
    (tmp_path / "probe").mkdir()
    if (tmp_path / "PROBE").exists():
        pytest.skip("a case-insensitive file system cannot hold such folders")
    root = textured_folder(tmp_path / "d", classes=("Ants", "ants", "bees"), per_class=5)
    result = CliRunner().invoke(main, ["data", "check", str(root)])
    assert result.exit_code == 0, result.output  # trainable: a warning, not a problem
    assert (f"Warning: Class folders that differ only in letter case in the training folder {root}: Ants, ants. "
            in result.output) and "merge them into one folder" in result.output
    report = datacheck.check_data(root)
    assert [w for w in report["warnings"] if w["code"] == "case_clash"]
    # finetune and tune, which train on them as two classes, say so too
    with pytest.warns(UserWarning, match=r"Class folders Ants, ants in .* differ only in letter case"):
        assert scan_folder(root).classes == ["Ants", "ants", "bees"]


# ------------------------------------------------------------------------------------------ data check


def test_report_of_the_salted_folder(salted, salted_report):
    report = salted_report
    train = report["folders"]["train"]
    broken = {b["path"]: b["kind"] for b in train["broken"]}
    assert broken == {**{f"red/{name}": kind for name, kind in BROKEN_KINDS.items()},
                      "empty_class/zero.png": "empty"}
    assert all(b["reason"] for b in train["broken"])
    assert train["classes"] == {"blue": 7, "empty_class": 0, "red": 6 + 12}
    assert train["num_classes"] == 2 and train["imbalance_ratio"] == pytest.approx(18 / 7, abs=0.01)
    assert train["empty_classes"] == ["empty_class"]
    odd = train["odd"]
    assert set(odd["alpha"]) == {"red/alpha.png", "red/palette_transparent.png"}
    assert "red/palette_transparent.png" in odd["palette"] and "red/anim.gif" in odd["palette"]
    assert set(odd["grayscale"]) == {"red/grey.png", "red/grey16.png"}
    assert odd["16-bit"] == ["red/grey16.png"]
    assert odd["cmyk"] == ["red/cmyk.jpg"]
    assert odd["exif-rotated"] == ["red/exif_rotated.jpg"]
    assert odd["animated"] == ["red/anim.gif"]
    assert odd["very small"] == ["red/tiny.png"]
    assert train["duplicates"] == [["blue/blue_00.png", "blue/blue_dup.png"]]
    assert train["label_conflicts"] == []
    assert train["ignored"]["hidden"] == 2 and train["ignored"]["non_image"] == 1
    assert report["ok"] is False
    assert {p["code"] for p in report["problems"]} == {"broken_files"}
    assert {"empty_class", "duplicates"} <= {w["code"] for w in report["warnings"]}
    json.dumps(report)  # JSON-ready
    text = datacheck.format_report(report)
    assert "red/truncated.jpg: truncated file" in text and "PROBLEM" in text


def test_label_conflict_and_too_few_classes(tmp_path):
    root = textured_folder(tmp_path / "d")
    shutil.copy(root / "cats" / "cats_0.png", root / "dogs" / "also_a_dog.png")
    report = datacheck.check_data(root)
    conflicts = report["folders"]["train"]["label_conflicts"]
    assert conflicts == [{"classes": ["cats", "dogs"], "paths": ["cats/cats_0.png", "dogs/also_a_dog.png"]}]
    assert [p["code"] for p in report["problems"]] == ["label_conflict"]

    # The same picture under other bytes: the pixels of cats_1 saved as a PNG of another name. And a
    # resized copy of cats_2: not the same pixels, but a near-duplicate pair across classes.
    (root / "dogs" / "also_a_dog.png").unlink()
    Image.open(root / "cats" / "cats_1.png").save(root / "dogs" / "resaved.png", optimize=True, compress_level=1)
    assert (root / "dogs" / "resaved.png").read_bytes() != (root / "cats" / "cats_1.png").read_bytes()
    with Image.open(root / "cats" / "cats_2.png") as img:
        img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.LANCZOS).save(root / "dogs" / "smaller.png")
    report = datacheck.check_data(root)
    conflicts = report["folders"]["train"]["label_conflicts"]
    assert conflicts == [{"classes": ["cats", "dogs"], "paths": ["cats/cats_1.png", "dogs/resaved.png"]}]
    assert [p["code"] for p in report["problems"]] == ["label_conflict"]
    across = report["folders"]["train"]["near_duplicates"]["across_classes"]
    assert [(e["a"], e["b"]) for e in across["examples"]] == [("cats/cats_2.png", "dogs/smaller.png")]
    assert "near_duplicates_across_classes" in [w["code"] for w in report["warnings"]]

    shutil.rmtree(root / "dogs")
    report = datacheck.check_data(root)
    assert [p["code"] for p in report["problems"]] == ["too_few_classes"]


def test_clean_folder_is_ok(tmp_path):
    report = datacheck.check_data(textured_folder(tmp_path, per_class=6))
    assert report["ok"] and report["problems"] == [] and report["leakage"] == []
    assert report["folders"]["train"]["classes"] == {"cats": 6, "dogs": 6}


def test_leakage_between_splits_found_with_examples(tmp_path):
    train = textured_folder(tmp_path / "train", per_class=5)
    val = textured_folder(tmp_path / "val", per_class=3, first_seed=100)
    test = textured_folder(tmp_path / "test", per_class=3, first_seed=200)
    clean = datacheck.check_data(train, val=val, test=test)
    assert clean["leakage"] == [] and clean["ok"], clean["problems"]
    # The same picture, smaller and re-encoded as JPEG, in the validation folder; an identical copy in test.
    with Image.open(train / "dogs" / "dogs_2.png") as img:
        img.resize((48, 48)).save(val / "dogs" / "dogs_copy.jpg", quality=75)
    shutil.copy(train / "cats" / "cats_1.png", test / "cats" / "same.png")
    report = datacheck.check_data(train, val=val, test=test)
    leaks = {tuple(leak["between"]): leak for leak in report["leakage"]}
    assert set(leaks) == {("train", "val"), ("train", "test")}
    assert leaks[("train", "val")]["pairs"] == 1 and leaks[("train", "val")]["exact"] == 0
    example = leaks[("train", "val")]["examples"][0]
    assert (example["a"], example["b"]) == ("dogs/dogs_2.png", "dogs/dogs_copy.jpg")
    assert 0 <= example["distance"] <= datacheck.NEAR_DISTANCE
    assert leaks[("train", "test")]["examples"][0] == {"a": "cats/cats_1.png", "b": "cats/same.png", "distance": 0}
    assert not report["ok"] and {p["code"] for p in report["problems"]} == {"leakage"}


def test_validation_folder_class_mismatch(tmp_path):
    train = textured_folder(tmp_path / "train")
    val = textured_folder(tmp_path / "val", classes=("cats", "birds"), first_seed=50)
    report = datacheck.check_data(train, val=val)
    assert "unknown_classes" in {p["code"] for p in report["problems"]}
    assert "missing_classes" in {w["code"] for w in report["warnings"]}


def test_group_by_reports_groups_and_groups_spanning_classes(tmp_path):
    root = tmp_path / "d"
    seed = 0
    for name, objects in (("cats", ["obj1", "obj2"]), ("dogs", ["obj3", "obj1"])):
        (root / name).mkdir(parents=True)
        for obj in objects:
            for shot in range(2):
                seed += 1
                Image.fromarray(textured(seed)).save(root / name / f"{obj}_shot{shot}.png")
    Image.fromarray(textured(99)).save(root / "dogs" / "loose.png")
    report = datacheck.check_data(root, group_by=r"^(obj\d+)_")
    groups = report["folders"]["train"]["groups"]
    assert groups["count"] == 4 and groups["unmatched"] == 1
    assert groups["spanning_classes"] == [{"group": "obj1", "classes": ["cats", "dogs"]}]
    assert "group_spans_classes" in {p["code"] for p in report["problems"]}
    assert "group_unmatched" in {w["code"] for w in report["warnings"]}


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, 40, dtype=np.uint64)
    b = a[:10] ^ np.uint64(0b1011)  # 3 bits away from the first ten
    brute = {(i, j) for i in range(len(a)) for j in range(len(b)) if bin(int(a[i]) ^ int(b[j])).count("1") <= 5}
    assert {(i, j) for i, j, _ in datacheck.near_pairs(a, b, 5)} == brute == {(i, i) for i in range(10)}
    inner = datacheck.near_pairs(np.concatenate([a[:3], a[:3]]), None, 0)
    assert sorted((i, j) for i, j, _ in inner) == [(0, 3), (1, 4), (2, 5)]


# ------------------------------------------------------------------------------------------ CLI


def test_cli_data_check_exit_codes_and_json(tmp_path, salted):
    runner = CliRunner()
    clean = textured_folder(tmp_path / "clean")
    result = runner.invoke(main, ["data", "check", str(clean)])
    assert result.exit_code == 0, result.output
    assert "OK: the data can be trained on" in result.output and "cats" in result.output

    result = runner.invoke(main, ["data", "check", str(salted)])
    assert result.exit_code == 1
    assert f"PROBLEM: {len(BROKEN_KINDS) + 1} broken file(s)" in result.output

    result = runner.invoke(main, ["data", "check", str(clean), "--val-data", str(clean), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["leakage"][0]["exact"] == 8 and report["ok"] is False


@pytest.mark.parametrize("args, message", [
    (["data", "check", "{tmp}/missing"], "does not exist"),
    (["data", "check", "{tmp}", "--group-by", "(unclosed"], "not a valid regular expression"),
    (["data", "check", "{tmp}", "--val-data", "{tmp}/nope"], "validation folder"),
])
def test_cli_data_check_bad_input(tmp_path, args, message):
    textured_folder(tmp_path)
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def _finetune_args(tmp_path, data, *extra):
    return ["finetune", "--data", str(data), "--out", str(tmp_path / "run"), "-q", *tiny_recipe_args(32), *extra]


@pytest.mark.parametrize("case, message", [
    ("bad_recipe", "frozen.epoks"),
    ("missing_folder", "does not exist"),
    ("one_class", "at least 2 are needed"),
    ("image_size", "too small for inception_v3"),
])
def test_cli_finetune_bad_input_is_one_line_exit_2(tmp_path, image_folder, case, message):
    data = image_folder
    extra = []
    if case == "bad_recipe":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("frozen:\n  epoks: 3\n")
        extra = [str(recipe)]
    elif case == "missing_folder":
        data = tmp_path / "no_such_folder"
    elif case == "one_class":
        data = make_image_folder(tmp_path / "one", classes=("red",), per_class=3)
        (data / "blue").mkdir()
    elif case == "image_size":
        extra = ["--backbone", "inception_v3", "--image-size", "40"]
    result = CliRunner().invoke(main, _finetune_args(tmp_path, data, *extra))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    # One error line (an empty class folder's warning may come before it).
    assert [line for line in lines if not line.startswith("Warning:")] == [lines[-1]], result.output
    assert lines[-1].startswith("Error: ") and message in lines[-1]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ------------------------------------------------------------------------------------------ finetune


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_finetune_on_the_salted_folder_skips_and_lists_broken_files(tmp_path, salted, monkeypatch):
    data_before = _snapshot(salted)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    with pytest.warns(UserWarning, match="`empty_class`"):
        result = tltool.finetune(data=salted, out=tmp_path / "run", overrides=tiny_values(32), verbose=0)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    skipped = {Path(s["path"]).relative_to(salted).as_posix(): s for s in summary["skipped_files"]}
    assert set(skipped) == {f"red/{name}" for name in BROKEN_KINDS} | {"empty_class/zero.png"}
    for name, kind in BROKEN_KINDS.items():
        assert skipped[f"red/{name}"]["kind"] == kind and skipped[f"red/{name}"]["reason"]
    assert summary["classes"] == ["blue", "red"]
    # Every readable image is counted, none of the broken ones (the truncated JPEG is found only when decoding).
    assert summary["images"]["train"] + summary["images"]["val"] == 7 + 18
    assert result.summary == summary
    # Nothing written next to the images or in the working directory.
    assert _snapshot(salted) == data_before
    assert list(workdir.iterdir()) == []


# ------------------------------------------------------------------------------------------ safety


#: The only yaml names the package may use: YAML is read with safe_load alone (no object construction).
YAML_ALLOWED = {"safe_load", "safe_load_all", "safe_dump", "safe_dump_all", "YAMLError"}
#: Modules that turn bytes into arbitrary objects (or run code) when loading.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib", "ruamel",
                  "jsonpickle"}


#: Functions that deserialize files: the ones that take `safe_mode` or `allow_pickle`.
LOADERS = {"load", "load_model", "load_weights", "deserialize_keras_object"}


def _called_name(call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def unsafe_loading(source: str, name: str = "<source>") -> list[str]:
    """Every unsafe load in one module's source, as `name:line: what` (an AST scan, so comments don't count).

    Flags: any use of a yaml name outside YAML_ALLOWED (yaml.load, full_load, unsafe_load, Loader classes,
    `from yaml import load`, star imports), imports of pickle-like modules, an `allow_pickle` that is not
    the constant False, a `safe_mode` that is not the constant True, Keras's enable_unsafe_deserialization,
    pandas' read_pickle, and calls of eval / exec.
    """
    tree = ast.parse(source, filename=name)
    yaml_names = set()
    found = []

    def flag(node, what):
        found.append(f"{name}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == "yaml":
                    yaml_names.add(alias.asname or "yaml")
                if top in UNSAFE_MODULES:
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top in UNSAFE_MODULES:
                flag(node, f"from {node.module} import ...")
            if top == "yaml":
                for alias in node.names:
                    if alias.name not in YAML_ALLOWED:
                        flag(node, f"from yaml import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in yaml_names and node.attr not in YAML_ALLOWED:
                flag(node, f"{node.value.id}.{node.attr}")
            if node.attr in ("enable_unsafe_deserialization", "read_pickle"):
                flag(node, node.attr)
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "__import__"):
                flag(node, f"{node.func.id}()")
            for keyword in node.keywords:
                value = keyword.value.value if isinstance(keyword.value, ast.Constant) else "<not a constant>"
                if keyword.arg == "allow_pickle" and value is not False:
                    flag(node, f"allow_pickle={value}")
                if keyword.arg == "safe_mode" and value is not True:
                    flag(node, f"safe_mode={value}")
                if keyword.arg is None and _called_name(node) in LOADERS:  # **options could hide either
                    flag(node, f"{_called_name(node)}(**...) (could switch safe_mode or allow_pickle)")
        elif isinstance(node, ast.Constant) and node.value in ("safe_mode", "allow_pickle"):
            flag(node, f"{node.value!r} as a string (a keyword built at run time)")
    return found


@pytest.mark.parametrize("snippet", [
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.full_load(text)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml as y\ny.load(text, y.Loader)",
    "from yaml import load",
    "from yaml import *",
    "from yaml import safe_load, FullLoader",
    "import pickle",
    "from pickle import loads",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import numpy as np\nnp.load(path, allow_pickle=flag)",
    "keras.models.load_model(path, safe_mode=False)",
    "keras.config.enable_unsafe_deserialization()",
    "eval(text)",
    "np.load(path, **options)",
])
def test_unsafe_loading_scan_flags(snippet):
    assert unsafe_loading(snippet), snippet


def test_unsafe_loading_scan_accepts_safe_reads():
    safe = ("import yaml\nimport numpy as np\n# yaml.load(...) in a comment, 'pickle' in prose\n"
            "raw = yaml.safe_load(text)\nyaml.safe_dump(raw)\nnp.load(p, mmap_mode='r')\n"
            "np.load(p, allow_pickle=False)\nkeras.models.load_model(p, compile=False, safe_mode=True)\n"
            "try:\n    pass\nexcept yaml.YAMLError:\n    pass\n")
    assert unsafe_loading(safe) == []


def test_package_has_no_unsafe_loading():
    files = sorted(PACKAGE.rglob("*.py"))
    # The scan reaches every subpackage (data, models, engine, ...), not just the top-level modules.
    packages = {p.parent for p in PACKAGE.rglob("__init__.py")}
    assert {p.parent for p in files} == packages and len(packages) >= 7
    offenders = []
    yaml_reads = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        relative = path.relative_to(PACKAGE).as_posix()
        offenders += unsafe_loading(source, relative)
        yaml_reads += [relative for line in source.splitlines() if "yaml.safe_load(" in line]
    assert offenders == []
    # The scan sees the package's YAML reads: the recipe loader's and the search's (in a subpackage).
    assert {"recipe.py", "commands/tune.py"} <= set(yaml_reads)
