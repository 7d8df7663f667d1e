"""A ``torch.utils.data.Sampler`` that yields a soft-sampled subset of a scored pool.

Plain PyTorch::

    sampler = CircuitSeerSampler(scores, fraction=0.1, tau=0.5, seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)

Hugging Face ``Trainer`` / TRL ``SFTTrainer`` (the one line to add)::

    trainer = SFTTrainer(model=..., train_dataset=pool, ...)
    use_sampler(trainer, CircuitSeerSampler(scores, fraction=0.1))   # <- this line
    trainer.train()

Under ``Trainer`` the batches are split across processes by accelerate, so :func:`use_sampler`
makes the sampler yield the whole selection on every process (each process then trains on a
disjoint share of the batches). With a plain ``DataLoader`` in a ``torchrun`` job the sampler
itself gives each rank a disjoint share (every ``num_replicas``-th index of the shuffled
selection, trimmed to equal length so no rank waits for another).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..mixins import add_mixin
from .sampling import DEFAULT_TAU, select_indices, subset_size


class CircuitSeerSampler(Sampler[int]):
    """Yields the indices of the selected subset of a pool.

    Args:
        scores: one score per pool row (higher = more wanted).
        fraction / k: subset size (fraction of the pool, or an exact count).
        tau, seed: Gumbel-top-k temperature and seed (see :func:`select_indices`).
        redraw_each_epoch: draw a new subset each epoch (seed + epoch) instead of one fixed subset.
        shuffle: shuffle the subset's order each epoch (else ascending pool order).
        num_replicas, rank: distributed share (default: from ``torch.distributed`` if started).
    """

    def __init__(
        self,
        scores: Sequence[float],
        fraction: float | None = 0.1,
        k: int | None = None,
        tau: float = DEFAULT_TAU,
        seed: int = 0,
        redraw_each_epoch: bool = False,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.k = subset_size(len(self.scores), fraction, k)
        self.tau, self.seed = tau, seed
        self.redraw_each_epoch, self.shuffle = redraw_each_epoch, shuffle
        if num_replicas is None or rank is None:
            started = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = num_replicas or (torch.distributed.get_world_size() if started else 1)
            rank = rank if rank is not None else (torch.distributed.get_rank() if started else 0)
        self.set_replicas(num_replicas, rank)
        self.epoch = 0

    @classmethod
    def from_indices(cls, indices: Sequence[int], pool_size: int, **kwargs: Any) -> "CircuitSeerSampler":
        """A sampler over a fixed, already chosen subset (e.g. from a baseline selector)."""
        scores = np.full(pool_size, -np.inf)
        scores[np.asarray(indices, dtype=int)] = 0.0
        return cls(scores, k=len(set(int(i) for i in indices)), tau=0.0, **kwargs)

    def set_replicas(self, num_replicas: int, rank: int) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        if self.k < num_replicas:
            raise ValueError(f"a subset of {self.k} examples cannot be shared by {num_replicas} processes")
        self.num_replicas, self.rank = num_replicas, rank

    @property
    def pool_size(self) -> int:
        return len(self.scores)

    def set_epoch(self, epoch: int) -> None:
        """Called by Trainer / your loop each epoch: new order (and new subset with ``redraw_each_epoch``)."""
        self.epoch = int(epoch)

    def selected(self, epoch: int | None = None) -> np.ndarray:
        """Sorted pool indices selected for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        seed = self.seed + epoch if self.redraw_each_epoch else self.seed
        return select_indices(self.scores, k=self.k, tau=self.tau, seed=seed)

    def __iter__(self) -> Iterator[int]:
        sel = self.selected()
        if self.shuffle:
            sel = np.random.default_rng([self.seed, self.epoch, 1]).permutation(sel)
        per_rank = len(sel) // self.num_replicas
        mine = sel[self.rank : per_rank * self.num_replicas : self.num_replicas]
        return iter(int(i) for i in mine)

    def __len__(self) -> int:
        return self.k // self.num_replicas


class CircuitSeerSamplerMixin:
    """Trainer mixin (the way TRL's trainers do it): ``train_sampler=`` picks the training batches.

    ``class MyTrainer(CircuitSeerSamplerMixin, SFTTrainer)``, or the ready
    :class:`CircuitSeerTrainer` / ``CircuitSeerSFTTrainer``; ``_get_train_sampler`` returns the
    sampler and falls back to the parent's when none is set. The train dataset must be the scored
    pool, row for row (so no SFT packing).
    """

    def __init__(self, *args: Any, train_sampler: CircuitSeerSampler | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.train_sampler = None
        if train_sampler is not None:
            self.set_train_sampler(train_sampler)

    def set_train_sampler(self, sampler: CircuitSeerSampler) -> None:
        dataset = getattr(self, "train_dataset", None)
        if dataset is None or len(dataset) != sampler.pool_size:
            n = None if dataset is None else len(dataset)
            raise ValueError(
                f"the trainer's train_dataset has {n} rows but the sampler's scores cover {sampler.pool_size}: pass "
                "the scored pool itself as train_dataset (and turn SFT packing off, it changes the rows)"
            )
        sampler.set_replicas(1, 0)  # accelerate shards the batches across processes itself
        self.train_sampler = sampler

    def _get_train_sampler(self, *args: Any, **kwargs: Any):
        if getattr(self, "train_sampler", None) is not None:
            return self.train_sampler
        return super()._get_train_sampler(*args, **kwargs)


def _trainer_class():
    from transformers import Trainer

    class CircuitSeerTrainer(CircuitSeerSamplerMixin, Trainer):
        """``transformers.Trainer`` whose batches come from ``train_sampler=``."""

    return CircuitSeerTrainer


def _sft_trainer_class():
    from trl import SFTTrainer

    class CircuitSeerSFTTrainer(CircuitSeerSamplerMixin, SFTTrainer):
        """``trl.SFTTrainer`` whose batches come from ``train_sampler=``."""

    return CircuitSeerSFTTrainer


_LAZY = {"CircuitSeerTrainer": _trainer_class, "CircuitSeerSFTTrainer": _sft_trainer_class}


def __getattr__(name: str):  # transformers/TRL trainer classes are built when first asked for
    if name in _LAZY:
        cls = _LAZY[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def use_sampler(trainer: Any, sampler: CircuitSeerSampler) -> Any:
    """Make an existing ``transformers.Trainer`` (or TRL ``SFTTrainer``, any subclass) draw its training
    batches from ``sampler``; returns it. A thin convenience over :class:`CircuitSeerSamplerMixin`: the
    trainer becomes an instance of ``CircuitSeerSamplerMixin + its own class`` (no method is patched).
    """
    if add_mixin(trainer, CircuitSeerSamplerMixin, "CircuitSeer"):
        trainer.train_sampler = None
    trainer.set_train_sampler(sampler)
    return trainer
