"""Shared test set-up: tiny models run fastest on one thread (2 shared cores here); no progress bars."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLPMEM_NO_PROGRESS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the CLI's --threads null then leaves one thread (below), as do subprocesses
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch and one FAISS thread: on tiny problems more threads only add stalls when the shared cores are busy."""
    import faiss

    old = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(old[0])
    faiss.omp_set_num_threads(old[1])
