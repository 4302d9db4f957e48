"""Which sample each process sees at each step, and where its randomness comes from.

Every random draw that depends on the data (the random-resized crop, the flip, the mask) is
seeded by `(run seed, epoch, dataset index)` alone. Two things follow:

- **World-size invariance**: one process with batch 2B and two processes with batch B each see
  the same samples with the same crops and masks; only the split differs. Multi-GPU runs are
  the same experiment as single-GPU runs with the same effective batch.
- **Exact resume**: the data stream is a pure function of the step count, so a resumed run
  skips to its position and continues with the very samples, crops and masks the interrupted
  run would have drawn. No generator state has to be saved for the data.

`EpochSampler` orders the dataset per epoch (a seeded permutation) and deals it to ranks like
`torch.utils.data.DistributedSampler` does, but can start mid-epoch. `SeededSamples` wraps a
dataset so that each item is drawn under its own seed and reports the unreadable files it had to
skip; `SeededLabeledSamples` does the same for fine-tuning's labeled folders. Both seed torch's,
Python's and NumPy's global generators per item (`seeded_draws`): timm's RandAugment, random
erasing and random-resized crop draw from Python's `random` and NumPy, torchvision's flip from
torch, and inside DataLoader workers those generators' states could never be saved or restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["seed_for", "seeded_draws", "draw_masks", "EpochSampler", "SeededSamples", "SeededLabeledSamples"]


def seed_for(*parts: int | str) -> int:
    """A 63-bit seed from any mix of ints and strings, identical in every process and run."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded_draws(seed: int) -> Iterator[None]:
    """Inside the block torch's, Python's and NumPy's global generators are seeded with `seed`;
    their previous states are restored after, so nothing else in the process is disturbed."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only, which is what data transforms draw from: `torch.manual_seed`
        # would seed every CUDA generator too (which fork_rng(devices=[]) does not restore),
        # and where CUDA is not initialised (DataLoader workers) it queues that call with a
        # captured stack trace, ~75 us a sample.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def draw_masks(masking, seed: int, epoch: int, indices: list[int]):
    """One mask per sample, seeded by (seed, epoch, index): independent of batch and world size.

    Args:
        masking: a `UniformMasking` / `RandomMasking` / `DisjointPartsMasking` (or anything called
            as `masking(1, generator)` returning a sample type with a `cat`).

    Returns:
        a `MaskSample` (a `PartsSample` for disjoint parts) of `len(indices)` images.
    """
    gen = torch.Generator()
    samples = [masking(1, generator=gen.manual_seed(seed_for(seed, "mask", epoch, i))) for i in indices]
    return type(samples[0]).cat(samples)


class EpochSampler(Sampler):
    """Per-epoch seeded permutation, dealt round-robin to `world_size` ranks; yields `(epoch, index)`.

    Batch b of rank r holds permutation positions `r + world_size * (b*B + j)`, so the union of
    the ranks' batch b is the single-process batch b of size `world_size * B`. The tail that does
    not fill a whole round of `world_size` samples is dropped, so every rank has the same length.

    Call `set_epoch(epoch, start)` before iterating; `start` skips that many of this rank's
    samples (resuming mid-epoch) without loading them.
    """

    def __init__(self, num_samples: int, seed: int, world_size: int = 1, rank: int = 0,
                 shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.shuffle = shuffle
        self.per_rank = num_samples // world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(seed_for(self.seed, "order", self.epoch))
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        mine = order[: self.per_rank * self.world_size][self.rank::self.world_size]
        for index in mine[self.start:].tolist():
            yield self.epoch, index


class SeededSamples(Dataset):
    """`dataset[(epoch, index)]` -> one training sample, drawn under seed `(seed, epoch, index)`.

    Returns a dict: `image` (the transformed image), `index`, `skipped` (newline-joined files the
    dataset had to pass over to find a readable image, "" when none: the training loop counts
    them across workers and ranks) and, when a `masking` is given, the sample's masks as the
    entries of `MaskSample.item()` (`mask` `[L]`, `ids_keep` `[L_vis]`, `secondary` `[L]` when
    the masking has secondary masking, the grid and the uniform flag; EMAE's `PartsSample` has a
    leading `K` axis, `[K, L]`, ...); the collated batch gives them back to the model through
    `masking.sample_type.from_batch(batch)`. Drawing masks here puts that CPU work in the
    DataLoader workers, overlapped with the model, instead of between steps.

    The wrapped dataset's transform draws from the global generators; they are seeded for this
    one item and restored (`seeded_draws`), so nothing else in the process is disturbed.
    """

    def __init__(self, dataset: Dataset, seed: int, masking=None):
        self.dataset = dataset
        self.seed = seed
        self.masking = masking

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded_draws(seed_for(self.seed, "augment", epoch, index)):
            if hasattr(self.dataset, "load"):
                image, skipped = self.dataset.load(index)
            else:
                image, skipped = self.dataset[index], []
        sample = {"image": image, "index": index, "skipped": "\n".join(str(p) for p in skipped)}
        if self.masking is not None:  # the model rebuilds them: `masking.sample_type.from_batch(batch)`
            sample.update(draw_masks(self.masking, self.seed, epoch, [index]).item())
        return sample


class SeededLabeledSamples(Dataset):
    """`dataset[(epoch, index)]` -> `dataset[index]` of a labeled dataset (fine-tuning), drawn under
    seed `(seed, epoch, index)`: its crop, flip, RandAugment and random erasing are a pure function
    of the run's seed and the sample, whichever worker or process loads it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with seeded_draws(seed_for(self.seed, "augment", epoch, index)):
            return self.dataset[index]
