"""Training data: the case split (``cases.model_split``), slice datasets, the step sampler that
makes the data order a pure function of (seed, step)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Sampler

from .. import data as mdata
from ..cases import model_split
from .config import DataConfig


def case_splits(cfg: DataConfig, paired: bool) -> dict[str, list[Path]]:
    """Case folders under ``cfg.root`` split into train / val / test: ``cases.model_split``
    (the split evaluation uses too) with ``cfg.split`` and ``cfg.split_seed``."""
    splits = model_split(cfg.root, cfg.source, cfg.target, paired=paired, ratios=cfg.split, seed=cfg.split_seed)
    if not splits["train"]:
        n = sum(len(v) for v in splits.values())
        raise ValueError(f"{cfg.root}: no training cases ({n} cases, split {list(cfg.split)})")
    return splits


def build_datasets(cfg: DataConfig, paired: bool, splits: Mapping[str, Sequence[Path]],
                   names: Sequence[str] = ("train", "val")) -> dict[str, Dataset]:
    """Slice datasets of the named splits. Training is paired or unpaired as asked; validation
    and test are always paired (metrics need the reference). Empty splits are left out."""
    common = {"source": cfg.source, "target": cfg.target, "source_preset": cfg.source_preset,
              "target_preset": cfg.target_preset, "spec": cfg.slice_spec(), "masks": tuple(cfg.masks)}
    out: dict[str, Dataset] = {}
    for name in names:
        if not splits.get(name):
            warnings.warn(f"{cfg.root}: the {name} split has no cases", stacklevel=2)
        elif name == "train" and not paired:
            out[name] = mdata.UnpairedSliceDataset(splits[name], seed=cfg.split_seed, **common)
        else:
            out[name] = mdata.PairedSliceDataset(splits[name], **common)
    return out


class StepSampler(Sampler[int]):
    """Dataset indices for training steps ``start() .. total_steps - 1``, resumable at any step.

    The global sample stream is a fresh permutation of the dataset per pass, drawn from
    ``(seed, pass)``; step ``s`` on rank ``r`` of ``world`` takes positions
    ``(s * world + r) * batch_size ...`` of that stream. So the indices of a step depend on
    (seed, step, rank) only, and a resumed run sees exactly the batches of the uninterrupted one.
    ``start`` (an int or a callable giving the steps already done) is read at every ``iter()``.
    ``len()`` is always ``total_steps * batch_size``: Lightning's batch counters already hold the
    consumed part when it resumes mid-stream."""

    def __init__(self, n: int, batch_size: int, total_steps: int, seed: int, *, rank: int = 0,
                 world: int = 1, start: int | Callable[[], int] = 0) -> None:
        if n < 1:
            raise ValueError("StepSampler: empty dataset")
        self.n, self.batch_size, self.total_steps = n, batch_size, total_steps
        self.seed, self.rank, self.world, self.start = seed, rank, world, start
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.total_steps * self.batch_size

    def _index(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n))
        return int(self._perm[1][k])

    def __iter__(self) -> Iterator[int]:
        start = self.start() if callable(self.start) else self.start
        for step in range(start, self.total_steps):
            first = (step * self.world + self.rank) * self.batch_size
            for position in range(first, first + self.batch_size):
                yield self._index(position)


def _preparation_batches(ds: Dataset, batch_size: int) -> Iterator[dict]:
    """Collated batches over the training set in a fixed shuffled order (its own seeded RNG, not
    the global one), made lazily: ``prepare_training`` takes as many as it needs."""
    from torch.utils.data import default_collate

    n = len(ds)
    order = np.random.default_rng(0).permutation(n).tolist()
    for k in range(0, n, batch_size):
        yield default_collate([ds[i] for i in order[k:k + batch_size]])
