"""The layers and INT8 weights in the stock ``transformers.Trainer`` (no subclass): the chunked
loss, INT8 weights (save_steps, exact resume, save_pretrained), MoE metrics, QLoRA, and the
LayerMetricsCallback; real Trainer runs on a tiny LLaMA and the real MiniLM checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_helpers import inner_optimizer, max_abs_diff, training_args
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, Trainer

from lightning_memopt.hf import LayerMetricsCallback
from lightning_memopt.layers import use_chunked_loss
from lightning_memopt.quant import is_int8_weight, load_int8_pretrained, quantize_linear_weights

VOCAB = 61


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    return LlamaForCausalLM(config)


def counting_dataset(n: int = 32, seq_len: int = 16) -> list[dict[str, Any]]:
    """Runs of consecutive token ids (mod the vocabulary): learnable in a few steps."""
    starts = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(0))
    ids = (starts[:, None] + torch.arange(seq_len)).remainder(VOCAB)
    return [{"input_ids": row, "labels": row} for row in ids]


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def run(model: torch.nn.Module, output_dir: Path, resume: str | None = None, callbacks=None, **kw: Any) -> Trainer:
    trainer = Trainer(
        model=model, args=training_args(output_dir, **kw), train_dataset=counting_dataset(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def assert_same_int8_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        if is_int8_weight(p):
            assert is_int8_weight(q), name
            assert torch.equal(p.int8_data, q.int8_data) and torch.equal(p.scales, q.scales), name
            assert p._rounding == q._rounding, name
        else:
            assert torch.equal(p, q), name


# --------------------------------------------------------------------------- chunked loss
def test_chunked_loss_in_the_stock_trainer_equals_the_plain_loss_and_resumes(tmp_path: Path) -> None:
    settings = {
        "optim": "apollo_mini",
        "optim_target_modules": "all-linear",
        "max_steps": 4,
        "gradient_accumulation_steps": 2,  # the Trainer passes num_items_in_batch to the model
        "save_strategy": "steps",
        "save_steps": 2,
    }
    plain = run(tiny_llama(), tmp_path / "plain", **settings)
    chunked = run(use_chunked_loss(tiny_llama(), chunk_size=7), tmp_path / "chunked", **settings)
    assert losses(chunked) == pytest.approx(losses(plain), rel=1e-5)
    assert max_abs_diff(plain.model, chunked.model) < 1e-5
    # eval mode: the model's own forward, the same eval loss
    eval_set = counting_dataset(8)
    assert chunked.evaluate(eval_set)["eval_loss"] == pytest.approx(plain.evaluate(eval_set)["eval_loss"], rel=1e-6)

    resumed = run(
        use_chunked_loss(tiny_llama(), chunk_size=7),
        tmp_path / "chunked",
        resume=str(tmp_path / "chunked" / "checkpoint-2"),
        **settings,
    )
    assert losses(resumed)[-2:] == pytest.approx(losses(chunked)[-2:], rel=1e-6)
    assert max_abs_diff(chunked.model, resumed.model) == 0.0


# --------------------------------------------------------------------------- INT8 weights
def int8_llama() -> LlamaForCausalLM:
    model = tiny_llama()
    quantize_linear_weights(model, group_size=16)
    return model


def test_int8_trainer_checkpoints_resume_exactly_and_log_int8_facts(tmp_path: Path) -> None:
    settings = {
        "optim": "apollo_mini",
        "optim_target_modules": "all-linear",
        "max_steps": 12,
        "save_strategy": "steps",
        "save_steps": 6,
        "logging_steps": 3,
    }
    full = run(int8_llama(), tmp_path / "run", callbacks=[LayerMetricsCallback()], **settings)
    assert losses(full)[-1] < losses(full)[0]
    assert any(is_int8_weight(p) for g in inner_optimizer(full).param_groups for p in g["params"])
    logged = [e for e in full.state.log_history if "loss" in e]
    assert logged[0]["int8_weights"] == 14.0  # 7 linear layers per block, 2 blocks
    assert logged[0]["int8_compression"] == pytest.approx(4 / (1 + 4 / 16))  # groups of 16: 1.25 bytes a weight
    assert logged[1]["int8_requantizations"] > logged[0]["int8_requantizations"] > 0

    checkpoint = tmp_path / "run" / "checkpoint-6"
    stored = load_file(checkpoint / "model.safetensors")  # 1 byte per weight on disk
    assert stored["model.layers.0.mlp.up_proj.weight.int8_data"].dtype == torch.int8
    resumed = run(int8_llama(), tmp_path / "run", resume=str(checkpoint), **settings)
    assert resumed.state.global_step == 12
    assert losses(resumed)[-2:] == losses(full)[-2:]
    assert_same_int8_model(full.model, resumed.model)  # stochastic rounding continued exactly

    full.save_model(str(tmp_path / "final"))
    assert_same_int8_model(full.model, load_int8_pretrained(LlamaForCausalLM, tmp_path / "final"))


# --------------------------------------------------------------------------- MoE metrics
def test_moe_metrics_are_averaged_over_the_logging_interval(tmp_path: Path) -> None:
    from lightning_memopt.layers import moe_aux_loss, moe_z_loss, upcycle_to_moe

    model = tiny_llama()
    upcycle_to_moe(model, num_experts=4, top_k=2)
    seen: list[tuple[float, float]] = []

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        if module.training:
            seen.append((moe_aux_loss(module).item(), moe_z_loss(module).item()))

    model.register_forward_hook(record)
    trainer = run(
        model,
        tmp_path,
        callbacks=[LayerMetricsCallback()],
        max_steps=2,
        gradient_accumulation_steps=2,
        logging_steps=2,
        optim="adamw_torch",
    )
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert len(seen) == 4  # 2 steps x 2 micro-batches, all in the interval
    assert entry["moe_aux_loss"] == pytest.approx(sum(a for a, _ in seen) / 4, rel=1e-5)
    assert entry["moe_z_loss"] == pytest.approx(sum(z for _, z in seen) / 4, rel=1e-5)
    assert 0.25 <= entry["moe_max_expert_load"] <= 1.0
    assert "int8_weights" not in entry


# --------------------------------------------------------------------------- QLoRA
@pytest.mark.slow
def test_qlora_minilm_trainer_save_and_exact_resume(
    tmp_path: Path, minilm_path: Path, prose_code_dataset: list[dict[str, Any]]
) -> None:
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    def qlora_model() -> torch.nn.Module:
        torch.manual_seed(0)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["classifier", "pooler"],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForSequenceClassification.from_pretrained(
                minilm_path, num_labels=2, quantization_config=quantization, device_map="cpu"
            )
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
        )
        return peft.get_peft_model(model, lora)

    settings = {
        "optim": "apollo_mini",
        "learning_rate": 2e-3,
        "per_device_train_batch_size": 8,
        "max_steps": 6,
        "save_strategy": "steps",
        "save_steps": 3,
    }

    def train(resume: str | None = None) -> Trainer:
        trainer = Trainer(
            model=qlora_model(), args=training_args(tmp_path / "run", **settings), train_dataset=prose_code_dataset
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = train()
    optimizer = inner_optimizer(full)
    names = {id(p): n for n, p in full.model.named_parameters()}
    trained = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
    assert trained and all("lora_" in n or "classifier" in n for n in trained)  # the 4-bit base is frozen
    lora_b = [p for n, p in full.model.named_parameters() if "lora_B" in n]
    assert lora_b and all((p != 0).any() for p in lora_b)  # lora_B starts at zero: the adapters trained
    assert (tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    resumed = train(resume=str(tmp_path / "run" / "checkpoint-3"))
    assert losses(resumed)[-3:] == pytest.approx(losses(full)[-3:], rel=1e-5)
    trainable = [(n, p) for n, p in full.model.named_parameters() if p.requires_grad]
    other = dict(resumed.model.named_parameters())
    assert max((p - other[n]).abs().max().item() for n, p in trainable) < 1e-6


# --------------------------------------------------------------------------- refusals
def test_int8_or_chunked_loss_with_fsdp_is_refused_before_training(tmp_path: Path) -> None:
    """A one-process CPU Trainer refuses fsdp itself, so the two places that refuse are driven
    directly: Trainer creation (LayerMetricsCallback.on_init_end) and our optimizer's build
    (what create_optimizer calls), both before any training step."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from lightning_memopt.hf import build_optimizer, check_trainer_setup
    from lightning_memopt.quant import dequantize_linear_weights

    fsdp = TrainingArguments(str(tmp_path), fsdp=True, fsdp_config={"version": 2}, report_to=[])
    model = int8_llama()
    with pytest.raises(ValueError, match=r"INT8 weights \(quantize_linear_weights\) cannot be trained with FSDP"):
        LayerMetricsCallback().on_init_end(fsdp, TrainerState(), TrainerControl(), model=model)
    with pytest.raises(ValueError, match="dequantize_linear_weights"):
        build_optimizer("apollo_mini", model, args=fsdp)
    dequantize_linear_weights(model)  # a float model again: allowed
    check_trainer_setup(model, fsdp)

    chunked = use_chunked_loss(tiny_llama())
    with pytest.raises(ValueError, match="use_chunked_loss cannot be used with FSDP"):
        build_optimizer("apollo", chunked, args=fsdp)
    check_trainer_setup(chunked, TrainingArguments(str(tmp_path), report_to=[]))  # no sharding: fine


