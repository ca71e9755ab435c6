"""Worker of test_trainer.py::test_accelerate_fsdp2_on_gpu (torchrun on CUDA devices).

accelerate's FSDP2 (``fsdp_config={"version": 2}``) swaps the model's parameters for DTensors
when the Trainer prepares the model, after our optimizer was built; APOLLO creates its
per-parameter state at the first step, so the state lands on the DTensors. Prints one
``RESULT {json}`` line on rank 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from hf_helpers import end_process_group, inner_optimizer, random_dataset, tiny_bert, training_args
from torch.distributed.tensor import DTensor
from transformers import Trainer

import lightning_memopt  # noqa: F401  (registers optim="apollo" & co.)


def main(output_dir: Path) -> None:
    args = training_args(
        output_dir,
        optim="apollo",
        optim_args="rank=4",
        use_cpu=False,
        max_steps=8,
        learning_rate=1e-3,
        fsdp="full_shard",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"], "reshard_after_forward": True},
    )
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=random_dataset(64))
    trainer.train()
    optimizer = inner_optimizer(trainer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    result = {
        "optimizer": type(optimizer).__name__,
        "dtensor_params": all(isinstance(p, DTensor) for p in params),
        "dtensor_state": any(isinstance(s.get("exp_avg"), DTensor) for s in optimizer.state.values()),
        "first_loss": losses[0],
        "last_loss": sum(losses[-3:]) / 3,
    }
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process_group()
