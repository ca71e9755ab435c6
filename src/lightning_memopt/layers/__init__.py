"""Model surgery and layers in PyTorch: transformer-block detection, activation checkpointing and
offloading, mixture-of-experts layers and sparse upcycling, early-exit heads.

Example:
    >>> import torch
    >>> from lightning_memopt.layers import apply_activation_checkpointing
    >>> model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]))
    >>> len(apply_activation_checkpointing(model, policy="selective"))
    2
"""

from .blocks import find_transformer_blocks, transformer_block_classes
from .checkpointing import apply_activation_checkpointing, is_activation_checkpointed, remove_activation_checkpointing
from .chunked_loss import chunked_causal_lm_loss, chunked_cross_entropy, remove_chunked_loss, use_chunked_loss
from .early_exit import (
    EarlyExits,
    add_early_exits,
    early_exit_forward,
    early_exit_loss,
    get_early_exits,
    layerskip_weights,
    remove_early_exits,
)
from .early_exit_decoding import EarlyExitGenerateOutput, early_exit_generate
from .moe import (
    MoELayer,
    active_parameters,
    moe_aux_loss,
    moe_expert_loads,
    moe_layers,
    moe_modality,
    moe_z_loss,
    set_moe_modality,
    upcycle_to_moe,
)
from .objective import LossTerm, ObjectiveStep, add_loss_term, get_objective, last_loss_parts, remove_loss_term
from .offload import OffloadActivations
from .speculative import SelfSpeculativeOutput, self_speculative_generate

__all__ = [
    "EarlyExitGenerateOutput",
    "EarlyExits",
    "LossTerm",
    "MoELayer",
    "ObjectiveStep",
    "OffloadActivations",
    "SelfSpeculativeOutput",
    "active_parameters",
    "add_early_exits",
    "add_loss_term",
    "apply_activation_checkpointing",
    "chunked_causal_lm_loss",
    "chunked_cross_entropy",
    "early_exit_forward",
    "early_exit_generate",
    "early_exit_loss",
    "find_transformer_blocks",
    "get_early_exits",
    "get_objective",
    "is_activation_checkpointed",
    "last_loss_parts",
    "layerskip_weights",
    "moe_aux_loss",
    "moe_expert_loads",
    "moe_layers",
    "moe_modality",
    "moe_z_loss",
    "remove_activation_checkpointing",
    "remove_chunked_loss",
    "remove_early_exits",
    "remove_loss_term",
    "self_speculative_generate",
    "set_moe_modality",
    "transformer_block_classes",
    "upcycle_to_moe",
    "use_chunked_loss",
]