# --------------------------------------------------------------------------- the objective mechanism
def test_a_loss_term_trains_through_the_stock_trainer_and_its_parts_are_logged(tmp_path: Path) -> None:
    """The mechanism early exits and MoE losses will use: a term changes ``.loss``, records parts
    that LayerMetricsCallback averages over the logging interval, and learns the step."""
    from lightning_memopt.layers import LossTerm, ObjectiveStep, add_loss_term

    class Counting(LossTerm):
        def __init__(self) -> None:
            self.forwards = 0
            self.steps: list[int] = []

        def around_forward(self, step: ObjectiveStep, name: str):
            self.forwards += 1
            return super().around_forward(step, name)

        def __call__(self, step: ObjectiveStep) -> None:
            step.parts["forward_index"] = torch.tensor(float(self.forwards))
            step.loss = step.loss + 1.0  # a constant: the gradients, hence the weights, are the plain run's

        def set_training_step(self, step: int) -> None:
            self.steps.append(step)

    settings = {"max_steps": 4, "logging_steps": 2, "optim": "adamw_torch"}
    plain = run(tiny_llama(), tmp_path / "plain", **settings)
    model, term = tiny_llama(), Counting()
    add_loss_term(model, "counting", term)
    trainer = run(model, tmp_path / "term", callbacks=[LayerMetricsCallback()], **settings)
    assert losses(trainer) == pytest.approx([x + 1.0 for x in losses(plain)], rel=1e-6)
    assert max_abs_diff(plain.model, trainer.model) == 0.0
    logged = [e["forward_index"] for e in trainer.state.log_history if "loss" in e]
    assert logged == [1.5, 3.5]  # the mean over each interval's forwards (1, 2) and (3, 4)
    assert term.steps == [0, 1, 2, 3]
