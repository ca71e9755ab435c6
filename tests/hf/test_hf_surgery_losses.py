"""Early exits and MoE auxiliary losses in the stock ``transformers.Trainer`` (no subclass): the
surgery makes the model's own ``forward`` return the training objective, the Trainer trains it
(compared step by step with a plain loop on the core functions), LayerMetricsCallback logs the
parts, and a checkpoint resumes exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import max_abs_diff, training_args
from transformers import Trainer

from lightning_memopt.hf import LayerMetricsCallback
from lightning_memopt.layers import (
    add_early_exits,
    early_exit_loss,
    get_objective,
    last_loss_parts,
    moe_aux_loss,
    moe_z_loss,
    remove_early_exits,
    remove_moe_loss,
    set_training_step,
    upcycle_to_moe,
)

VOCAB, SEQ, ROWS = 64, 16, 8


def counting_rows(n: int = ROWS) -> list[dict[str, Any]]:
    """Runs of consecutive token ids (mod the vocabulary): learnable in a few steps."""
    starts = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0))
    ids = (starts[:, None] + torch.arange(SEQ)).remainder(VOCAB)
    return [{"input_ids": row, "labels": row} for row in ids]


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# One batch of all rows per step (order-free means), SGD, constant LR, no clipping: the Trainer's
# trajectory is then a plain loop's on the core functions.
EXACT = {
    "optim": "sgd",
    "learning_rate": 0.1,
    "lr_scheduler_type": "constant",
    "max_grad_norm": 0.0,
    "per_device_train_batch_size": ROWS,
    "max_steps": 4,
}


def train(model: torch.nn.Module, output_dir: Path, resume: str | None = None, **settings: Any) -> Trainer:
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, **EXACT | settings),
        train_dataset=counting_rows(),
        callbacks=[LayerMetricsCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def with_exits(tiny_llama, **options: Any) -> torch.nn.Module:
    model = tiny_llama(vocab_size=VOCAB, num_hidden_layers=4)
    add_early_exits(model, [1, 2], **options)
    return model


# --------------------------------------------------------------------------- early exits
def test_forward_loss_is_the_early_exit_objective_in_training_and_the_final_loss_in_eval(tiny_llama) -> None:
    model = with_exits(tiny_llama, curriculum="rotational", curriculum_steps=2)
    ids = torch.stack([row["input_ids"] for row in counting_rows()])
    for step in (0, 1):
        set_training_step(model, step)
        objective = model(input_ids=ids, labels=ids).loss
        parts = last_loss_parts(model)
        reference = early_exit_loss(model, ids, step=step)
        torch.testing.assert_close(objective, reference.loss, rtol=1e-6, atol=1e-6)
        assert set(parts) == {f"exit_{layer}_loss" for layer in reference.exit_losses}  # one exit per step
        for layer, loss in reference.exit_losses.items():
            torch.testing.assert_close(parts[f"exit_{layer}_loss"], loss.detach())
    # Under gradient accumulation the Trainer passes num_items_in_batch: sums over it, as transformers does.
    tokens = ids[:, 1:].numel()
    half = model(input_ids=ids[:4], labels=ids[:4], num_items_in_batch=tokens).loss
    other = model(input_ids=ids[4:], labels=ids[4:], num_items_in_batch=tokens).loss
    torch.testing.assert_close(half + other, early_exit_loss(model, ids, step=1).loss, rtol=1e-5, atol=1e-6)

    model.eval()
    final = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(final, early_exit_loss(model, ids).final_loss)
    assert last_loss_parts(model) == {}
    model.train()
    remove_early_exits(model)
    assert get_objective(model) is None
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, final)


def test_early_exits_train_in_the_stock_trainer_as_the_core_loss_and_resume_exactly(tmp_path: Path, tiny_llama) -> None:
    options = {"share_head": False, "curriculum": "rotational", "curriculum_steps": 2}
    settings = {"save_strategy": "steps", "save_steps": 2}
    trainer = train(with_exits(tiny_llama, **options), tmp_path / "run", **settings)

    # The same 4 steps in a plain loop on early_exit_loss (curriculum by step), SGD at the same LR.
    reference = with_exits(tiny_llama, **options)
    optimizer = torch.optim.SGD(reference.parameters(), lr=EXACT["learning_rate"])
    ids = torch.stack([row["input_ids"] for row in counting_rows()])
    expected, exit_losses = [], []
    for step in range(EXACT["max_steps"]):
        out = early_exit_loss(reference, ids, step=step)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(out.loss.item())
        exit_losses.append({f"exit_{k}_loss": v.item() for k, v in out.exit_losses.items()})
    assert losses(trainer) == pytest.approx(expected, rel=1e-4)
    assert losses(trainer)[-1] < losses(trainer)[0]
    assert max_abs_diff(trainer.model, reference) < 1e-5
    logged = [e for e in trainer.state.log_history if "loss" in e]
    for entry, parts in zip(logged, exit_losses, strict=True):
        assert {k: v for k, v in entry.items() if k.startswith("exit_")} == pytest.approx(parts, rel=1e-4)
    assert "exit_1_loss" in logged[0] and "exit_2_loss" in logged[1]  # the rotation, by optimizer step

    # Eval: the final layer's loss, as a model without exits reports it.
    final = early_exit_loss(trainer.model, ids).final_loss.item()
    assert trainer.evaluate(counting_rows())["eval_loss"] == pytest.approx(final, rel=1e-5)

    # Own exit heads are in the checkpoint; resuming from step 2 ends where the full run ended.
    resumed = train(with_exits(tiny_llama, **options), tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.state.global_step == EXACT["max_steps"]
    assert losses(resumed)[-2:] == pytest.approx(losses(trainer)[-2:], rel=1e-6)
    assert max_abs_diff(trainer.model, resumed.model) == 0.0


# --------------------------------------------------------------------------- MoE
def test_moe_losses_train_in_the_stock_trainer_and_resume_exactly(tmp_path: Path, tiny_llama) -> None:
    weights = {"aux_loss_weight": 0.1, "z_loss_weight": 0.01}

    def moe_model() -> torch.nn.Module:
        model = tiny_llama(vocab_size=VOCAB)
        upcycle_to_moe(model, num_experts=4, top_k=2, **weights)
        return model

    # The forward's training loss is the LM loss plus the weighted auxiliary losses; eval: the LM loss.
    model = moe_model()
    ids = torch.stack([row["input_ids"] for row in counting_rows()])
    objective = model(input_ids=ids, labels=ids).loss
    aux, z = moe_aux_loss(model), moe_z_loss(model)
    assert set(last_loss_parts(model)) == {"moe_aux_loss", "moe_z_loss"}
    model.eval()
    lm_loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(objective, lm_loss + 0.1 * aux + 0.01 * z)
    model.train()

    settings = {"save_strategy": "steps", "save_steps": 2}
    trainer = train(moe_model(), tmp_path / "run", **settings)

    reference = moe_model()
    remove_moe_loss(reference)  # the plain loop adds the losses itself, as before this change
    optimizer = torch.optim.SGD(reference.parameters(), lr=EXACT["learning_rate"])
    expected, parts = [], []
    for _ in range(EXACT["max_steps"]):
        lm = reference(input_ids=ids, labels=ids).loss
        aux, z = moe_aux_loss(reference), moe_z_loss(reference)
        loss = lm + 0.1 * aux + 0.01 * z
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
        parts.append({"moe_aux_loss": aux.item(), "moe_z_loss": z.item()})
    assert losses(trainer) == pytest.approx(expected, rel=1e-4)
    assert max_abs_diff(trainer.model, reference) < 1e-5
    logged = [e for e in trainer.state.log_history if "loss" in e]
    for entry, part in zip(logged, parts, strict=True):
        assert {k: entry[k] for k in part} == pytest.approx(part, rel=1e-4)
        assert 0.25 <= entry["moe_max_expert_load"] <= 1.0

    resumed = train(moe_model(), tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-2"))
    assert losses(resumed)[-2:] == pytest.approx(losses(trainer)[-2:], rel=1e-6)
    assert max_abs_diff(trainer.model, resumed.model) == 0.0
