import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Keras reads KERAS_HOME once, when it is first imported (keras/src/backend/config.py): the session's own
# Keras home must be in the environment before any test module imports keras. It holds keras.json and
# whatever keras.utils.get_file would download (weights, datasets), so no test reads or fills ~/.keras.
# (tests/test_isolation.py fails if something imported keras before this file could set it.)
KERAS_HOME = tempfile.mkdtemp(prefix="tltool-tests-keras-home-")
os.environ["KERAS_HOME"] = KERAS_HOME
atexit.register(shutil.rmtree, KERAS_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Every test gets its own feature cache; the session has its own Keras home (KERAS_HOME above).

    No test sees another's cached features, and none reads or writes ~/.keras (downloaded weights,
    keras.json). The Keras home is per session, not per test, because Keras reads it only at import.
    """
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
    monkeypatch.setenv("KERAS_HOME", KERAS_HOME)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A 3-class folder of 8 small images per class (read-only: copy it before changing it)."""
    from helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images"))
