"""Model surgery and layers in PyTorch: transformer-block detection, activation checkpointing and
offloading, mixture-of-experts layers and sparse upcycling, early-exit heads, and the training
objective that surgery installs in the model's own forward.

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
from .exit_gates import ExitGates, exit_agreement, fit_exit_gates
from .moe import (
    MoELayer,
    MoELoss,
    active_parameters,
    add_moe_loss,
    check_moe_routing,
    moe_aux_loss,
    moe_expert_loads,
    moe_layers,
    moe_modality,
    moe_z_loss,
    remove_moe_loss,
    set_moe_modality,
)
from .objective import (
    LossTerm,
    ObjectiveStep,
    add_loss_term,
    get_objective,
    last_loss_parts,
    last_model_loss,
    remove_loss_term,
    set_training_step,
)
from .offload import OffloadActivations
from .speculative import SelfSpeculativeOutput, self_speculative_generate
from .upcycling import upcycle_to_moe

__all__ = [
    "EarlyExitGenerateOutput",
    "EarlyExits",
    "ExitGates",
    "LossTerm",
    "MoELayer",
    "MoELoss",
    "ObjectiveStep",
    "OffloadActivations",
    "SelfSpeculativeOutput",
    "active_parameters",
    "add_early_exits",
    "add_loss_term",
    "add_moe_loss",
    "apply_activation_checkpointing",
    "check_moe_routing",
    "chunked_causal_lm_loss",
    "chunked_cross_entropy",
    "early_exit_forward",
    "early_exit_generate",
    "early_exit_loss",
    "exit_agreement",
    "find_transformer_blocks",
    "fit_exit_gates",
    "get_early_exits",
    "get_objective",
    "is_activation_checkpointed",
    "last_loss_parts",
    "last_model_loss",
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
    "remove_moe_loss",
    "self_speculative_generate",
    "set_moe_modality",
    "set_training_step",
    "transformer_block_classes",
    "upcycle_to_moe",
    "use_chunked_loss",
]
