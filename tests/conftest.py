import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# The session's own folders, made before any test module is imported: Keras reads KERAS_HOME once, when
# it is first imported (keras/src/backend/config.py), so it must be in the environment by then. It holds
# keras.json and whatever keras.utils.get_file would download (weights, datasets): no test reads or fills
# ~/.keras. The session feature cache is what session-scoped fixtures see (no test uses ~/.cache/tltool).
# tests/test_isolation.py checks both, and fails if something imported keras before this file ran.
SESSION_DIR = tempfile.mkdtemp(prefix="tltool-tests-")
KERAS_HOME = os.path.join(SESSION_DIR, "keras-home")
os.makedirs(KERAS_HOME)
os.environ["KERAS_HOME"] = KERAS_HOME
os.environ["TLTOOL_CACHE_DIR"] = os.path.join(SESSION_DIR, "feature-cache")
atexit.register(shutil.rmtree, SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _module_feature_cache(tmp_path_factory):
    """Each test module's own feature cache, for its module-scoped fixtures (runs shared by its tests)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLTOOL_CACHE_DIR", str(tmp_path_factory.mktemp("module-feature-cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Every test gets its own feature cache; the session has its own Keras home (KERAS_HOME above).

    No test sees another's cached features, and none reads or writes ~/.keras (downloaded weights,
    keras.json) or ~/.cache/tltool. The Keras home is per session, not per test, because Keras reads it
    only when it is imported.
    """
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))
    monkeypatch.setenv("KERAS_HOME", KERAS_HOME)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A 3-class folder of 8 small images per class (read-only: copy it before changing it)."""
    from helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images"))
