"""Turn an ``apollo_fsdp`` distributed checkpoint into one file for inference.

``apollo_fsdp`` saves a checkpoint as a folder written by ``torch.distributed.checkpoint``
(one shard file per rank, plus Lightning's ``meta.pt`` with the epoch, step, hyper-parameters
and loop state). :func:`consolidate_checkpoint` reads the folder without any process group
(on one CPU), assembles every DTensor into its full tensor and writes a regular Lightning
checkpoint: ``torch.load`` and ``LightningModule.load_from_checkpoint`` read it directly.

Example:
    >>> # consolidate_checkpoint("checkpoints/last.ckpt", "model.pt")
    >>> # model = MyModule.load_from_checkpoint("model.pt")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_distributed_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Read a distributed checkpoint folder into one dict of full (CPU) tensors plus Lightning's metadata.

    Example:
        >>> # ckpt = load_distributed_checkpoint("checkpoints/last.ckpt"); ckpt["state_dict"].keys()
    """
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = Path(folder)
    if not folder.is_dir() or not (folder / ".metadata").is_file():
        raise ValueError(
            f"{str(folder)!r} is not a distributed checkpoint folder (no {str(folder / '.metadata')!r}); pass the "
            "folder that apollo_fsdp saved (e.g. checkpoints/epoch=0-step=100.ckpt/)."
        )
    return _load_distributed_checkpoint(folder)


def consolidate_checkpoint(folder: str | Path, output_file: str | Path, include_optimizer: bool = False) -> Path:
    """Write the distributed checkpoint ``folder`` as one Lightning checkpoint file ``output_file``.

    The file holds the full ``state_dict`` and Lightning's metadata (epoch, global step,
    hyper-parameters, loops, callbacks), so ``MyModule.load_from_checkpoint(output_file)``
    works on any device count, without a process group. With ``include_optimizer`` the full
    optimizer states come along too (keyed ``optimizer_0``, ... by parameter name), else
    they are dropped (inference needs none). Returns ``output_file``.

    Example:
        >>> # consolidate_checkpoint("lightning_logs/version_0/checkpoints/last.ckpt", "model.pt")
    """
    output_file = Path(output_file)
    if output_file.exists():
        raise FileExistsError(f"{str(output_file)!r} exists; choose another output_file or remove it first.")
    checkpoint = load_distributed_checkpoint(folder)
    if not include_optimizer:
        for key in [k for k in checkpoint if k.startswith("optimizer_")]:
            del checkpoint[key]
    output_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output_file)
    return output_file
