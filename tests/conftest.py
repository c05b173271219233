import os

import pytest
import torch

# Tests run on 2 cores, often beside pytest-xdist workers: one intra-op thread per process avoids
# the oversubscription that makes small ops 10x slower.
torch.set_num_threads(1)


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
