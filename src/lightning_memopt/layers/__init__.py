"""Model surgery and layers in PyTorch: transformer-block detection, activation checkpointing and offloading.

Example:
    >>> import torch
    >>> from lightning_memopt.layers import apply_activation_checkpointing
    >>> model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]))
    >>> len(apply_activation_checkpointing(model, policy="selective"))
    2
"""

from .blocks import find_transformer_blocks, transformer_block_classes
from .checkpointing import apply_activation_checkpointing, is_activation_checkpointed, remove_activation_checkpointing
from .offload import OffloadActivations

__all__ = [
    "OffloadActivations",
    "apply_activation_checkpointing",
    "find_transformer_blocks",
    "is_activation_checkpointed",
    "remove_activation_checkpointing",
    "transformer_block_classes",
]
