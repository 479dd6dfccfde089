"""`tltool cache`: what the feature cache holds, pruning rows of changed files, clearing old entries."""

import os
import time

import numpy as np
from click.testing import CliRunner

from tltool.engine.cache_upkeep import cache_entries
from tltool.cli import main
from tltool.engine.features import LAST_USED_FILE, FeatureCache, file_key


def make_entry(root, name, files):
    cache = FeatureCache(root / name)
    rows = np.arange(len(files) * 4, dtype=np.float16).reshape(len(files), 4)
    cache.add([file_key(str(f)) for f in files], rows)
    return rows


def test_info_prune_and_clear(tmp_path):
    images = [tmp_path / f"img{i}.jpg" for i in range(3)]
    for f in images:
        f.write_bytes(b"original")
    root = tmp_path / "cache"
    rows = make_entry(root, "mobilenet_v2-96-aaaaaaaaaaaaaaaa", images)
    make_entry(root, "vgg16-64-bbbbbbbbbbbbbbbb", images[2:])
    images[1].write_bytes(b"changed content")  # a new size: its cached row no longer applies
    images[2].unlink()
    runner = CliRunner()

    info = runner.invoke(main, ["cache", "info", "--dir", str(root)])
    assert info.exit_code == 0, info.output
    assert "(2 entries," in info.output and "tltool cache prune" in info.output
    entry = {e.path.name: e for e in cache_entries(root)}["mobilenet_v2-96-aaaaaaaaaaaaaaaa"]
    assert (entry.rows, entry.stale_rows) == (3, 2)

    pruned = runner.invoke(main, ["cache", "prune", "--dir", str(root)])
    assert pruned.exit_code == 0 and "Dropped 3 stale rows" in pruned.output  # 2 here, 1 in vgg16's entry
    # vgg16's entry held only the deleted file: it goes as a whole.
    assert [(e.path.name, e.rows, e.stale_rows) for e in cache_entries(root)] == [("mobilenet_v2-96-aaaaaaaaaaaaaaaa", 1, 0)]
    kept = FeatureCache(root / "mobilenet_v2-96-aaaaaaaaaaaaaaaa")
    np.testing.assert_array_equal(kept.get([file_key(str(images[0]))]), rows[:1])

    refused = runner.invoke(main, ["cache", "clear", "--dir", str(root)])
    assert refused.exit_code == 2 and "Would remove 1 entries" in refused.output and "--force" in refused.output
    assert len(cache_entries(root)) == 1


def test_clear_touches_only_cache_entries(tmp_path):
    image = tmp_path / "img.jpg"
    image.write_bytes(b"x")
    root = tmp_path / "cache"
    make_entry(root, "mobilenet_v2-96-aaaaaaaaaaaaaaaa", [image])
    (root / "my-photos").mkdir()  # a --dir pointed one level too high must not cost the user anything
    (root / "my-photos" / "cat.jpg").write_bytes(b"meow")
    result = CliRunner().invoke(main, ["cache", "clear", "--dir", str(root), "--force"])
    assert result.exit_code == 0 and "Removed 1 entries" in result.output
    assert (root / "my-photos" / "cat.jpg").read_bytes() == b"meow"


def test_cache_errors_are_one_line(tmp_path, monkeypatch):
    import shutil

    image = tmp_path / "img.jpg"
    image.write_bytes(b"x")
    root = tmp_path / "cache"
    make_entry(root, "mobilenet_v2-96-aaaaaaaaaaaaaaaa", [image])

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    result = CliRunner().invoke(main, ["cache", "clear", "--dir", str(root), "--force"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "Could not remove the feature cache at" in result.output and "Permission denied" in result.output


def test_clear_older_than_keeps_recent_entries(tmp_path):
    image = tmp_path / "img.jpg"
    image.write_bytes(b"x")
    root = tmp_path / "cache"
    make_entry(root, "resnet50-96-aaaaaaaaaaaaaaaa", [image])
    make_entry(root, "resnet50-96-bbbbbbbbbbbbbbbb", [image])
    month_ago = time.time() - 30 * 86400
    os.utime(root / "resnet50-96-aaaaaaaaaaaaaaaa" / LAST_USED_FILE, (month_ago, month_ago))
    result = CliRunner().invoke(main, ["cache", "clear", "--dir", str(root), "--older-than", "7", "--force"])
    assert result.exit_code == 0 and "Removed 1 entries" in result.output
    assert [e.path.name for e in cache_entries(root)] == ["resnet50-96-bbbbbbbbbbbbbbbb"]
