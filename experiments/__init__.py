"""The benchmarks and experiments, each run as `python -m unirestore.experiments.<name>`."""

import os

# Idle OpenMP threads sleep instead of spinning, as the CLI sets it: on a small CPU that another process shares
# (the built-in downstream models' training, or any other job), spinning threads slow small ops many times over.
# Set here, before any experiment imports torch and its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
