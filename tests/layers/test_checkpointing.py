"""Activation checkpointing: same numbers, fewer saved bytes, never applied twice."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_memopt.layers.checkpointing import (
    apply_activation_checkpointing,
    is_activation_checkpointed,
    measure_activation_bytes,
    remove_activation_checkpointing,
)


class Block(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(0.2)  # the recompute must replay the same dropout mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(nn.functional.gelu(self.up(self.norm(x)))))


class Plain(nn.Module):
    def __init__(self, depth: int = 4, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), tokens.flatten())


# The shared ``tiny_llama`` fixture at these tests' sizes: 3 blocks, grouped-query attention.
LLAMA = dict(
    vocab_size=64, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2, max_position_embeddings=64
)


def llama_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def plain_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)


def loss_and_grads(model: nn.Module, loss_fn, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = loss_fn(model, tokens)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", ["full", "selective"])
@pytest.mark.parametrize("kind", ["plain", "llama"])
def test_outputs_and_gradients_are_identical(kind: str, policy: str, tiny_llama) -> None:
    torch.manual_seed(0)
    model, loss_fn = (Plain(), plain_loss) if kind == "plain" else (tiny_llama(**LLAMA), llama_loss)
    tokens = torch.randint(0, 50, (2, 16))
    reference = copy.deepcopy(model)

    wrapped = apply_activation_checkpointing(model, policy=policy)
    assert len(wrapped) == (4 if kind == "plain" else 3)
    loss, grads = loss_and_grads(model, loss_fn, tokens)
    ref_loss, ref_grads = loss_and_grads(reference, loss_fn, tokens)

    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=0, atol=0)
    assert model.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("kind", ["plain", "llama"])
def test_activation_bytes_fall(kind: str, tiny_llama) -> None:
    model, loss_fn = (Plain(depth=4, width=64), plain_loss) if kind == "plain" else (tiny_llama(**LLAMA), llama_loss)
    tokens = torch.randint(0, 50, (4, 32))

    def measure() -> int:
        loss, nbytes = measure_activation_bytes(lambda: loss_fn(model, tokens))
        loss.backward()  # the saved tensors are used, and freed
        return nbytes

    none = measure()
    apply_activation_checkpointing(model, policy="selective")
    selective = measure()
    remove_activation_checkpointing(model)
    apply_activation_checkpointing(model, policy="full")
    full = measure()
    assert full < selective < none
    assert full < none / 2


def test_never_wraps_twice_and_can_be_removed() -> None:
    model = Plain()
    assert not is_activation_checkpointed(model)
    first = apply_activation_checkpointing(model)
    assert is_activation_checkpointed(model)
    assert apply_activation_checkpointing(model, policy="selective") == []  # a strategy and a callback, say
    forward = model.blocks[0].forward
    assert forward.previous is None  # wraps the class's forward, not an earlier wrapper
    assert remove_activation_checkpointing(model) == len(first) == 4
    assert not is_activation_checkpointed(model) and "forward" not in model.blocks[0].__dict__


def test_hf_gradient_checkpointing_counts_as_checkpointed(tiny_llama) -> None:
    model = tiny_llama(**LLAMA)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert is_activation_checkpointed(model)
    with pytest.warns(UserWarning, match="already uses transformers' gradient checkpointing"):
        assert apply_activation_checkpointing(model) == []


def test_named_blocks_and_errors() -> None:
    model = Plain()
    assert apply_activation_checkpointing(model, blocks=["blocks.1", model.blocks[3]]) == [
        model.blocks[1],
        model.blocks[3],
    ]
    assert len(apply_activation_checkpointing(model, blocks=["Block"])) == 2  # the two others
    with pytest.raises(ValueError, match="found no repeated transformer block in Linear"):
        apply_activation_checkpointing(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown policy='sometimes'"):
        apply_activation_checkpointing(Plain(), policy="sometimes")


def test_llama_turns_the_kv_cache_off(tiny_llama) -> None:
    model = tiny_llama(**LLAMA)
    apply_activation_checkpointing(model)
    assert model.config.use_cache is False


def test_deepcopy_of_a_checkpointed_model_uses_its_own_weights() -> None:
    model = Plain()
    apply_activation_checkpointing(model)
    clone = copy.deepcopy(model)
    assert clone.blocks[0].forward.module is clone.blocks[0]
    tokens = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        clone.head.weight.zero_()
    clone(tokens).backward()
    assert model.head.weight.grad is None and clone.blocks[0].up.weight.grad is not None
