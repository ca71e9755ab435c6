"""Learned exit gates: they learn where an exit agrees with the final layer (held-out loss below the
base rate's), gated decoding equals gated teacher forcing, the extremes are the full model and the
first exit, the state round-trips, and bad input names the fix."""

from __future__ import annotations

import io
import math
import pydoc_data.topics

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_memopt.layers import (
    ExitGates,
    add_early_exits,
    early_exit_forward,
    early_exit_generate,
    early_exit_loss,
    fit_exit_gates,
    get_early_exits,
)
from lightning_memopt.models import build_llama

pytestmark = pytest.mark.usefixtures("single_thread")


def text_batches(count: int, seed: int, length: int = 64, rows: int = 8) -> list[torch.Tensor]:
    """Windows of the CPython docs' bytes (a byte-level model's training text)."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - length - 1, (count, rows), generator=generator)
    return [torch.stack([data[s : s + length] for s in row.tolist()]) for row in starts]


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A byte-level LLaMA (4 blocks, exits after 0 and 1) trained briefly with the early-exit loss."""
    torch.manual_seed(0)
    model = build_llama("tiny", vocab_size=256, hidden_size=64, intermediate_size=176, num_attention_heads=4)
    add_early_exits(model, [0, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for batch in text_batches(150, seed=0):
        early_exit_loss(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def gates(trained: nn.Module) -> ExitGates:
    # A DataLoader's batches are mappings: accepted as they come.
    return fit_exit_gates(trained, [{"input_ids": batch} for batch in text_batches(8, seed=1)], steps=300)


def test_gates_learn_where_the_exit_agrees_with_the_final_layer(trained: nn.Module, gates: ExitGates) -> None:
    exits = get_early_exits(trained)
    held_out = text_batches(4, seed=2)
    for layer in (0, 1):
        logits, agree = [], []
        with torch.no_grad():
            for batch in held_out:
                with exits.capture() as hidden:
                    final = trained(batch).logits.argmax(-1)
                logits.append(gates(layer, hidden[layer]).flatten())
                agree.append((exits.heads[layer](hidden[layer]).argmax(-1) == final).flatten().float())
        logit, label = torch.cat(logits), torch.cat(agree)
        rate = float(label.mean())
        assert 0.05 < rate < 0.95, rate  # both outcomes occur: there is something to learn
        base_rate_loss = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
        gate_loss = float(F.binary_cross_entropy_with_logits(logit, label))
        assert gate_loss < 0.9 * base_rate_loss, (layer, gate_loss, base_rate_loss)
        assert gates.training_agreement[layer] == pytest.approx(rate, abs=0.1)


def test_gated_decoding_equals_gated_teacher_forcing(trained: nn.Module, gates: ExitGates) -> None:
    prompt = text_batches(1, seed=3, length=12, rows=2)[0]
    out = early_exit_generate(trained, prompt, 16, threshold=0.6, gates=gates)
    assert len(set(out.exit_layers.flatten().tolist())) > 1  # a mix of exits and full depth
    forced = early_exit_forward(trained, out.sequences, threshold=0.6, gates=gates)
    start = prompt.shape[1]
    assert torch.equal(forced.logits[:, start - 1 : -1].argmax(-1), out.sequences[:, start:])
    assert torch.equal(forced.exit_layers[:, start - 1 : -1], out.exit_layers)
    assert 0 < out.block_evaluations < out.full_block_evaluations


def test_gated_extremes_are_the_full_model_and_the_first_exit(trained: nn.Module, gates: ExitGates) -> None:
    prompt = text_batches(1, seed=4, length=10, rows=1)[0]
    full = early_exit_generate(trained, prompt, 8, threshold=1.0)
    assert torch.equal(early_exit_generate(trained, prompt, 8, threshold=1.0, gates=gates).sequences, full.sequences)
    first = early_exit_generate(trained, prompt, 8, threshold=0.0, gates=gates, exit_layers=[1])
    assert (first.exit_layers == 1).all()
    softmax_first = early_exit_generate(trained, prompt, 8, threshold=0.0, exit_layers=[1])
    assert torch.equal(first.sequences, softmax_first.sequences)  # the same cut model either way


def test_the_decode_loops_decision_is_the_gates_own(gates: ExitGates) -> None:
    hidden = torch.randn(40, 1, 1, gates.hidden_size, generator=torch.Generator().manual_seed(0)) * 3
    for layer in gates.exit_layers:
        for threshold in (0.0, 0.3, 0.5, 0.9, 1.0):
            decide = gates.decision(layer, threshold)
            with torch.no_grad():
                expected = [bool(gates.fires(layer, row, threshold)) for row in hidden]
                assert [decide(row) for row in hidden] == expected
            if threshold == 0.5:
                assert 0 < sum(expected) < len(expected)  # both outcomes tested


def test_gates_state_round_trips_with_weights_only(gates: ExitGates) -> None:
    buffer = io.BytesIO()
    torch.save(gates.state_dict(), buffer)
    buffer.seek(0)
    again = ExitGates(gates.exit_layers, gates.hidden_size, gates.width)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    hidden = torch.randn(3, 5, gates.hidden_size)
    for layer in gates.exit_layers:
        assert torch.equal(again(layer, hidden), gates(layer, hidden))


def test_bad_gates_input_names_the_fix(trained: nn.Module, gates: ExitGates) -> None:
    ids = torch.zeros(1, 4, dtype=torch.long)
    only_first = ExitGates([0], hidden_size=64)
    with pytest.raises(ValueError, match=r"gates cover exits \[0\] but exits \[1\] are tried.*exit_layers=\[0\]"):
        early_exit_generate(trained, ids, 2, threshold=0.5, gates=only_first)
    with pytest.raises(ValueError, match=r"early_exit_forward: the gates cover exits \[0\]"):
        early_exit_forward(trained, ids, threshold=0.5, gates=only_first)
    with pytest.raises(ValueError, match="hidden states of size 32, the model's are 64"):
        early_exit_generate(trained, ids, 2, threshold=0.5, gates=ExitGates([0, 1], hidden_size=32))
    with pytest.raises(ValueError, match=r"steps=0; use an int >= 1"):
        fit_exit_gates(trained, [ids], steps=0)
    with pytest.raises(ValueError, match=r"lr=0.0; use a learning rate > 0"):
        fit_exit_gates(trained, [ids], lr=0.0)
    with pytest.raises(ValueError, match=r"batch x length tensor of input ids or a mapping.*got list"):
        fit_exit_gates(trained, [[1, 2, 3]])
    with pytest.raises(ValueError, match="batches is empty"):
        fit_exit_gates(trained, [])
    with pytest.raises(ValueError, match="no early exits"):
        fit_exit_gates(build_llama("tiny", vocab_size=256), [ids])
    with pytest.raises(ValueError, match="exit_layers is empty"):
        ExitGates([], hidden_size=64)
