"""Pre-train a small LLaMA with APOLLO in plain Lightning (no CLI), and read the memory report.

The same run as ``lightning-memopt fit --config configs/apollo.yaml``, written as Python: the
model takes the optimizer as a callable and builds it in ``configure_optimizers``, so the
same code shards correctly under ``strategy="apollo_fsdp"``.

    python examples/pretrain_apollo.py              # 300 steps, a few minutes on a laptop CPU
    python examples/pretrain_apollo.py --fast       # 4 steps on a slice of the corpus (smoke test)
    python examples/pretrain_apollo.py --devices 2 --strategy apollo_fsdp   # 2 CPU processes, FSDP2
"""

from __future__ import annotations

import argparse
from functools import partial

from lightning.pytorch import Trainer, seed_everything

import lightning_memopt  # noqa: F401  (registers the apollo_fsdp strategy names)
from lightning_memopt.callbacks import MemoryProfiler
from lightning_memopt.data import TextDataModule
from lightning_memopt.models import CausalLM, WarmupCosineLR
from lightning_memopt.optim import APOLLO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps on a slice of the corpus")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="tiny", help="tiny, 60m, 130m, 350m, 1b, 7b or a local HF folder")
    parser.add_argument("--rank", type=int, default=64, help="APOLLO's projection rank (paper: ~hidden/4)")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="e.g. apollo_fsdp (with --devices 2)")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    steps = 4 if args.fast else args.steps

    seed_everything(1234)
    if args.fast:  # a slice of the corpus in small batches: checks that everything runs, in seconds
        data = TextDataModule(sources="pydoc", bpe_vocab_size=2048, seq_len=64, batch_size=4, max_chars=60_000)
    else:
        data = TextDataModule(sources="pydoc", bpe_vocab_size=2048, seq_len=128, batch_size=16)
    model = CausalLM(
        args.model,
        optimizer=partial(APOLLO, lr=1e-2, rank=args.rank, scale_type="channel", update_proj_gap=100, weight_decay=0.0),
        lr_scheduler=partial(WarmupCosineLR, warmup_steps=0.1),
    )
    profiler = MemoryProfiler(interval=50, report_path="memopt_reports/pretrain_apollo.json", plot=not args.fast)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        max_steps=steps,
        val_check_interval=min(100, steps),
        limit_val_batches=2 if args.fast else 20,
        log_every_n_steps=min(10, steps),
        callbacks=[profiler],
        logger=not args.fast,
        enable_checkpointing=not args.fast,
    )
    trainer.fit(model, data)

    if trainer.is_global_zero:
        final = profiler.report["ranks"][0]["final"]
        state, adamw = final["optimizer_state_bytes"] / 2**20, final["adamw_baseline_optimizer_state_bytes"] / 2**20
        print(
            f"val/loss {trainer.callback_metrics['val/loss']:.3f} after {trainer.global_step} steps, "
            f"{model.tokens_per_second:,.0f} tokens/s; "
            f"optimizer state {state:.2f} MiB per device vs {adamw:.2f} MiB for fp32 AdamW"
        )


if __name__ == "__main__":
    main()
