"""Weight quantization for training: INT8 weights trained directly with stochastic rounding.

Example:
    >>> import torch
    >>> from lightning_memopt.quant import quantize_linear_weights
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    >>> quantize_linear_weights(model, "all-linear", group_size=32)
    ['0']
"""

from .int8 import (
    DEFAULT_GROUP_SIZE,
    INT8_STATE_SUFFIXES,
    Int8Weight,
    dequantize_int8,
    dequantize_linear_weights,
    dequantize_state_dict,
    flatten_int8_state_dict,
    is_int8_weight,
    load_int8_pretrained,
    quantize_int8,
    quantize_linear_weights,
    save_dequantized_pretrained,
    stochastic_round,
    unflatten_int8_state_dict,
)

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "INT8_STATE_SUFFIXES",
    "Int8Weight",
    "dequantize_int8",
    "dequantize_linear_weights",
    "dequantize_state_dict",
    "flatten_int8_state_dict",
    "is_int8_weight",
    "load_int8_pretrained",
    "quantize_int8",
    "quantize_linear_weights",
    "save_dequantized_pretrained",
    "stochastic_round",
    "unflatten_int8_state_dict",
]
