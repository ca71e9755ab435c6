"""Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055): a dense Hugging Face model's MLPs
become mixtures of experts whose experts are copies of them.

:func:`upcycle_to_moe` replaces the MLP of chosen transformer blocks (a LLaMA-family block's
``mlp``, or BERT's ``intermediate`` + ``output.dense`` pair) by an
:class:`~lightning_memopt.layers.MoELayer`. The renormalised top-k weights sum to 1, so at
initialisation the upcycled model computes exactly what the dense one did (up to float
rounding), whatever the router says. It also adds the MoE auxiliary losses to the model's own
training loss (:func:`~lightning_memopt.layers.moe.add_moe_loss`).

Example:
    >>> import torch
    >>> from lightning_memopt.models import build_llama
    >>> model = build_llama("tiny", vocab_size=257, num_hidden_layers=2)
    >>> len(upcycle_to_moe(model, num_experts=4, top_k=2))
    2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .blocks import find_transformer_blocks
from .moe import MoELayer, MoELoss, add_moe_loss, check_moe_routing

__all__ = ["BertFeedForward", "BertResidualNorm", "upcycle_to_moe"]


class BertFeedForward(nn.Module):
    """A BERT block's MLP as one module (``BertIntermediate``, then ``BertOutput.dense``): the
    expert :func:`upcycle_to_moe` copies for BERT-style encoders (MiniLM, RoBERTa, ...).

    Example:
        >>> ff = BertFeedForward(nn.Sequential(nn.Linear(4, 8), nn.GELU()), nn.Linear(8, 4))
        >>> ff(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, intermediate: nn.Module, dense: nn.Module) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.intermediate(x))


class BertResidualNorm(nn.Module):
    """What remains of ``BertOutput`` once its ``dense`` moved into the experts:
    ``LayerNorm(dropout(h) + input_tensor)``, with the original ``dropout`` and ``LayerNorm``
    (so their state-dict keys are unchanged).

    Example:
        >>> norm = BertResidualNorm(nn.Dropout(0.0), nn.LayerNorm(4))
        >>> norm(torch.randn(2, 4), torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """

    def __init__(self, dropout: nn.Module, layer_norm: nn.Module) -> None:
        super().__init__()
        self.dropout = dropout
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


def _is_bert_style(block: nn.Module) -> bool:
    output = getattr(block, "output", None)
    return (
        isinstance(getattr(block, "intermediate", None), nn.Module)
        and isinstance(getattr(output, "dense", None), nn.Module)
        and isinstance(getattr(output, "LayerNorm", None), nn.Module)
    )


def _has_mlp(block: nn.Module) -> bool:
    already = isinstance(getattr(block, "intermediate", None), MoELayer)
    return isinstance(getattr(block, "mlp", None), nn.Module) or _is_bert_style(block) or already


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise ValueError(
            f"upcycle_to_moe: cannot tell the hidden size of {type(model).__name__} (no config.hidden_size); "
            "build MoELayer(hidden_size, expert=block.mlp, ...) yourself and assign it to block.mlp."
        )
    return int(size)


