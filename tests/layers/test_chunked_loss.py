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


# ---------------------------------------------------------------------------- use_chunked_loss
def tiny_llama(seed: int = 0, vocab: int = 61):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("extra", [{}, {"num_items_in_batch": torch.tensor(21)}, {"shift": True}])
def test_use_chunked_loss_equals_the_model_loss_value_and_gradients(extra):
    import copy

    from lightning_memopt.layers import get_objective, remove_chunked_loss, use_chunked_loss

    plain = tiny_llama()
    chunked = use_chunked_loss(copy.deepcopy(plain), chunk_size=5)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    kwargs = dict(extra)
    if kwargs.pop("shift", False):  # transformers' pre-shifted labels
        kwargs["shift_labels"] = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    expected = plain(input_ids=ids, labels=labels, **kwargs)
    expected.loss.backward()
    out = chunked(ids, labels=labels, **kwargs)  # positional input_ids too
    out.loss.backward()
    assert out.logits is None  # the full logits never existed
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-6)
    want, got = _grads(plain), _grads(chunked)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)

    # eval mode and calls without labels are the model's own forward (logits, same loss)
    chunked.eval(), plain.eval()
    with torch.no_grad():
        evaluated = chunked(input_ids=ids, labels=labels)
        torch.testing.assert_close(evaluated.logits, plain(input_ids=ids).logits)
        torch.testing.assert_close(evaluated.loss, plain(input_ids=ids, labels=labels).loss)
    chunked.train()
    assert chunked(input_ids=ids).logits.shape == (2, 12, 61)

    remove_chunked_loss(chunked)
    assert get_objective(chunked) is None and "forward" not in chunked.__dict__
    assert chunked(input_ids=ids, labels=labels).logits is not None


def test_use_chunked_loss_keeps_the_forward_signature_and_survives_deepcopy():
    import copy
    import inspect

    from lightning_memopt.layers import use_chunked_loss

    model = tiny_llama()
    before = inspect.signature(model.forward)
    use_chunked_loss(model, chunk_size=3)
    assert inspect.signature(model.forward) == before  # the Trainer reads it (columns, num_items_in_batch)
    twin = copy.deepcopy(model)
    assert twin.forward.__self__ is twin
    ids = torch.randint(0, 61, (1, 9))
    torch.testing.assert_close(twin(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)
    use_chunked_loss(model, chunk_size=4)  # again: replaces the chunk size, no second wrapper
    assert model(input_ids=ids, labels=ids).logits is None


def test_use_chunked_loss_refusals():
    from transformers import LlamaConfig

    from lightning_memopt.layers import use_chunked_loss

    with pytest.raises(ValueError, match="chunk_size=0"):
        use_chunked_loss(tiny_llama(), chunk_size=0)
    with pytest.raises(ValueError, match="not a Hugging Face causal LM"):
        use_chunked_loss(torch.nn.Linear(2, 2))
    model = tiny_llama()
    model.config = LlamaConfig(final_logit_softcapping=30.0)  # a Gemma-2-style soft-capped head
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        use_chunked_loss(model)


def test_use_chunked_loss_survives_accelerates_mixed_precision_wrap_and_unwrap():
    """accelerate wraps model.forward for autocast and, unwrapping, follows ``__wrapped__``
    chains: the objective must stay installed (the Trainer with bf16=True does both)."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32, extract_model_from_parallel

    from lightning_memopt.layers import use_chunked_loss

    model = use_chunked_loss(tiny_llama(), chunk_size=4)
    model._original_forward = model.forward  # what Accelerator.prepare_model does under native AMP
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward.__func__)
    model.forward = MethodType(convert_outputs_to_fp32(autocast), model)
    ids = torch.randint(0, 61, (1, 7))
    assert model(input_ids=ids, labels=ids).logits is None
    unwrapped = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    assert unwrapped(input_ids=ids, labels=ids).logits is None


def test_use_chunked_loss_training_step_never_holds_the_full_logits():
    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_memopt.layers import use_chunked_loss

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 8000, (4, 128))
    logits_bytes = 4 * 128 * 8000 * 4

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: lazily created buffers are not part of the comparison
    full = _peak_bytes(step)
    use_chunked_loss(model, chunk_size=64)
    step()
    chunked = _peak_bytes(step)
    assert full >= 2 * logits_bytes
    assert chunked < full / 3, (chunked, full)
