"""Resuming reproduces the uninterrupted run exactly (single process, CPU).

Three things decide what a training step sees, and each is made a function of the checkpoint:

- data order: `EpochSampler` draws the permutation of epoch e from its own generator seeded by
  (seed, e), and on resume skips the samples the interrupted epoch already consumed (the count is
  stored in the checkpoint by `ExactResume`). Lightning calls `set_epoch` with the restored epoch.
- augmentation: `SeededSamples` makes each training sample a pure function of (seed, epoch,
  index): its transform runs under torch/numpy/python RNGs seeded from those three numbers
  (forked: the global RNGs are untouched), so prefetching and data workers do not matter.
- the model's own randomness (dropout, drop-path, mixup): the global RNG states (torch, numpy,
  python) are stored in each checkpoint and restored before the first resumed step.

The schedule (LR from the global step), optimizer, EMA and best top-1 are restored by Lightning
and LabModule. Distributed (DDP) training keeps Lightning's own sampler (no skipping).
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def mix_seeds(*xs: int) -> int:
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFF


class ResumePoint:
    """Shared between the datamodule's sampler and the ExactResume callback: samples to skip once."""

    def __init__(self) -> None:
        self.skip_samples = 0


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs: a permutation fixed by (seed, epoch); skips `point.skip_samples` once."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, point: Optional[ResumePoint] = None):
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.epoch = 0
        self.point = point

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seeds(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        skip = 0
        if self.point is not None and self.point.skip_samples:
            skip, self.point.skip_samples = min(self.point.skip_samples, self.n), 0
        e = self.epoch
        for i in order[skip:]:
            yield (e, i)


class SeededSamples(Dataset):
    """Wraps a dataset indexed by (epoch, index): every sample is drawn under RNGs seeded by (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        """A batch: global RNG states saved and restored once, each sample drawn under its own seeds."""
        gen = torch.default_generator
        st, py, npst = gen.get_state(), random.getstate(), np.random.get_state()
        try:
            out = []
            for key in keys:
                if not isinstance(key, tuple):
                    out.append(self.dataset[key])
                    continue
                epoch, index = key
                s = mix_seeds(self.seed, epoch, index)
                gen.manual_seed(s)
                random.seed(s)
                np.random.seed(s)
                out.append(self.dataset[index])
            return out
        finally:
            gen.set_state(st)
            random.setstate(py)
            np.random.set_state(npst)


def capture_rng() -> dict[str, Any]:
    """Global RNG states as tensors and plain lists (what a weights_only checkpoint load accepts)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, pygauss = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ],
        "python": [int(version), list(internal), pygauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, pygauss = st["python"]
    random.setstate((version, tuple(internal), pygauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class ExactResume(pl.Callback):
    """Stores RNG states and the samples consumed in the current epoch in each checkpoint; restores them."""

    def __init__(self, point: Optional[ResumePoint], batch_size: int):
        self.point, self.batch_size = point, int(batch_size)
        self._rng: Optional[dict[str, Any]] = None

    def state_key(self) -> str:  # one entry in checkpoint["callbacks"]
        return "ExactResume"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        consumed = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        if consumed >= trainer.num_training_batches:  # the epoch is over: the next one starts afresh
            consumed = 0
        checkpoint["lab_resume"] = {"rng": capture_rng(), "consumed_batches": consumed}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        st = checkpoint.get("lab_resume")
        if not st:
            return
        self._rng = st["rng"]
        if self.point is not None:
            self.point.skip_samples = int(st["consumed_batches"]) * self.batch_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._rng is not None:
            restore_rng(self._rng)
            self._rng = None
