"""The test session's isolation from the user's files: its own Keras home (see conftest.py)."""

import os
import tempfile
from pathlib import Path


def test_keras_home_is_the_sessions_own_temporary_folder(tmp_path):
    import keras
    from keras.src.backend import config

    home = Path(config.keras_home()).resolve()
    user_home = (Path.home() / ".keras").resolve()
    assert home != user_home
    assert home == Path(os.environ["KERAS_HOME"]).resolve()
    assert Path(tempfile.gettempdir()).resolve() in home.parents
    # Where Keras caches what it downloads (weights, datasets) by default: a file:// "download" lands in the
    # session's Keras home, not in ~/.keras.
    source = tmp_path / "tltool-isolation-probe.txt"
    source.write_text("probe")
    fetched = Path(keras.utils.get_file(source.name, origin=source.as_uri())).resolve()
    assert fetched.parent.parent == home and fetched.read_text() == "probe"
    assert not (user_home / "datasets" / source.name).exists()
