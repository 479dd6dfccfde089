"""Folder scanning, seeded stratified splits and class weights."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import make_image_folder
from tltool.data.folders import ImageFolder, balanced_class_weights, scan_folder, stratified_split
from tltool.errors import DataError


def test_scan_lists_classes_in_order_and_ignores_hidden_and_non_images(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "red" / ".hidden.jpg").write_bytes(b"junk")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / ".git").mkdir()
    folder = scan_folder(root)
    assert folder.classes == ["blue", "green", "red"]
    assert folder.counts() == {"blue": 3, "green": 3, "red": 3}


def test_unreadable_file_is_skipped_with_its_reason(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "red" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "red" / "moved.jpg").symlink_to(tmp_path / "no-longer-here.jpg")  # a dangling link
    from tltool.data.folders import SkipLog

    skips = SkipLog()
    folder = scan_folder(root, skips)
    assert len(folder) == 9
    reasons = {entry["path"].rsplit("/", 1)[-1]: entry["reason"] for entry in skips.as_list()}
    assert reasons == {"broken.jpg": "not an image (unrecognised content)", "empty.png": "empty file (0 bytes)",
                       "moved.jpg": "file not found (a dangling link, or deleted while reading)"}


def test_missing_folder_and_single_class_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope")
    root = make_image_folder(tmp_path / "one", classes=("red",), per_class=3)
    with pytest.raises(DataError, match="at least 2 are needed"):
        scan_folder(root)


def test_validation_folder_with_unknown_class_is_rejected(tmp_path, image_folder):
    val = make_image_folder(tmp_path / "val", classes=("red", "purple"), per_class=2)
    train = scan_folder(image_folder)
    with pytest.raises(DataError, match="has classes the training data does not: purple"):
        scan_folder(val, classes=train.classes, role="validation")


def test_split_is_stratified_deterministic_and_disjoint(image_folder):
    folder = scan_folder(image_folder)
    train_a, val_a = stratified_split(folder, 0.25, seed=3)
    train_b, val_b = stratified_split(folder, 0.25, seed=3)
    assert val_a.paths == val_b.paths and train_a.paths == train_b.paths
    assert set(train_a.paths).isdisjoint(val_a.paths)
    assert len(train_a) + len(val_a) == len(folder)
    assert val_a.counts() == {"blue": 2, "green": 2, "red": 2}
    _, val_c = stratified_split(folder, 0.25, seed=4)
    assert val_c.paths != val_a.paths


def _in_order(folder: ImageFolder, order) -> ImageFolder:
    """The same files and labels as `folder`, listed in `order`."""
    return ImageFolder(folder.root, folder.classes, [folder.paths[i] for i in order],
                       [folder.labels[i] for i in order])


def _names(part: ImageFolder) -> set:
    return {(Path(p).parent.name, Path(p).name) for p in part.paths}


@pytest.mark.parametrize("group_by", [None, r"_(\d+)\."])
def test_split_does_not_depend_on_scan_order(image_folder, tmp_path, group_by):
    folder = scan_folder(image_folder)
    train, val = stratified_split(folder, 0.25, seed=1, group_by=group_by)
    assert len(val) >= 3 and len(train) + len(val) == len(folder)
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(folder)) for _ in range(3)] + [np.arange(len(folder))[::-1]]
    for order in orders:
        listed = _in_order(folder, order)
        assert listed.paths != folder.paths and sorted(listed.paths) == sorted(folder.paths)
        other_train, other_val = stratified_split(listed, 0.25, seed=1, group_by=group_by)
        assert _names(other_val) == _names(val) and _names(other_train) == _names(train)
    # The same files under another root, written in the reverse order (other creation times and inodes).
    copy = tmp_path / "elsewhere" / "copy"
    for path in sorted(image_folder.rglob("*.*"), reverse=True):
        target = copy / path.relative_to(image_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    other_train, other_val = stratified_split(scan_folder(copy), 0.25, seed=1, group_by=group_by)
    assert _names(other_val) == _names(val) and _names(other_train) == _names(train)


def test_group_by_keeps_groups_together(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=8)
    for folder in root.iterdir():  # rename to objNN_view so that pairs of files share an object id
        for i, path in enumerate(sorted(folder.iterdir())):
            path.rename(path.with_name(f"obj{i // 2:02d}_view{i % 2}{path.suffix}"))
    train, val = stratified_split(scan_folder(root), 0.25, seed=0, group_by=r"^(obj\d+)_")
    groups = lambda part: {(p.split("/")[-2], p.rsplit("/", 1)[-1][:5]) for p in part.paths}  # noqa: E731
    assert groups(train).isdisjoint(groups(val))
    assert all(n == 2 for n in val.counts().values())


def test_balanced_class_weights():
    weights = balanced_class_weights([0, 0, 0, 1], 2)
    assert weights == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}


def test_held_out_folders_holding_training_images_are_refused_or_flagged(tmp_path, image_folder):
    """Validation (or test) images that are training images measure memory: the training folder itself is
    refused with what to do, a folder sharing some of them gets a warning with the count."""
    from tltool.engine.setup import load_split_data
    from tltool.recipe import from_dict

    def split(**data):
        return load_split_data(from_dict({"data": {"train": str(image_folder), **data}}))

    with pytest.raises(DataError, match=r"--val-data .* holds training images only.*leave --val-data out"):
        split(val=str(image_folder))
    with pytest.raises(DataError, match=r"--test-data .* holds training images only"):
        split(test=str(image_folder))
    mixed = make_image_folder(tmp_path / "val", per_class=2)
    for klass in ("red", "blue"):  # one training image linked into two of the classes
        (mixed / klass / "shared.png").symlink_to(sorted((image_folder / klass).iterdir())[0])
    with pytest.warns(UserWarning, match=r"2 of the 8 validation images are training images too"):
        split(val=str(mixed))
    shutil.rmtree(mixed / "red")
    shutil.rmtree(mixed / "blue")
    clean = split(val=str(mixed))  # no warning, no error: nothing shared
    assert len(clean.val.paths) == 2


def test_a_class_named_like_predicts_unknown_label_is_flagged(tmp_path):
    from tltool.engine.setup import load_split_data
    from tltool.recipe import from_dict

    data = make_image_folder(tmp_path / "data", classes=("unknown", "red"), per_class=4)
    with pytest.warns(UserWarning, match=r"A class is named 'unknown'.*reason"):
        load_split_data(from_dict({"data": {"train": str(data)}}))
