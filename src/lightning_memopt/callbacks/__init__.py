"""Lightning callbacks: thin adapters over the pure-PyTorch core.

Example:
    >>> from lightning_memopt.callbacks import MemoryProfiler
    >>> profiler = MemoryProfiler(interval=50)
"""

from .activation_checkpointing import ActivationCheckpointing, ActivationOffloading
from .checkpoint_on_stop import CheckpointOnStop
from .early_exit import EarlyExit
from .layerwise import LayerwiseUpdates
from .memory_profiler import MemoryProfiler
from .model_surgery import ModelSurgery
from .moe import UpcycleToMoE
from .progress import StepProgressBar
from .quantization import Int8Weights

__all__ = [
    "ActivationCheckpointing",
    "ActivationOffloading",
    "CheckpointOnStop",
    "EarlyExit",
    "Int8Weights",
    "LayerwiseUpdates",
    "MemoryProfiler",
    "ModelSurgery",
    "StepProgressBar",
    "UpcycleToMoE",
]
