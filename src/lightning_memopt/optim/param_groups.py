"""Which parameters of a model get the low-rank (APOLLO) update, and which get AdamW.

Example:
    >>> import torch
    >>> from lightning_memopt.optim import apollo_param_groups
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8))
    >>> groups = apollo_param_groups(model, target_modules="all-linear")
    >>> [(g["low_rank"], len(g["params"])) for g in groups]
    [(True, 1), (False, 2)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

# blocks.py needs torch only (no transformers), as optim/ must.
from ..layers.blocks import find_transformer_blocks

TargetModules = str | Sequence[str] | None

# Modules that produce the model's output: they stay with AdamW under "all-linear", as in
# the APOLLO paper and in transformers' own "all-linear" convention.
OUTPUT_HEAD_NAMES = ("lm_head", "score", "classifier", "head", "output", "embed_out", "qa_outputs")


def _has_matrix_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))
    )


def _is_output_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES


def _block_linear_names(model: nn.Module) -> list[str]:
    """Linear layers inside the model's transformer blocks (:mod:`lightning_memopt.layers.blocks`).

    The blocks are the unit FSDP2 shards and activation checkpointing wraps, found one way for
    all three: HF's ``_no_split_modules``, else the longest ``nn.ModuleList`` of identical
    modules. Their linears are the attention and MLP layers (LLaMA's ``model.layers.N``, BERT's
    ``encoder.layer.N``, GPT-2's ``transformer.h.N``), while embeddings, poolers and output
    heads stay outside.
    """
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for block in find_transformer_blocks(model):
        for sub in block.modules():
            if isinstance(sub, nn.Linear):  # the block itself too, when it is a linear layer
                found.append(names[id(sub)])
    return sorted(set(found))


def select_low_rank_modules(model: nn.Module, target_modules: TargetModules = None) -> list[str]:
    """Names of the modules whose 2-D ``weight`` gets the low-rank update.

    ``target_modules``:
      - ``None`` (default): the ``nn.Linear`` layers inside the model's transformer blocks
        (attention and MLP; the blocks of :func:`~lightning_memopt.layers.find_transformer_blocks`,
        which FSDP2 shards and checkpointing wraps); if the model has no repeated block, every
        linear layer except the output head.
      - ``"all-linear"``: every ``nn.Linear`` except the output head (``lm_head``, ...).
      - any other string: a regular expression searched in each module's qualified name.
      - a list of strings: modules whose qualified name ends with, or equals, one of them.

    Raises:
        ValueError: when nothing matches (the message lists a few module names to pick from).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> select_low_rank_modules(model, "all-linear")
        ['0', '2']
    """
    candidates = {name: m for name, m in model.named_modules() if name and _has_matrix_weight(m)}
    if target_modules is None:
        selected = _block_linear_names(model)
        if not selected:
            selected = [n for n, m in candidates.items() if isinstance(m, nn.Linear) and not _is_output_head(n)]
    elif isinstance(target_modules, str) and target_modules == "all-linear":
        selected = [n for n, m in candidates.items() if isinstance(m, nn.Linear) and not _is_output_head(n)]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"target_modules={target_modules!r} is not a valid regular expression ({err}); "
                "pass 'all-linear', a regex such as r'.*(attn|mlp).*', or a list of module names."
            ) from err
        selected = [n for n in candidates if pattern.search(n)]
    else:
        wanted = list(target_modules)
        if not all(isinstance(w, str) for w in wanted):
            raise ValueError(f"target_modules={target_modules!r} must be a string or a list of strings.")
        selected = [n for n in candidates if any(n == w or n.endswith("." + w) for w in wanted)]
    if not selected:
        examples = ", ".join(list(candidates)[:8]) or "(the model has no 2-D weights)"
        raise ValueError(
            f"target_modules={target_modules!r} matched no module with a 2-D weight. "
            f"Module names look like: {examples}. Pass 'all-linear', a regex, or a list of names."
        )
    return selected


def apollo_param_groups(
    model: nn.Module, target_modules: TargetModules = None, **low_rank_options: Any
) -> list[dict[str, Any]]:
    """Param groups for :class:`~lightning_memopt.optim.APOLLO`: low-rank matrices, then the rest.

    Returns ``[{"params": [...], "low_rank": True, **low_rank_options}, {"params": [...],
    "low_rank": False}]`` with frozen parameters left out, each tensor listed once (tied
    weights too) and empty groups dropped. ``low_rank_options`` (e.g. ``rank=128``) apply to
    the low-rank group only. See :func:`select_low_rank_modules` for ``target_modules``.

    Example:
        >>> from lightning_memopt.optim import APOLLO
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
        >>> opt = APOLLO(apollo_param_groups(model, "all-linear", rank=4), lr=1e-2)
        >>> opt.param_groups[0]["rank"]
        4
    """
    selected = set(select_low_rank_modules(model, target_modules))
    low_rank_ids = {id(m.weight) for name, m in model.named_modules() if name in selected and m.weight.requires_grad}
    low_rank, rest, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (low_rank if id(param) in low_rank_ids else rest).append(param)
    groups = []
    if low_rank:
        groups.append({"params": low_rank, "low_rank": True, **low_rank_options})
    if rest:
        groups.append({"params": rest, "low_rank": False})
    if not groups:
        raise ValueError("apollo_param_groups: the model has no trainable parameters (all requires_grad=False).")
    return groups
