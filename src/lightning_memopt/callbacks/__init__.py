"""Lightning callbacks: thin adapters over the pure-PyTorch core.

Example:
    >>> from lightning_memopt.callbacks import MemoryProfiler
    >>> profiler = MemoryProfiler(interval=50)
"""

from .activation_checkpointing import ActivationCheckpointing, ActivationOffloading
from .layerwise import LayerwiseUpdates
from .memory_profiler import MemoryProfiler

__all__ = [
    "ActivationCheckpointing",
    "ActivationOffloading",
    "LayerwiseUpdates",
    "MemoryProfiler",
]
