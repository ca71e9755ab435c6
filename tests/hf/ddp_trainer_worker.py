"""Worker of test_trainer.py::test_ddp_layerwise_two_processes (run by torchrun, 2 CPU processes, gloo).

Trains the same tiny BERT twice under DDP with gradient accumulation, with optim="apollo" and
optim="apollo_layerwise", and prints one ``RESULT {json}`` line on rank 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hf_helpers import end_process_group, inner_optimizer, random_dataset, tiny_bert, training_args
from transformers import Trainer

import lightning_memopt  # noqa: F401  (registers optim="apollo" & co.)


def main(output_dir: Path) -> None:
    dataset = random_dataset(40)  # 2 ranks x batch 4: 5 micro-batches per rank and epoch
    result: dict = {}
    flats = {}
    for name in ("apollo", "apollo_layerwise"):
        args = training_args(
            output_dir / name,
            optim=name,
            optim_args="rank=4,update_proj_gap=2",
            gradient_accumulation_steps=2,
            num_train_epochs=2,
            weight_decay=0.1,
            max_grad_norm=0.0,
            ddp_backend="gloo",
            save_strategy="steps",
            save_steps=6,
        )
        trainer = Trainer(model=tiny_bert(), args=args, train_dataset=dataset)
        trainer.train()
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        flats[name] = flat
        result[name] = {
            "optimizer": type(inner_optimizer(trainer)).__name__,
            "wrapped": type(trainer.model_wrapped).__name__,
            "max_rank_difference": max((g - flat).abs().max().item() for g in gathered),
            "global_step": trainer.state.global_step,
            "scheduler_steps": trainer.lr_scheduler.last_epoch,
        }
    if dist.get_rank() == 0:
        result["world_size"] = dist.get_world_size()
        result["max_difference"] = (flats["apollo"] - flats["apollo_layerwise"]).abs().max().item()
        state = torch.load(output_dir / "apollo_layerwise" / "checkpoint-6" / "optimizer.pt", weights_only=True)
        result["checkpoint_loads_weights_only"] = bool(state["state"])
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_process_group()
