"""The HF MemoryProfilerCallback in a real (CPU) Trainer run, and the same numbers as Lightning's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightning_memopt.hf import MemoryProfilerCallback  # noqa: E402

COMPARED = (
    "params_bytes",
    "grads_bytes",
    "optimizer_state_bytes",
    "buffers_bytes",
    "projection_cache_bytes",
    "workspace_bytes",
    "adamw_baseline_bytes",
    "saving_bytes",
)


# The shared ``tiny_bert`` fixture, at the sizes of these examples (token ids < 100, 12 tokens).
BERT = dict(vocab_size=100, max_position_embeddings=32)


def examples(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (n, 12), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]} for i in range(n)
    ]


def hf_fit(
    tmp_path: Path,
    callback: MemoryProfilerCallback,
    model: torch.nn.Module,
    max_steps: int = 4,
    extra_callbacks: list[transformers.TrainerCallback] | None = None,
) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        optim="adamw_torch",
        disable_tqdm=True,
    )
    callbacks = [callback, *(extra_callbacks or [])]
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples(), callbacks=callbacks)
    trainer.train()
    return trainer


class _PrintedLogs(transformers.TrainerCallback):
    """Sees ``logs`` as the Trainer's printer after it does: what a log line shows."""

    def __init__(self) -> None:
        self.keys: list[set[str]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        self.keys.append({k for k in logs or {} if k.startswith("memory/")})


def test_trainer_logs_metrics_and_writes_the_report(tmp_path: Path, tiny_bert) -> None:
    callback = MemoryProfilerCallback(interval=2, report_path=tmp_path / "memory.json", table=False)
    printed = _PrintedLogs()
    trainer = hf_fit(tmp_path, callback, tiny_bert(**BERT), extra_callbacks=[printed])
    report = json.loads((tmp_path / "memory.json").read_text())
    history = report["ranks"][0]["history"]
    assert [r["step"] for r in history] == [0, 2, 3]  # every interval, and the last step
    numel = sum(p.numel() for p in trainer.model.parameters())
    for record in history:
        assert record["params_bytes"] == 4 * numel
        assert record["grads_bytes"] == 4 * numel  # measured in on_pre_optimizer_step
        assert record["optimizer_state_bytes"] > 8 * numel
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"
    logged = [h for h in trainer.state.log_history if "memory/optimizer_state_bytes" in h]
    assert [h["step"] for h in logged][:2] == [1, 3]  # the on_log right after each record
    assert logged[0]["memory/params_bytes"] == 4 * numel  # every metric in trainer_state.json
    assert len([k for k in logged[0] if k.startswith("memory/")]) > 10
    # A log line shows the headline metrics only.
    headline = {
        "memory/" + key for key in ("peak_bytes", "training_state_bytes", "optimizer_state_bytes", "saving_ratio")
    }
    shown = [keys for keys in printed.keys if keys]
    assert shown and all(keys <= headline and "memory/optimizer_state_bytes" in keys for keys in shown)


def test_hf_and_lightning_report_the_same_numbers(tmp_path: Path, tiny_bert, quiet_trainer) -> None:
    import lightning as L

    hf_callback = MemoryProfilerCallback(interval=1, report_path=None, table=False)
    hf_fit(tmp_path, hf_callback, tiny_bert(**BERT), max_steps=2)

    from lightning_memopt.callbacks import MemoryProfiler

    class BertModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_bert(**BERT)

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    loader = torch.utils.data.DataLoader(examples(), batch_size=4)
    pl_profiler = MemoryProfiler(interval=1, report_path=None, table=False)
    quiet_trainer(max_steps=2, default_root_dir=tmp_path, callbacks=[pl_profiler]).fit(BertModule(), loader)

    hf_history = hf_callback.report["ranks"][0]["history"]
    pl_history = pl_profiler.report["ranks"][0]["history"]
    assert [r["step"] for r in hf_history] == [r["step"] for r in pl_history] == [0, 1]
    for hf_record, pl_record in zip(hf_history, pl_history):
        assert {k: hf_record[k] for k in COMPARED} == {k: pl_record[k] for k in COMPARED}
    assert hf_history[-1]["buffers_bytes"] > 0  # BERT's position_ids / token_type_ids
