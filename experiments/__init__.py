"""The benchmarks and experiments, each run as `python -m unirestore.experiments.<name>`."""

import os

# Idle OpenMP threads sleep instead of spinning, as the CLI sets it: on a small CPU that another process shares
# (the built-in downstream models' training, or any other job), spinning threads slow small ops many times over.
# Set here, before any experiment imports torch and its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # after the OpenMP setting above

# As the CLI does: values below float32's normal range count as zero (arithmetic on them is slow on some CPUs).
torch.set_flush_denormal(True)
