"""Train a small LLaMA with early exits (LayerSkip style), then infer with confidence-based exit.

The same run as ``lightning-memopt fit --config configs/early_exit.yaml``, written as Python:
exits after blocks 1 and 2 of the 4-block tiny LLaMA share its final norm and LM head and are
trained with the final loss (LayerSkip's weights). Then, on held-out text, each token stops at
the first exit whose top softmax probability reaches a threshold; the table shows, per
threshold, the average number of blocks run, the fraction of blocks skipped, and the loss and
perplexity of the exited predictions against the full model's. Greedy generation with a KV
cache (``early_exit_generate``) reports the blocks skipped before each new token and the
compute saved after the skipped layers' keys and values are recomputed.

    python examples/early_exit.py              # 300 steps, a few minutes on a laptop CPU
    python examples/early_exit.py --fast       # a few steps on a slice of the corpus (smoke test)
    python examples/early_exit.py --share-head false    # each exit gets its own norm + LM head
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_memopt.callbacks import EarlyExit
from lightning_memopt.data import TextDataModule
from lightning_memopt.layers import early_exit_forward, early_exit_generate
from lightning_memopt.models import CausalLM, WarmupCosineLR
from lightning_memopt.optim import APOLLOMini

THRESHOLDS = (1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0)


def evaluate(model: torch.nn.Module, batches: list[torch.Tensor], thresholds: tuple[float, ...]) -> list[dict]:
    """Per threshold: blocks run, fraction skipped, loss of the exited predictions (teacher-forced)."""
    rows = []
    for threshold in thresholds:
        runs, losses = [], []
        for ids in batches:
            out = early_exit_forward(model, ids, threshold=threshold, labels=ids)
            runs.append(out.mean_layers_run)
            losses.append(float(out.loss))
        layers = sum(runs) / len(runs)
        loss = sum(losses) / len(losses)
        rows.append({"threshold": threshold, "layers": layers, "loss": loss, "ppl": math.exp(min(loss, 50))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps on a slice of the corpus")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--model", default="tiny", help="tiny, 60m, 130m, ... (set --exit-layers to match)")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[1, 2], help="0-based block indices")
    parser.add_argument("--share-head", default="true", choices=["true", "false"])
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    steps = 6 if args.fast else args.steps

    seed_everything(1234)
    if args.fast:
        torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and robust on a shared machine
        data = TextDataModule(sources="pydoc", bpe_vocab_size=512, seq_len=32, batch_size=4, max_chars=30_000)
    else:
        data = TextDataModule(sources=["pydoc", "stdlib"], bpe_vocab_size=2048, seq_len=128, batch_size=16)
    model = CausalLM(
        args.model,
        optimizer=partial(APOLLOMini, lr=1e-2, weight_decay=0.0, update_proj_gap=100),
        lr_scheduler=partial(WarmupCosineLR, warmup_steps=0.1),
    )
    exits = EarlyExit(exit_layers=args.exit_layers, share_head=args.share_head == "true")
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=steps,
        val_check_interval=min(100, steps),
        check_val_every_n_epoch=None,  # validate every 100 optimizer steps, across epochs
        limit_val_batches=2 if args.fast else 20,
        log_every_n_steps=min(10, steps),
        callbacks=[exits],
        logger=not args.fast,
        enable_checkpointing=not args.fast,
        enable_progress_bar=not args.fast,
        enable_model_summary=not args.fast,
    )
    trainer.fit(model, data)

    metrics = trainer.callback_metrics
    print(f"\nafter {trainer.global_step} steps, validation loss by exit:")
    for layer in args.exit_layers:
        print(f"  exit after block {layer} ({layer + 1} blocks run): {float(metrics[f'val/exit_{layer}_loss']):.3f}")
    print(f"  final ({model.model.config.num_hidden_layers} blocks):            {float(metrics['val/loss']):.3f}")

    network = model.model.eval()
    device = next(network.parameters()).device
    held_out = [batch["input_ids"].to(device) for _, batch in zip(range(2 if args.fast else 10), data.val_dataloader())]
    num_layers = network.config.num_hidden_layers
    rows = evaluate(network, held_out, THRESHOLDS)
    full = rows[0]
    prompts = held_out[0][:2, :16]
    new_tokens = 8 if args.fast else 32

    print("\nconfidence threshold -> blocks run, skipped, held-out loss (teacher-forced); greedy generation")
    header = f"{'threshold':>10} | {'blocks run':>10} | {'skipped':>7} | {'loss':>6} | {'ppl':>8} | {'vs full':>7}"
    header += f" | {'gen skipped':>11} | {'gen compute saved':>17}"
    print(header)
    print("-" * len(header))
    for row in rows:
        generated = early_exit_generate(network, prompts, max_new_tokens=new_tokens, threshold=row["threshold"])
        label = f"{row['threshold']:.1f}" + (" (full)" if row["threshold"] >= 1 else "")
        print(
            f"{label:>10} | {row['layers']:>10.2f} | {1 - row['layers'] / num_layers:>7.1%} | {row['loss']:>6.3f} | "
            f"{row['ppl']:>8.1f} | {row['loss'] - full['loss']:>+7.3f} | {generated.fraction_skipped:>11.1%} | "
            f"{generated.compute_saved:>17.1%}"
        )
    print(
        "\n'skipped': blocks a token does not run before its prediction (latency); 'compute saved': block "
        "evaluations saved after the skipped layers' keys/values are recomputed for later tokens."
    )


if __name__ == "__main__":
    main()
