"""Pure-PyTorch optimizers: the APOLLO family, its param grouping, and the name registry.

Example:
    >>> import torch
    >>> from lightning_memopt.optim import APOLLO, apollo_param_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
    >>> opt = APOLLO(apollo_param_groups(model, "all-linear", rank=4), lr=1e-2)
"""

from .apollo import APOLLO, APOLLOMini
from .layerwise import LayerwiseOptimizer
from .param_groups import apollo_param_groups, select_low_rank_modules
from .projection import gaussian_projection
from .registry import (
    OptimizerSpec,
    available_optimizers,
    create_optimizer,
    get_optimizer_spec,
    parse_options,
    register_optimizer,
)

__all__ = [
    "APOLLO",
    "APOLLOMini",
    "LayerwiseOptimizer",
    "OptimizerSpec",
    "apollo_param_groups",
    "available_optimizers",
    "create_optimizer",
    "gaussian_projection",
    "get_optimizer_spec",
    "parse_options",
    "register_optimizer",
    "select_low_rank_modules",
]
