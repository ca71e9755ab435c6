"""chunked_cross_entropy equals the plain loss (value and gradients) and holds less memory."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from lightning_memopt.layers import chunked_cross_entropy


def plain_loss(hidden, weight, labels, bias=None, ignore_index=-100):
    logits = F.linear(hidden[:, :-1], weight, bias)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=ignore_index)


def make(batch=2, seq=33, hidden=16, vocab=97, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=generator, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=generator, requires_grad=True)
    b = torch.randn(vocab, generator=generator, requires_grad=True)
    y = torch.randint(0, vocab, (batch, seq), generator=generator)
    return h, w, b, y


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_value_and_gradients_equal_the_plain_loss(chunk_size, with_bias):
    h, w, b, y = make()
    y[0, 5:9] = -100  # ignored tokens are not counted
    bias = b if with_bias else None
    expected = plain_loss(h, w, y, bias)
    grads_expected = torch.autograd.grad(expected, [h, w] + ([b] if with_bias else []))
    loss = chunked_cross_entropy(h, w, y, chunk_size, bias=bias)
    grads = torch.autograd.grad(loss, [h, w] + ([b] if with_bias else []))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, grads_expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_unshifted_labels_and_no_grad():
    h, w, _, y = make()
    with torch.no_grad():
        loss = chunked_cross_entropy(h, w, y, 8, shift=False)
    expected = F.cross_entropy(F.linear(h, w).reshape(-1, w.shape[0]), y.reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert not loss.requires_grad


def _peak_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_peak_memory_is_a_few_chunks_not_the_full_logits():
    h, w, _, y = make(batch=4, seq=129, hidden=32, vocab=4000)
    logits_bytes = 4 * 128 * 4000 * 4

    def run(loss_fn):
        def step():
            loss_fn().backward()
            h.grad = w.grad = None

        return _peak_bytes(step)

    full = run(lambda: plain_loss(h, w, y))
    chunked = run(lambda: chunked_cross_entropy(h, w, y, chunk_size=64))
    assert full >= 2 * logits_bytes  # the logits and their gradient at least
    # 64 of 512 tokens per chunk: a few chunk-sized logits, plus the weight's gradient.
    assert chunked < full / 3, (chunked, full)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"chunk_size": 2.5}, "chunk_size=2.5"),
        ({"labels": torch.zeros(2, 5, dtype=torch.long)}, "must agree"),
        ({"weight": torch.zeros(97, 3)}, "hidden size 16"),
    ],
)
def test_bad_input_raises(kwargs, match):
    h, w, _, y = make()
    arguments = {"hidden_states": h, "weight": w, "labels": y, "chunk_size": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        chunked_cross_entropy(**arguments)
