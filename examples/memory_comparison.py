"""AdamW vs APOLLO-Mini, side by side: training memory per device for the APOLLO paper's LLaMA sizes.

Estimated sizes are counted on the meta device (no memory is allocated, so even 7B runs on a
laptop) with ``lightning_memopt.memory.estimate``; the ``tiny`` row is measured with
``lightning_memopt.memory.breakdown`` on real tensors after one real optimizer step of each.
fp32 weights, gradients and moments; activations are not included (they depend on the batch).

    python examples/memory_comparison.py            # tiny (measured), 60m ... 7b (estimated)
    python examples/memory_comparison.py --fast     # tiny, 60m, 130m (smoke test)
"""

from __future__ import annotations

import argparse

import torch

from lightning_memopt.memory import breakdown, estimate
from lightning_memopt.models import build_llama
from lightning_memopt.optim import create_optimizer

OPTIMIZERS = ("adamw", "apollo_mini")


def size_text(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 100 * 2**20 else f"{n / 2**20:.1f} MiB"


def measured(size: str) -> dict[str, object]:
    """One real step of each optimizer on a real model; bytes counted from the tensors."""
    result = {}
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = build_llama(size, vocab_size=2048)
        optimizer = create_optimizer(name, model, lr=1e-3)
        tokens = torch.randint(0, 2048, (2, 32))
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()  # creates the state; the gradients are still there, as during a step
        result[name] = breakdown(model, optimizer)
    return result


def estimated(size: str) -> dict[str, object]:
    with torch.device("meta"):
        model = build_llama(size)
    return {name: estimate(model, name) for name in OPTIMIZERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="only the three smallest sizes")
    args = parser.parse_args()
    sizes = ["60m", "130m"] if args.fast else ["60m", "130m", "350m", "1b", "7b"]

    header = ("model", "params", "AdamW state", "Mini state", "saved", "AdamW total", "Mini total", "saved")
    widths = (6, 7, 12, 11, 6, 12, 11, 6)
    line = "  ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths)))
    print("fp32 training memory per device: weights + gradients + optimizer state")
    print(line)
    print("-" * len(line))
    rows = [("tiny*", measured("tiny"))] + [(s, estimated(s)) for s in sizes]
    for size, result in rows:
        adamw, mini = result["adamw"], result["apollo_mini"]
        adamw_total = adamw.params_bytes + adamw.grads_bytes + adamw.optimizer_state_bytes
        # What APOLLO-Mini holds outside its state (projection cache, CPU step workspace) counts too.
        mini_total = mini.savings()["total"].measured_bytes
        cells = (
            size,
            f"{adamw.numel / 1e6:,.0f}M" if adamw.numel >= 1e7 else f"{adamw.numel / 1e6:.1f}M",
            size_text(adamw.optimizer_state_bytes),
            size_text(mini.optimizer_state_bytes),
            f"{100 * (1 - mini.optimizer_state_bytes / adamw.optimizer_state_bytes):.0f}%",
            size_text(adamw_total),
            size_text(mini_total),
            f"{100 * (1 - mini_total / adamw_total):.0f}%",
        )
        print("  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))
    print(
        "Mini = APOLLO-Mini. * measured on real tensors after one step; the other rows are estimated on the meta "
        "device.\nAPOLLO-Mini keeps 2n + 2 floats per low-rank m x n matrix (m <= n) where AdamW keeps 2mn; "
        "embeddings, norms and the LM head keep AdamW's state, so the whole-model saving grows with depth and width."
    )


if __name__ == "__main__":
    main()
