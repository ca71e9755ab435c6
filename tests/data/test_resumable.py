"""ResumableDataLoader: a checkpoint's state continues the epoch where the training step stopped."""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.data import ResumableDataLoader


def _epoch(loader: ResumableDataLoader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def test_state_continues_the_epoch_and_later_epochs_start_whole() -> None:
    loader = ResumableDataLoader(list(range(20)), batch_size=3, shuffle=True, seed=7)
    loader.sampler.set_epoch(1)
    full = _epoch(loader)
    assert sorted(x for b in full for x in b) == list(range(20)) and len(full) == len(loader) == 7

    # The training step took 4 batches (Lightning fetched a fifth ahead: not counted).
    it = iter(loader)
    for _ in range(5):
        next(it)
    for _ in range(4):
        loader.batch_consumed()
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 4}

    resumed = ResumableDataLoader(list(range(20)), batch_size=3, shuffle=True, seed=7)
    resumed.load_state_dict(torch.load(_saved(state), weights_only=True))
    assert _epoch(resumed) == full[4:] and resumed.state_dict() == {"epoch": 1, "batches": 4}
    resumed.sampler.set_epoch(2)
    assert sorted(x for b in _epoch(resumed) for x in b) == list(range(20))  # the next epoch is whole
    assert _epoch(resumed) != full  # and in another order


def _saved(state: dict) -> object:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_bad_state_and_own_sampler_are_refused() -> None:
    loader = ResumableDataLoader(list(range(4)), batch_size=2)
    with pytest.raises(ValueError, match="expected"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="makes its own sampler"):
        ResumableDataLoader(list(range(4)), batch_size=2, sampler=range(4))