def upcycle_to_moe(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    layers: Sequence[int] | None = None,
    modality_groups: Sequence[int] | None = None,
    router_init_std: float = 0.02,
    capacity_factor: float | None = None,
    aux_loss_weight: float = 0.01,
    z_loss_weight: float = 0.001,
) -> list[MoELayer]:
    """Sparse upcycling: replace the MLP of chosen transformer blocks by an :class:`MoELayer`
    whose ``num_experts`` experts are copies of that MLP (in place; returns the new layers).

    Blocks are found with :func:`~lightning_memopt.layers.find_transformer_blocks`; blocks of a
    kind that has no MLP (e.g. BERT's embeddings, which transformers lists among its blocks)
    are skipped. The MLP is the block's ``mlp`` (LLaMA, Mistral, Qwen, GPT-2, ...) or BERT's
    ``intermediate`` + ``output.dense`` pair (``output`` then keeps only dropout, residual and
    LayerNorm, with unchanged parameter names). With ``capacity_factor=None`` the upcycled
    model's output equals the dense model's at initialisation.

    Args:
        layers: indices (negative ones count from the end) of the blocks to upcycle, among the
            blocks that have an MLP; ``None``: all of them. Upcycling every other layer (``[1,
            3, 5]``) is a common choice.
        modality_groups, router_init_std, capacity_factor: see :class:`MoELayer`.
        aux_loss_weight, z_loss_weight: the weights of the load-balancing loss and the router
            z-loss in the model's own training loss (:func:`~lightning_memopt.layers.moe.add_moe_loss`;
            0 turns one off): in training mode with ``labels``, ``model(...).loss`` includes
            them, so the stock ``transformers.Trainer`` trains with them.

    Raises:
        ValueError: for ``num_experts < 2``, ``top_k`` out of ``[1, num_experts]``, modality
            group sizes that do not sum to ``num_experts``, a model without blocks or MLPs, a
            layer index out of range, or a block already upcycled.

    Example:
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257, num_hidden_layers=2)
        >>> x = torch.randint(0, 257, (1, 8))
        >>> dense = model(x).logits
        >>> moe = upcycle_to_moe(model, num_experts=4, top_k=2)
        >>> len(moe), torch.allclose(model(x).logits, dense, atol=1e-5)
        (2, True)
    """
    check_moe_routing(num_experts, top_k, modality_groups)
    MoELoss(aux_loss_weight, z_loss_weight)  # checks the weights before any surgery
    blocks = find_transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"upcycle_to_moe: found no repeated transformer blocks in {type(model).__name__}; pass a Hugging Face "
            "model (with _no_split_modules) or one whose layers form an nn.ModuleList."
        )
    kinds_with_mlp = {type(b) for b in blocks if _has_mlp(b)}
    if not kinds_with_mlp:
        raise ValueError(
            f"upcycle_to_moe: no MLP found in the blocks of {type(model).__name__} "
            f"({sorted({type(b).__name__ for b in blocks})}); it knows a block's `mlp` (LLaMA, Mistral, GPT-2, ...) "
            "and BERT's `intermediate` + `output` pair. For another layout build MoELayer(hidden_size, "
            "expert=<the MLP>, ...) yourself and put it in the block."
        )
    blocks = [b for b in blocks if type(b) in kinds_with_mlp]
    missing = [i for i, b in enumerate(blocks) if not _has_mlp(b)]
    if missing:
        raise ValueError(f"upcycle_to_moe: no MLP found in block(s) {missing} of {type(model).__name__}.")
    if layers is None:
        chosen = list(range(len(blocks)))
    else:
        chosen = []
        for i in layers:
            if not -len(blocks) <= i < len(blocks):
                raise ValueError(
                    f"upcycle_to_moe: layers contains {i}, but the model has {len(blocks)} blocks with an MLP: "
                    f"use indices in [0, {len(blocks) - 1}] (or negative ones from the end), or layers=None for all."
                )
            if i % len(blocks) not in chosen:
                chosen.append(i % len(blocks))
    hidden = _hidden_size(model)
    options = dict(
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        modality_groups=modality_groups,
        router_init_std=router_init_std,
    )
    created = []
    for i in chosen:
        block = blocks[i]
        if any(isinstance(getattr(block, name, None), MoELayer) for name in ("mlp", "intermediate")):
            raise ValueError(f"upcycle_to_moe: block {i} ({type(block).__name__}) is already a mixture of experts.")
        if isinstance(getattr(block, "mlp", None), nn.Module):
            layer = MoELayer(hidden, expert=block.mlp, **options)
            block.mlp = layer
        else:
            output = block.output
            dropout = getattr(output, "dropout", None) or nn.Identity()
            layer = MoELayer(hidden, expert=BertFeedForward(block.intermediate, output.dense), **options)
            block.intermediate = layer
            block.output = BertResidualNorm(dropout, output.LayerNorm)
        layer.to(device=next(layer.experts.parameters()).device, dtype=next(layer.experts.parameters()).dtype)
        created.append(layer)
    add_moe_loss(model, aux_loss_weight, z_loss_weight)
    return created
