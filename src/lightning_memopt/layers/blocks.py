"""Find the repeated transformer blocks of a model: the unit of sharding and checkpointing.

FSDP2 shards per block, activation checkpointing wraps per block, and APOLLO's default
low-rank layers (:func:`lightning_memopt.optim.select_low_rank_modules`) are the linears inside
the blocks, so all three ask the same question, answered once here: which module class repeats
as the model's layer stack? This module needs torch only (``optim/`` imports it and must not
import transformers).

Example:
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.mlp = nn.Linear(4, 4)
    >>> model = nn.Sequential(nn.Embedding(10, 4), nn.ModuleList([Block(), Block()]))
    >>> [type(b).__name__ for b in find_transformer_blocks(model)]
    ['Block', 'Block']
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def _classes_by_name(model: nn.Module, names: Iterable[str]) -> set[type[nn.Module]]:
    wanted = set(names)
    return {type(m) for m in model.modules() if type(m).__name__ in wanted}


def _declared_block_names(model: nn.Module) -> list[str]:
    """HF's ``_no_split_modules`` of ``model`` or of any HF model inside it (a LightningModule
    or an ``nn.Sequential`` that holds one): the model's own word on what a block is."""
    names: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_no_split_modules", None) or ():
            if name not in names:
                names.append(name)
    return names


def transformer_block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The block classes of ``model``: HF's ``_no_split_modules`` if it (or an HF model inside
    it) declares them, else the class that fills the longest ``nn.ModuleList`` of identical
    modules.

    The one definition of "transformer block": FSDP2 shards per block, activation
    checkpointing wraps per block, and APOLLO's default low-rank layers are the linears inside
    the blocks. Returns an empty set when the model has no repeated block.

    Example:
        >>> transformer_block_classes(nn.Linear(2, 2))
        set()
    """
    declared = _declared_block_names(model)
    if declared:
        classes = _classes_by_name(model, declared)
        if classes:
            return classes
    best: tuple[int, type[nn.Module]] | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and (best is None or len(module) > best[0]):
            best = (len(module), next(iter(kinds)))
    return {best[1]} if best else set()


def find_transformer_blocks(
    model: nn.Module, block_classes: Iterable[type[nn.Module]] | Iterable[str] | None = None
) -> list[nn.Module]:
    """The block instances of ``model``, outermost first and never nested in one another.

    ``block_classes`` overrides detection: classes, or class names (``"LlamaDecoderLayer"``).

    Example:
        >>> blocks = find_transformer_blocks(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
        >>> len(blocks)
        2
    """
    if block_classes is None:
        classes = transformer_block_classes(model)
    else:
        items = list(block_classes)
        names = [c for c in items if isinstance(c, str)]
        classes = {c for c in items if isinstance(c, type)} | _classes_by_name(model, names)
        missing = [n for n in names if n not in {c.__name__ for c in classes}]
        if missing:
            raise ValueError(
                f"block class name(s) {missing} not found in {type(model).__name__}; "
                f"its module classes are: {sorted({type(m).__name__ for m in model.modules()})[:20]}."
            )
    if not classes:
        return []
    blocks: list[nn.Module] = []
    claimed: set[int] = set()
    for module in model.modules():
        if id(module) in claimed or not isinstance(module, tuple(classes)):
            continue
        blocks.append(module)
        claimed.update(id(sub) for sub in module.modules())
    return blocks
