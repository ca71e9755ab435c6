"""lightning-memopt: fit large-model training in less memory, inside Lightning and the HF Trainer.

Importing the package registers its Lightning strategy names and its HF Trainer optimizer
names, so plain ``Trainer(strategy="apollo_fsdp")`` and ``TrainingArguments(optim="apollo")``
work afterwards.

Example:
    >>> import lightning_memopt
    >>> from lightning_memopt.optim import APOLLO, apollo_param_groups
"""

from .optim import APOLLO, APOLLOMini, apollo_param_groups, available_optimizers, create_optimizer

__version__ = "0.1.0"

__all__ = [
    "APOLLO",
    "APOLLOMini",
    "__version__",
    "apollo_param_groups",
    "available_optimizers",
    "create_optimizer",
]
