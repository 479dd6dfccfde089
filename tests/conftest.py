import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Every test gets its own feature cache and Keras home: no test sees another's files or the network cache."""
    monkeypatch.setenv("TLTOOL_CACHE_DIR", str(tmp_path_factory.mktemp("feature-cache")))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A 3-class folder of 8 small images per class (read-only: copy it before changing it)."""
    from helpers import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("images"))
