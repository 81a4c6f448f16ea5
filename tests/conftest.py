"""Shared test set-up: tiny models run fastest on one thread (2 shared cores here); no progress bars."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLPMEM_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="session")
def _one_faiss_thread():
    """Tiny problems: FAISS' OpenMP threads only add stalls when the shared cores are busy."""
    import faiss

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(old)
