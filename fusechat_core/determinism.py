"""The same address gives the same bytes under any runner: what the runner could change, pinned.

A task runner changes the process a stage computes in: the thread runner shares the
flow's process (torch's default: a thread per core), a Dask worker process is started
with ``OMP_NUM_THREADS=1``. CPU kernels split their reductions by thread count, so the
same stage made different bytes under the two (the demo models' margins moved by up to
1e-4). Every stage's compute calls :func:`pin_compute` first, in the thread that computes
(torch's OpenMP thread count is per calling thread), so the count is the stage's, not
the runner's: one intra-op thread (parallelism comes from running stages and shards side
by side), deterministic kernels where torch has a choice, no cuDNN autotuning.
"""

from __future__ import annotations

import os

COMPUTE_THREADS = 1

# cuBLAS is deterministic only with a fixed workspace, read when CUDA starts: set it before.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pin_compute() -> None:
    import torch

    torch.set_num_threads(COMPUTE_THREADS)  # global, and this thread's OpenMP count
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
