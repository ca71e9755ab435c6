"""Real Trainer.train() runs: the MiniLM checkpoint, resume, layer-wise mode, the rest of the HF stack."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import inner_optimizer, max_abs_diff, random_dataset, tiny_bert, training_args
from transformers import AutoModelForSequenceClassification, Trainer

from lightning_memopt.hf import TrainerLayerwiseOptimizer
from lightning_memopt.optim import APOLLO, APOLLOMini

HERE = Path(__file__).resolve().parent


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def learning_rates(trainer: Trainer) -> list[float]:
    return [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]


def train(model: torch.nn.Module, dataset: list[dict[str, Any]], output_dir: Path, resume: str | None = None, **kw):
    trainer = Trainer(model=model, args=training_args(output_dir, **kw), train_dataset=dataset)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# --------------------------------------------------------------------------- the real checkpoint
@pytest.mark.slow
def test_minilm_finetune_loss_falls_and_resume_continues(
    tmp_path: Path, minilm_path: Path, prose_code_dataset: list[dict[str, Any]]
) -> None:
    settings = {
        "optim": "apollo",
        "optim_args": "rank=32,update_proj_gap=10",  # the projection is redrawn after the resume point
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
        "per_device_train_batch_size": 8,
        "max_steps": 24,
        "save_strategy": "steps",
        "save_steps": 16,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
    }

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
        # Frozen word embeddings (half of MiniLM's 22M weights): a faster step and a smaller checkpoint.
        model.get_input_embeddings().weight.requires_grad_(False)
        return model

    full = train(fresh_model(), prose_code_dataset, tmp_path / "full", **settings)
    assert type(inner_optimizer(full)) is APOLLO
    run_losses = losses(full)
    assert len(run_losses) == 24
    assert sum(run_losses[-4:]) / 4 < 0.5 * sum(run_losses[:4]) / 4, run_losses

    # optimizer.pt holds tensors only: the Trainer's weights_only=True load works
    checkpoint = tmp_path / "full" / "checkpoint-16"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("exp_avg" in s and s["exp_avg"].shape[1] == 32 for s in state["state"].values())

    resumed = train(fresh_model(), prose_code_dataset, tmp_path / "full", resume=str(checkpoint), **settings)
    assert resumed.state.global_step == 24
    assert losses(resumed)[-8:] == pytest.approx(run_losses[-8:], rel=1e-4, abs=1e-6)
    assert max_abs_diff(full.model, resumed.model) < 1e-5


# --------------------------------------------------------------------------- layer-wise mode
def test_layerwise_with_gradient_accumulation_equals_the_plain_optimizer(tmp_path: Path) -> None:
    # 28 samples / batch 4 = 7 micro-batches per epoch: windows of 3, 3 and a short one of 1.
    dataset = random_dataset(28)
    name, cls = "apollo", APOLLO
    settings = {
        "optim_args": "rank=4,update_proj_gap=3",
        "gradient_accumulation_steps": 3,
        "num_train_epochs": 2,
        "weight_decay": 0.1,
        "max_grad_norm": 0.0,
        "warmup_steps": 2,
    }
    plain = train(tiny_bert(), dataset, tmp_path / "plain", optim=name, **settings)
    layerwise = train(tiny_bert(), dataset, tmp_path / "layerwise", optim=f"{name}_layerwise", **settings)

    optimizer = inner_optimizer(layerwise)
    assert isinstance(optimizer, TrainerLayerwiseOptimizer) and type(optimizer.optimizer) is cls
    assert layerwise.state.global_step == plain.state.global_step == 6
    # the scheduler stepped once per optimizer step, and the same learning rates were used
    assert layerwise.lr_scheduler.last_epoch == plain.lr_scheduler.last_epoch == 6
    assert learning_rates(layerwise) == learning_rates(plain)
    assert losses(layerwise) == pytest.approx(losses(plain), rel=1e-5)
    assert max_abs_diff(plain.model, layerwise.model) < 1e-6
    # and every gradient was consumed inside backward
    assert all(p.grad is None for p in layerwise.model.parameters())


def test_layerwise_checkpoint_resume(tmp_path: Path) -> None:
    dataset = random_dataset(16)  # 2 optimizer steps per epoch: checkpoint-3 lies inside epoch 2
    settings = {
        "optim": "apollo_layerwise",
        "optim_args": "rank=4",
        "gradient_accumulation_steps": 2,
        "max_steps": 6,
        "max_grad_norm": 0.0,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    full = train(tiny_bert(), dataset, tmp_path / "run", **settings)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(state["state"]) == sum(1 for p in full.model.parameters() if p.requires_grad)
    assert all(int(s["step"]) == 3 for s in state["state"].values())

    resumed = train(tiny_bert(), dataset, tmp_path / "run", resume=str(checkpoint), **settings)
    assert isinstance(inner_optimizer(resumed), TrainerLayerwiseOptimizer)
    assert resumed.lr_scheduler.last_epoch == 6
    assert max_abs_diff(full.model, resumed.model) < 1e-6
    # a checkpoint of the layer-wise run is the plain optimizer's: it loads into optim="apollo"
    plain = Trainer(model=tiny_bert(), args=training_args(tmp_path / "x", optim="apollo", optim_args="rank=4"))
    plain.create_optimizer().load_state_dict(state)


def test_gradient_checkpointing_layerwise_and_accumulation(tmp_path: Path) -> None:
    dataset = random_dataset(24)
    settings = {"optim_args": "rank=4", "gradient_accumulation_steps": 2, "max_steps": 3, "max_grad_norm": 0.0}
    reference = train(tiny_bert(), dataset, tmp_path / "a", optim="apollo_mini", **settings)
    checkpointed = train(
        tiny_bert(), dataset, tmp_path / "b", optim="apollo_mini_layerwise", gradient_checkpointing=True, **settings
    )
    assert type(inner_optimizer(checkpointed).optimizer) is APOLLOMini
    assert checkpointed.model.is_gradient_checkpointing
    assert max_abs_diff(reference.model, checkpointed.model) < 1e-6


@pytest.mark.parametrize("name", ["apollo_mini", "apollo_layerwise"])
def test_bf16_on_cpu(tmp_path: Path, name: str) -> None:
    before = tiny_bert()
    trainer = train(tiny_bert(), random_dataset(16), tmp_path, optim=name, bf16=True, max_steps=4, max_grad_norm=0.0)
    assert trainer.args.bf16
    assert all(torch.isfinite(torch.tensor(loss)) for loss in losses(trainer))
    assert max_abs_diff(before, trainer.model) > 0


def test_peft_lora_apollo_on_the_adapters(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
    )
    trainer = train(model, random_dataset(16), tmp_path, optim="apollo_mini", max_steps=4, learning_rate=1e-3)
    optimizer = inner_optimizer(trainer)
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    low_rank = {names[id(p)] for g in optimizer.param_groups if g["low_rank"] for p in g["params"]}
    assert low_rank and all(".lora_A." in n or ".lora_B." in n for n in low_rank)
    assert len(low_rank) == 8  # lora_A and lora_B of query and value, 2 layers
    # APOLLO-Mini keeps rank-1 moments for an adapter: 2 x max(8, 32) floats instead of AdamW's 2 x 8 x 32
    lora_a = next(p for p in optimizer.param_groups[0]["params"] if ".lora_A." in names[id(p)])
    assert optimizer.state[lora_a]["exp_avg"].numel() == 32
    assert all((p.detach() != 0).any() for n, p in model.named_parameters() if ".lora_B." in n), (
        "lora_B starts at zero and must have been trained"
    )


# --------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, script: Path, *args: str, timeout: int = 300) -> dict[str, Any]:
    # The workers import hf_helpers (beside them) and tiny_models (in tests/).
    path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        str(script),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_ddp_layerwise_two_processes(tmp_path: Path) -> None:
    """torchrun, 2 CPU processes, gloo: layer-wise (after DDP's all-reduce) equals the plain optimizer."""
    result = _torchrun(2, HERE / "ddp_trainer_worker.py", str(tmp_path))
    assert result["world_size"] == 2
    for name in ("apollo", "apollo_layerwise"):
        run = result[name]
        assert run["wrapped"] == "DistributedDataParallel"
        assert run["max_rank_difference"] == 0.0  # the replicas stay identical
        assert run["global_step"] == run["scheduler_steps"] == 6
    assert result["apollo_layerwise"]["optimizer"] == "TrainerLayerwiseOptimizer"
    assert result["max_difference"] < 1e-6
    assert result["checkpoint_loads_weights_only"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="accelerate FSDP2 needs a CUDA device (on CPU it is DDP)")
def test_accelerate_fsdp2_on_gpu(tmp_path: Path) -> None:
    """fsdp_config={"version": 2}: APOLLO creates its state lazily, on the DTensor parameters accelerate swaps in."""
    result = _torchrun(min(2, torch.cuda.device_count()), HERE / "fsdp2_trainer_worker.py", str(tmp_path))
    assert result["optimizer"] == "APOLLO"
    assert result["dtensor_params"] and result["dtensor_state"]
    assert result["last_loss"] < result["first_loss"]
