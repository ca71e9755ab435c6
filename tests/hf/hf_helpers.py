"""Plain helpers of the HF Trainer tests (fixtures are in conftest.py).

The data is a two-class task built from text every Python ships: prose from the CPython
documentation (``pydoc_data.topics``, label 0) against standard-library source code
(label 1). A pretrained encoder learns it in a few dozen steps, so the loss visibly falls.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import torch

# The one tiny BERT (tests/tiny_models.py; the ``tiny_bert`` fixture in-process), re-exported for
# the torchrun workers, which cannot take fixtures.
from tiny_models import tiny_bert as tiny_bert


def prose_and_code(n_per_class: int, chars: int = 300) -> tuple[list[str], list[int]]:
    """``n_per_class`` documentation passages (label 0) and as many code passages (label 1)."""
    from pydoc_data.topics import topics

    prose = [topics[name][:chars] for name in sorted(topics) if len(topics[name]) >= chars][:n_per_class]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8", errors="replace")[:chars] for p in sorted(stdlib.glob("*.py"))]
    code = [c for c in code if len(c) >= chars // 2][:n_per_class]
    texts = [t for pair in zip(prose, code) for t in pair]  # interleaved: every batch sees both classes
    labels = [i % 2 for i in range(len(texts))]
    return texts, labels


def tokenized(tokenizer: Any, texts: list[str], labels: list[int], max_length: int) -> list[dict[str, Any]]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length")
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels)
    ]


def random_dataset(n: int, seq_len: int = 16, vocab_size: int = 256, seed: int = 0) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (n, seq_len), generator=generator)
    return [{"input_ids": ids[i], "labels": int(ids[i, 0] % 2)} for i in range(n)]


def training_args(output_dir: Path | str, **overrides: Any) -> Any:
    """Quiet, CPU, no saving, no reporting: TrainingArguments for tests."""
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def inner_optimizer(trainer: Any) -> torch.optim.Optimizer:
    """The optimizer the Trainer built (accelerate wraps it in an ``AcceleratedOptimizer``)."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def end_process_group() -> None:
    """Destroy a torchrun worker's process group while every rank is still alive.

    Call it after the Trainers are gone: a DDP/FSDP model keeps the group alive, and a gloo
    group torn down at interpreter exit, while a peer exits, can abort the process (SIGABRT).
    """
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
