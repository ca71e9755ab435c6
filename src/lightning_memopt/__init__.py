"""lightning-memopt: fit large-model training in less memory, inside Lightning and the HF Trainer.

Importing the package registers its Lightning strategy names and its HF Trainer optimizer
names, so plain ``Trainer(strategy="apollo_fsdp")`` and ``TrainingArguments(optim="apollo")``
work afterwards.

Example:
    >>> import lightning_memopt
    >>> from lightning_memopt.optim import APOLLO, apollo_param_groups
"""

from .hf.registration import register_on_transformers_import as _register_hf_optimizer_names
from .optim import APOLLO, APOLLOMini, apollo_param_groups, available_optimizers, create_optimizer
from .strategies import register_on_lightning_import as _register_lightning_strategies

__version__ = "0.1.0"

# TrainingArguments(optim="apollo", ...): registered now, or as soon as transformers loads its training args.
_register_hf_optimizer_names()
# Trainer(strategy="apollo_fsdp"): registered now, or as soon as lightning.pytorch is imported.
_register_lightning_strategies()

__all__ = [
    "APOLLO",
    "APOLLOMini",
    "__version__",
    "apollo_param_groups",
    "available_optimizers",
    "create_optimizer",
]
