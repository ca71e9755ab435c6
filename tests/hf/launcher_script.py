"""A Hugging Face training script in the style of transformers' run_clm.py that never imports
lightning_memopt: HfArgumentParser + TrainingArguments, a tiny LLaMA, a local text file.

Run by tests/hf/test_hf_launcher.py as ``python -m lightning_memopt.hf launcher_script.py ...``.
It writes what the Trainer built to ``<output_dir>/launched.json``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "a local UTF-8 text file"})
    block_size: int = field(default=16)


def main() -> None:
    parser = HfArgumentParser((DataArguments, TrainingArguments))
    data_args, training_args = parser.parse_args_into_dataclasses()
    with open(data_args.train_file, encoding="utf-8") as f:
        text = f.read()
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) % 128  # byte-level "tokenizer"
    n = len(ids) // data_args.block_size
    blocks = ids[: n * data_args.block_size].view(n, data_args.block_size)
    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    torch.manual_seed(training_args.seed)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if trainer.is_world_process_zero():
        result = {
            "optimizer": type(optimizer).__name__,
            "argv": sys.argv,
            "steps": trainer.state.global_step,
            "world_size": training_args.world_size,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        }
        with open(os.path.join(training_args.output_dir, "launched.json"), "w") as f:
            json.dump(result, f)
    if torch.distributed.is_initialized():  # end the gloo group while every rank is alive
        del trainer, model
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
