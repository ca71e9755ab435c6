"""``ActivationCheckpointing`` and ``ActivationOffloading``: activation memory switches for Lightning.

Thin adapters over :mod:`lightning_memopt.layers.checkpointing` and
:mod:`lightning_memopt.layers.offload`.

Example:
    >>> import lightning as L
    >>> from lightning_memopt.callbacks import ActivationCheckpointing
    >>> trainer = L.Trainer(callbacks=[ActivationCheckpointing(policy="selective")], accelerator="cpu")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from ..layers.checkpointing import apply_activation_checkpointing, remove_activation_checkpointing
from ..layers.offload import OffloadActivations


class ActivationCheckpointing(Callback):
    """Checkpoint the activations of every transformer block (or the blocks you name).

    Applied at the start of fit, after ``configure_model`` and after the strategy has wrapped
    (DDP) or sharded (FSDP2) the model, so it works alone, with DDP and inside ``apollo_fsdp``.
    Blocks that are already checkpointed (by the strategy's own option, or by transformers'
    ``gradient_checkpointing_enable()``) are left alone: never two checkpoints around one block.
    Only the blocks this callback wrapped are restored at the end of fit.

    Args:
        policy: ``"full"`` (keep only each block's inputs; the most memory saved, one extra
            forward of compute), ``"selective"`` (also keep matmul and attention outputs; less
            recompute, more memory), or a list of aten ops to keep. See
            :func:`lightning_memopt.layers.checkpointing.apply_activation_checkpointing`.
        blocks: class names (``"LlamaDecoderLayer"``) or qualified module names
            (``"model.model.layers.0"``) to checkpoint; ``None`` finds the transformer blocks.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[ActivationCheckpointing(blocks=["LlamaDecoderLayer"])],
        ...                     accelerator="cpu", logger=False)
    """

    def __init__(self, policy: str | Sequence[Any] = "full", blocks: Sequence[str] | None = None) -> None:
        self.policy = policy
        self.blocks = list(blocks) if blocks is not None else None
        self._wrapped: list[nn.Module] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wrapped = apply_activation_checkpointing(pl_module, policy=self.policy, blocks=self.blocks)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for block in self._wrapped:
            remove_activation_checkpointing(block)
        self._wrapped = []


class ActivationOffloading(Callback):
    """Keep the activations saved for backward in pinned CPU memory during training (CUDA only).

    Each training batch's forward runs inside :class:`lightning_memopt.layers.OffloadActivations`;
    backward brings the tensors back. On a machine without CUDA it does nothing and says so once.

    Args:
        min_bytes: tensors smaller than this stay on the GPU.
        use_side_stream: overlap the device-to-host copies with the forward computation.

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[ActivationOffloading()], accelerator="cpu", logger=False)
    """

    def __init__(self, min_bytes: int = 1 << 20, use_side_stream: bool = True) -> None:
        self.min_bytes = min_bytes
        self.use_side_stream = use_side_stream
        self._context: OffloadActivations | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._exit()
        self._context = OffloadActivations(min_bytes=self.min_bytes, use_side_stream=self.use_side_stream)
        self._context.__enter__()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._exit()  # the forward is over: nothing more is saved for backward

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._exit()  # a training_step that returned None skipped backward

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._exit()

    def _exit(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
