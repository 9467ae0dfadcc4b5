import pytest

from momoe.data import load_dataset
from tests.train.helpers import make_dataset_root, single_thread  # noqa: F401  (a fixture)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A tiny dataset root (train, validation, tokenizer) shared by the training tests (read-only)."""
    return make_dataset_root(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture
def train_data(data_root):
    return load_dataset(data_root, "train")


@pytest.fixture
def validation_data(data_root):
    return load_dataset(data_root, "validation")
