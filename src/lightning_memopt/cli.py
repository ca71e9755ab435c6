"""The ``lightning-memopt`` command: a LightningCLI over our modules.

Example:
    $ lightning-memopt fit --config configs/quickstart.yaml
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_memopt  # noqa: F401  (registers strategies and optimizer names)


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` defaults to ``sys.argv``)."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
    )


if __name__ == "__main__":
    main()
