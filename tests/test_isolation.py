"""The test session's isolation from the user's files: its own Keras home and feature caches (conftest.py)."""

import os
import tempfile
from pathlib import Path

import pytest

TEMP = Path(tempfile.gettempdir()).resolve()


@pytest.fixture(scope="module")
def module_fixture_cache():
    """The feature cache a module-scoped fixture (a run shared by a module's tests) would write to."""
    from tltool.engine.features import cache_dir

    return cache_dir().resolve()


def test_keras_home_is_the_sessions_own_temporary_folder(tmp_path):
    import keras
    from keras.src.backend import config

    home = Path(config.keras_home()).resolve()
    user_home = (Path.home() / ".keras").resolve()
    assert home != user_home
    assert home == Path(os.environ["KERAS_HOME"]).resolve()
    assert TEMP in home.parents
    # Where Keras caches what it downloads (weights, datasets) by default: a file:// "download" lands in the
    # session's Keras home, not in ~/.keras.
    source = tmp_path / "tltool-isolation-probe.txt"
    source.write_text("probe")
    fetched = Path(keras.utils.get_file(source.name, origin=source.as_uri())).resolve()
    assert fetched.parent.parent == home and fetched.read_text() == "probe"
    assert not (user_home / "datasets" / source.name).exists()


def test_feature_caches_are_temporary_per_test_and_per_module(module_fixture_cache):
    from tltool.engine.features import cache_dir

    user_cache = (Path.home() / ".cache" / "tltool").resolve()
    this_test = cache_dir().resolve()
    for folder in (this_test, module_fixture_cache):
        assert TEMP in folder.parents and user_cache not in (folder, *folder.parents)
    assert this_test != module_fixture_cache
