"""A training ``DataLoader`` that resumes mid-epoch: a checkpoint records where the data stream
stopped, and a resumed run continues with the next unseen batch instead of restarting the epoch.

The order of an epoch is a seeded permutation (``seed + epoch``, per rank, as torch's
``DistributedSampler``), so it does not depend on what ran before. The loader's
``state_dict()`` is ``{"epoch", "batches"}``: the batches of that epoch the training step has
consumed. Lightning saves it in every checkpoint of ``fit`` (its "stateful dataloader"
support) and hands it back to ``load_state_dict`` on ``fit(ckpt_path=...)``; the next
iterator then skips those batches' samples.

Consumed means handed to the training step, not fetched: Lightning fetches one batch ahead,
so a count of fetched batches would skip one batch too many on resume. The owner of the
loader (``TextDataModule``) calls :meth:`ResumableDataLoader.batch_consumed` from its
``on_before_batch_transfer`` hook, which Lightning runs once per training batch as it is used.

Example:
    >>> loader = ResumableDataLoader(list(range(10)), batch_size=2, shuffle=True, seed=0)
    >>> first = [b.tolist() for b in loader]
    >>> loader.load_state_dict({"epoch": 0, "batches": 3})
    >>> [b.tolist() for b in loader] == first[3:]
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded per-epoch permutation, which can start part-way in.

    A ``DistributedSampler`` (so Lightning uses it as is under DDP/FSDP instead of wrapping
    it), with one rank in a single process. ``skip`` samples are left out of the next
    iteration only; later epochs start at their beginning.

    Example:
        >>> sampler = ResumableSampler(list(range(6)), shuffle=False)
        >>> sampler.skip = 4
        >>> list(sampler), list(sampler)
        ([4, 5], [0, 1, 2, 3, 4, 5])
    """

    def __init__(self, dataset: Sized, shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        rank, world = _rank_and_world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a map-style dataset with Lightning's stateful-loader interface
    (``state_dict`` / ``load_state_dict``), so ``fit(ckpt_path=...)`` continues the epoch.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch (per rank).
        shuffle: a seeded permutation per epoch (else the dataset order).
        seed: the permutation's seed (epoch ``e`` uses ``seed + e``).
        kwargs: other ``DataLoader`` arguments (``num_workers``, ``collate_fn``...); not
            ``sampler``, ``batch_sampler`` or ``generator``.

    ``len()`` stays the whole epoch's, as Lightning counts batches from the start of the
    epoch when it resumes.

    Example:
        >>> loader = ResumableDataLoader(list(range(8)), batch_size=4, shuffle=False)
        >>> it = iter(loader); _ = next(it); loader.batch_consumed()
        >>> loader.state_dict()
        {'epoch': 0, 'batches': 1}
    """

    def __init__(self, dataset: Any, batch_size: int = 1, shuffle: bool = True, seed: int = 0, **kwargs: Any) -> None:
        for key in ("sampler", "batch_sampler", "generator"):
            if kwargs.get(key) is not None:
                raise ValueError(f"ResumableDataLoader makes its own sampler; remove {key}={kwargs[key]!r}.")
            kwargs.pop(key, None)
        self.seed = seed
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=kwargs.get("drop_last", False))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.batches_consumed = 0

    def __iter__(self) -> Iterator[Any]:
        # A new pass starts where the loaded state left off (0 unless resuming).
        assert self.batch_size is not None
        self.batches_consumed = self.sampler.skip // self.batch_size
        return super().__iter__()

    def batch_consumed(self) -> None:
        """Count one batch as used by the training step (call once per training batch)."""
        self.batches_consumed += 1

    def state_dict(self) -> dict[str, int]:
        """Where the data stream stands: the epoch and its batches consumed so far."""
        return {"epoch": int(self.sampler.epoch), "batches": int(self.batches_consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state`` (what :meth:`state_dict` returned) on the next iteration.

        Raises:
            ValueError: for a state that is not ``{"epoch": int, "batches": int}``.
        """
        try:
            epoch, batches = int(state["epoch"]), int(state["batches"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"ResumableDataLoader.load_state_dict: expected {{'epoch': int, 'batches': int}}, got {state!r}."
            ) from err
        assert self.batch_size is not None
        self.sampler.set_epoch(epoch)
        self.sampler.skip = batches * self.batch_size
        self.batches_consumed = batches
