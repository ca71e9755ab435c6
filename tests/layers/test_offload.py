"""Activation offloading: a no-op that warns once on the CPU; same gradients, less GPU memory on CUDA."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_memopt.layers import offload
from lightning_memopt.layers.offload import OffloadActivations


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)) for _ in range(4)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_without_cuda_it_is_a_no_op_that_warns_once(monkeypatch) -> None:
    monkeypatch.setattr(offload, "_warned_no_cuda", False)
    model = make_model()
    x = torch.randn(8, 256)
    with pytest.warns(UserWarning, match="CUDA is not available"), OffloadActivations() as ctx:
        loss = model(x).sum()
    loss.backward()
    assert ctx.offloaded_bytes == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with OffloadActivations():
            model(x).sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="activation offloading moves CUDA tensors; needs a GPU")
@pytest.mark.parametrize("use_side_stream", [True, False])
def test_cuda_offload_keeps_gradients_and_frees_gpu_memory(use_side_stream: bool) -> None:
    model = make_model().cuda()
    reference = copy.deepcopy(model)
    x = torch.randn(512, 256, device="cuda")

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss_ref = reference(x).sum()
    kept_without = torch.cuda.memory_allocated() - before
    loss_ref.backward()

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with OffloadActivations(min_bytes=0, use_side_stream=use_side_stream) as ctx:
        loss = model(x).sum()
    torch.cuda.synchronize()
    kept_with = torch.cuda.memory_allocated() - before
    loss.backward()

    assert ctx.offloaded_bytes > 0
    assert kept_with < kept_without / 2
    torch.testing.assert_close(loss, loss_ref)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
