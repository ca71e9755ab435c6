"""One definition of "transformer block" for sharding, checkpointing and APOLLO's default layers."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_memopt.layers import find_transformer_blocks, transformer_block_classes, upcycle_to_moe
from lightning_memopt.optim import select_low_rank_modules


class Wrapper(nn.Module):
    """What a LightningModule is to the HF model it trains: a plain module holding it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def test_an_hf_model_inside_a_wrapper_keeps_its_declared_blocks(tiny_llama) -> None:
    # One decoder layer, upcycled to 4 experts: the longest ModuleList of identical modules is
    # the experts, but the HF model inside says its blocks are the decoder layers.
    llama = tiny_llama(num_hidden_layers=1)
    upcycle_to_moe(llama, num_experts=4, top_k=2)
    model = Wrapper(llama)
    assert {c.__name__ for c in transformer_block_classes(model)} == {"LlamaDecoderLayer"}
    assert [type(b).__name__ for b in find_transformer_blocks(model)] == ["LlamaDecoderLayer"]
    # APOLLO's default low-rank layers are the linears of those blocks: attention and experts.
    selected = select_low_rank_modules(model)
    assert {n.rsplit(".", 1)[-1] for n in selected if ".self_attn." in n} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert sum(".experts." in n for n in selected) == 4 * 3
    assert not any(n.endswith("lm_head") for n in selected)


def test_param_groups_and_blocks_agree_on_a_plain_model() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    model = nn.Sequential(nn.Embedding(10, 8), nn.ModuleList([Block(), Block(), Block()]), nn.Linear(8, 10))
    blocks = find_transformer_blocks(model)
    inside = {n for b in blocks for n, m in model.named_modules() if isinstance(m, nn.Linear) and m in set(b.modules())}
    assert len(blocks) == 3 and sorted(inside) == select_low_rank_modules(model)


@pytest.mark.parametrize("depth", [2, 3])
def test_a_list_of_linears_is_its_own_block(depth: int) -> None:
    model = nn.Sequential(nn.ModuleList([nn.Linear(4, 4) for _ in range(depth)]))
    assert len(find_transformer_blocks(model)) == depth
    assert select_low_rank_modules(model) == [f"0.{i}" for i in range(depth)]
