"""Dataset wrappers: `Degraded` (adds `lq` to HQ-only samples) and `WeightedConcat` (mixes one task's sets).

Both pass on "virtual" indices: an index past a dataset's length reads sample `index % len` with fresh
randomness (crop, degradation), so a set repeated k times per epoch gives k different views of each image.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from ..degrade import Degrader
from .sample import Sample


def _set_epoch(dataset: Dataset, epoch: int) -> None:
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


class Degraded(Dataset):
    """Adds `lq`, `corruption` and `severity` to each sample of `dataset`, made from its `hq` by `degrader`.

    The degradation of sample `index` depends on (degrader.seed, epoch, index) only: the same in the main
    process and in every DataLoader worker. Samples that already carry an `lq` (paired sets) pass unchanged.
    """

    def __init__(self, dataset: Dataset, degrader: Degrader | None = None):
        self.dataset = dataset
        self.degrader = degrader or Degrader()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Draw new degradations (and crops) for `epoch`; call before creating the DataLoader iterator."""
        self.epoch = epoch
        _set_epoch(self.dataset, epoch)

    def __getitem__(self, index: int) -> Sample:
        sample = self.dataset[index]
        if "lq" in sample:
            return sample
        result = self.degrader(sample["hq"], index, self.epoch)
        return {
            **sample,
            "lq": result.image,
            "corruption": result.degradation.corruption,
            "severity": result.degradation.severity,
        }


class WeightedConcat(Dataset):
    """The datasets of one task, each repeated by its weight: dataset i gives max(1, round(len_i * w_i))
    samples per epoch (the release's meaning of ImageNet 0.2, Cityscapes 10, DIV2K 1).

    Weight < 1 takes a different subset each epoch; weight > 1 repeats each image with fresh randomness.
    Which image fills which position is a fixed pseudo-random permutation per (seed, epoch, dataset); shuffle
    the result with the DataLoader's sampler as usual. `set_epoch` moves every part to a new epoch.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float] | None = None, seed: int = 0):
        if not datasets:
            raise ValueError("WeightedConcat needs at least one dataset")
        weights = [1.0] * len(datasets) if weights is None else [float(w) for w in weights]
        if len(weights) != len(datasets):
            raise ValueError(f"got {len(datasets)} datasets but {len(weights)} weights")
        if any(not w > 0 for w in weights):
            raise ValueError(f"weights must be positive, got {weights}")
        self.datasets, self.weights, self.seed = list(datasets), weights, seed
        self.sizes = [len(d) for d in self.datasets]
        if any(size == 0 for size in self.sizes):
            raise ValueError(f"a dataset is empty (sizes {self.sizes})")
        self.counts = [max(1, round(size * w)) for size, w in zip(self.sizes, weights, strict=True)]
        self.offsets = np.cumsum([0, *self.counts]).tolist()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._permutations = []  # (a, b): position r -> (a r + b) mod len, a coprime to len: a bijection
        for i, size in enumerate(self.sizes):
            rng = np.random.default_rng([self.seed, epoch, i])
            a = int(rng.integers(1, size)) if size > 1 else 1
            while math.gcd(a, size) != 1:
                a += 1
            self._permutations.append((a, int(rng.integers(size))))
            _set_epoch(self.datasets[i], epoch)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, virtual index inside it) of position `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for WeightedConcat of length {len(self)}")
        i = bisect.bisect_right(self.offsets, index) - 1
        cycle, position = divmod(index - self.offsets[i], self.sizes[i])
        a, b = self._permutations[i]
        return i, cycle * self.sizes[i] + (a * position + b) % self.sizes[i]

    def __getitem__(self, index: int) -> Sample:
        i, inner = self.locate(index)
        return self.datasets[i][inner]
