"""UpcycleToMoE: a Lightning fit of CausalLM upcycled to experts, with its auxiliary loss,
logging, modality ids from the batch, and checkpoint save and resume."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_memopt.callbacks import UpcycleToMoE
from lightning_memopt.data import pydoc_documents
from lightning_memopt.layers import moe_aux_loss, moe_layers, moe_z_loss, upcycle_to_moe
from lightning_memopt.models import CausalLM
from lightning_memopt.optim import APOLLOMini

SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}


# Tiny tensors: one thread is as fast, and far faster on a shared, loaded machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def text_batches(batches: int = 6, modality: int | None = None) -> DataLoader:
    """Byte-level windows of the CPython documentation, as ``TextDataModule`` batches look."""
    data = torch.frombuffer(bytearray("\n".join(pydoc_documents())[:100_000].encode()), dtype=torch.uint8).long()
    starts = torch.randint(0, data.numel() - 33, (batches * 4,), generator=torch.Generator().manual_seed(0))
    items = [{"input_ids": data[s : s + 32]} for s in starts.tolist()]
    if modality is not None:
        items = [item | {"modality_ids": torch.tensor(modality)} for item in items]
    return DataLoader(items, batch_size=4)


def causal_lm() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM("tiny", optimizer=partial(APOLLOMini, lr=1e-2), vocab_size=257, model_overrides=SMALL)


@pytest.fixture
def trainer(quiet_trainer):
    """``trainer(tmp_path, callback, steps, **kwargs)``: quiet, checkpoints on, no validation."""

    def make(tmp_path: Path, callback: UpcycleToMoE, steps: int, **kwargs) -> L.Trainer:
        options = dict(max_steps=steps, default_root_dir=tmp_path, enable_checkpointing=True, limit_val_batches=0)
        return quiet_trainer(callbacks=[callback], **options | kwargs)

    return make


def test_fit_upcycles_before_the_optimizer_and_adds_the_aux_loss(tmp_path: Path, trainer) -> None:
    lm = causal_lm()
    callback = UpcycleToMoE(num_experts=4, top_k=2, layers=[1], log_expert_loads=True)
    extra: list[tuple[float, float]] = []

    class Check(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert all(id(p) in optimized for p in pl_module.parameters())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            trained_on = outputs["loss"].item() - trainer.callback_metrics["train/loss"].item()
            model = pl_module.model
            extra.append((trained_on, 0.01 * moe_aux_loss(model).item() + 0.001 * moe_z_loss(model).item()))

    fit = trainer(tmp_path, callback, steps=4, enable_checkpointing=False)
    fit.callbacks.append(Check())
    fit.fit(lm, text_batches())
    assert [n for n, _ in moe_layers(lm.model)] == ["model.layers.1.mlp"]
    metrics = fit.callback_metrics
    assert metrics["train/moe_aux_loss"] >= 1.0 and metrics["train/moe_max_expert_load"] >= 1.0
    assert "train/moe_z_loss" in metrics and "train/moe_load/model.layers.1.mlp/3" in metrics
    # The loss that trains is the LM loss (logged as train/loss) plus the weighted aux losses.
    assert len(extra) == 4 and all(trained_on == pytest.approx(term, abs=1e-5) for trained_on, term in extra), extra
    assert "configure_model" not in vars(lm)


def test_checkpoint_resumes_and_loads_into_a_model_upcycled_the_same_way(tmp_path: Path, trainer) -> None:
    first = trainer(tmp_path, UpcycleToMoE(num_experts=4, top_k=2), steps=2)
    first.fit(causal_lm(), text_batches())
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    resumed = trainer(tmp_path / "resumed", UpcycleToMoE(num_experts=4, top_k=2), steps=4)
    lm = causal_lm()
    resumed.fit(lm, text_batches(), ckpt_path=ckpt)
    assert resumed.global_step == 4 and len(moe_layers(lm.model)) == 2

    state = torch.load(ckpt, weights_only=True)["state_dict"]
    plain = causal_lm()
    plain.configure_model()
    upcycle_to_moe(plain.model, num_experts=4, top_k=2)
    plain.load_state_dict(state)  # strict: same keys and shapes
    ids = torch.randint(0, 257, (1, 16))
    assert torch.isfinite(plain(ids).logits).all()


def test_modality_ids_come_from_the_batch(tmp_path: Path, trainer) -> None:
    lm = causal_lm()
    callback = UpcycleToMoE(num_experts=4, top_k=2, modality_groups=[2, 2])
    trainer(tmp_path, callback, steps=2, enable_checkpointing=False).fit(lm, text_batches(modality=1))
    for _, layer in moe_layers(lm.model):
        assert layer.tokens_per_expert[:2].sum() == 0 and layer.tokens_per_expert[2:].sum() == 4 * 32 * 2
        assert layer.modality_ids is None

    missing = trainer(tmp_path, UpcycleToMoE(num_experts=4, top_k=2, modality_groups=[2, 2]), steps=1)
    with pytest.raises(ValueError, match="no 'modality_ids'"):
        missing.fit(causal_lm(), text_batches())


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="top_k=5"):
        UpcycleToMoE(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="sum to 3"):
        UpcycleToMoE(num_experts=4, modality_groups=[2, 1])
    with pytest.raises(ValueError, match="aux_loss_weight=-1"):
        UpcycleToMoE(aux_loss_weight=-1)
