import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# One thread per process: the tests run in two pytest-xdist workers and many start subprocesses (torchrun starts
# two), so a process that takes a thread per core (torch, OpenMP/MKL, the tokenizers' Rayon pool) oversubscribes
# the cores many times over on a loaded machine; subprocesses inherit these variables.
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(variable, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402 (after the variables, which it reads at import)

torch.set_num_threads(1)
torch.set_num_interop_threads(1)
