import os

import pytest
import torch

# Tests run on 2 cores, often beside pytest-xdist workers: one intra-op thread per process avoids
# the oversubscription that makes small ops 10x slower.
torch.set_num_threads(1)
# and the comparison's evaluation, which takes every core when it has the machine to itself, one too
os.environ.setdefault("GENBENCH_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Never the user's cache: each test process trains (and caches) the feature and perceptual
    networks in a GENBENCH_CACHE of its own, inherited by the processes it starts."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GENBENCH_CACHE", str(tmp_path_factory.mktemp("genbench-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def digits():
    from genbench.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_digits():
    from genbench.data import load_dataset

    return load_dataset("digits", limit=256)
