"""MoE at dense speed: our ``MoELayer`` against transformers' Mixtral block and the dense MLP.

Three measurements:

1. **One layer, forward + backward** (8 experts, top-2, hidden 512, expert width 1024 by
   default) at 512 and 2048 tokens: the time of ``out.sum().backward()`` from fresh gradients
   (as after ``zero_grad(set_to_none=True)``), for

   - ``dense``: a gated MLP with the same *active* parameters (width ``top_k x 1024``), the
     yardstick: every ratio is to it, measured in the same repeat;
   - ``ours``: :class:`~lightning_memopt.layers.MoELayer` (per-expert matrices, one gather,
     experts back to back on contiguous slices, one scatter);
   - ``ours_stacked``: the same routing with the experts stored as one 3-D parameter per
     projection and ``torch._grouped_mm`` (the layout transformers uses), to show why the
     layer keeps per-expert matrices;
   - ``mixtral_eager`` / ``mixtral_grouped_mm`` / ``mixtral_batched_mm``: transformers'
     ``MixtralSparseMoeBlock`` with each ``experts_implementation``, holding our weights (its
     output is checked equal to ours). ``batched_mm`` gathers every (token, expert) pair's
     weight matrices; it is skipped when that would not fit in a quarter of the free memory.

   The variants run interleaved, in alternating order from repeat to repeat (to cancel drift on
   a shared machine); each figure is the median with its min-max range over the repeats.
   Times are wall clock and this process's CPU time (less at the mercy of other tenants).
2. **Peak tensor memory** of one forward + backward (torch's memory timeline, every tensor:
   parameters, gradients, activations, temporaries) and the same minus the parameters.
3. **A whole tiny LLaMA's training tokens/s** (AdamW, causal LM loss on the embedded corpus):
   dense, dense with the MLP widened to the upcycled model's active width, and the dense
   model upcycled to 8 experts top-2 (:func:`~lightning_memopt.layers.upcycle_to_moe`).

Run::

    python benchmarks/moe.py                     # ~10 min on 2 busy cores
    python benchmarks/moe.py --threads 1         # one intra-op thread (steadier on a shared host)
    python benchmarks/moe.py --smoke             # tiny shapes, one repeat (the test)

Writes ``moe.json`` and ``moe.md`` to ``--out`` (``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine, format_spread, machine_line, spread
from memory_recipes import tensor_peak_during

from lightning_memopt.layers import MoELayer, upcycle_to_moe
from lightning_memopt.layers.moe import GatedMLP

# The targets (forward + backward time over the dense MLP with equal active parameters).
TARGETS = {512: 1.3, 2048: 1.15}
FULL = dict(hidden=512, intermediate=1024, experts=8, top_k=2, tokens=[512, 2048], repeats=7)
SMOKE = dict(hidden=32, intermediate=64, experts=4, top_k=2, tokens=[64, 128], repeats=1)
# The package's "tiny" LLaMA (models/llama.py: hidden 256, 4 blocks, 4 heads) with a 2 x hidden MLP.
MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


class StackedExperts(nn.Module):
    """The same routing as ``MoELayer``, experts as one 3-D parameter per projection and
    ``torch._grouped_mm`` (one call per projection, offsets from the routed counts)."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer
        experts = layer.experts

        def stack(name: str) -> nn.Parameter:
            return nn.Parameter(torch.stack([getattr(e, name).weight.detach().clone() for e in experts]))

        # (E, out, in) as nn.Linear stores them; grouped_mm takes (E, in, out): a transposed view.
        self.gate_up = nn.Parameter(torch.cat([stack("gate_proj").data, stack("up_proj").data], dim=1))
        self.down = stack("down_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        layer = self.layer
        weights, chosen = F.linear(x, layer.router.weight).float().softmax(-1).topk(layer.top_k)
        weights = weights / weights.sum(-1, keepdim=True)
        flat = chosen.t().reshape(-1)
        order = torch.argsort(flat, stable=True)
        offsets = torch.cumsum(torch.bincount(flat, minlength=layer.num_experts), 0).to(torch.int32)
        token = order % x.shape[0]
        rows = x.index_select(0, token)
        gate, up = torch._grouped_mm(rows, self.gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs=offsets)
        y = y * weights.t().reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, y).reshape(shape)


def mixtral_block(layer: MoELayer, implementation: str) -> nn.Module:
    """transformers' ``MixtralSparseMoeBlock`` with ``experts_implementation`` and our weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hidden, intermediate = layer.hidden_size, layer.experts[0].gate_proj.out_features
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=layer.num_experts,
        num_experts_per_tok=layer.top_k,
        router_jitter_noise=0.0,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        for e, expert in enumerate(layer.experts):
            block.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            block.experts.down_proj[e].copy_(expert.down_proj.weight)
    return block


def batched_mm_bytes(tokens: int, layer: MoELayer) -> int:
    """What ``batched_mm`` gathers: the three weight matrices of every (token, expert) pair, in
    the forward, and as many bytes again for their gradients in the backward."""
    return 2 * tokens * layer.top_k * layer.expert_parameters * 4


def available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = [*module.parameters(), x]

    def step() -> None:
        for p in params:
            p.grad = None  # as zero_grad(set_to_none=True): each backward writes fresh gradients
        module(x).sum().backward()

    return step


def cpu_clock() -> Callable[[], float]:
    # One thread: that thread's CPU time; more: the process's (all intra-op threads).
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def interleaved(steps: dict[str, Callable[[], Any]], repeats: int, inner: int) -> dict[str, dict[str, list[float]]]:
    """Each repeat runs every step ``inner`` times, in forward order on even repeats and in
    reverse on odd ones; returns per-step lists of seconds per call (wall and CPU)."""
    clock = cpu_clock()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in steps}
    for step in steps.values():  # warm-up: first-touch page faults, MKL's packing buffers
        step()
    names = list(steps)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), clock()
            for _ in range(inner):
                steps[name]()
            times[name]["wall"].append((time.perf_counter() - wall) / inner)
            times[name]["cpu"].append((clock() - cpu) / inner)
    return times


def layer_rows(shape: dict[str, Any], repeats: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    hidden, intermediate, experts, top_k = shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"]
    ours = MoELayer(hidden, experts, top_k, intermediate_size=intermediate)
    nn.init.normal_(ours.router.weight, std=0.5)  # a router with opinions: uneven, realistic loads
    modules: dict[str, nn.Module] = {
        "dense": GatedMLP(hidden, top_k * intermediate),
        "ours": ours,
        "ours_stacked": StackedExperts(ours),
        "mixtral_eager": mixtral_block(ours, "eager"),
        "mixtral_grouped_mm": mixtral_block(ours, "grouped_mm"),
        "mixtral_batched_mm": mixtral_block(ours, "batched_mm"),
    }
    rows = []
    for tokens in shape["tokens"]:
        x = torch.randn(1, tokens, hidden, requires_grad=True)
        skipped = {}
        need = batched_mm_bytes(tokens, ours)
        if need > available_bytes() / 4:
            skipped["mixtral_batched_mm"] = f"would gather {need / 2**30:.1f} GiB of expert weights"
        active = {name: m for name, m in modules.items() if name not in skipped}
        with torch.no_grad():
            reference = ours(x)
            for name in active:
                if name != "dense":
                    err = (active[name](x) - reference).abs().max().item()
                    if not err < 1e-4:
                        raise AssertionError(f"{name} disagrees with MoELayer at {tokens} tokens: max |diff| {err}")
        steps = {name: fwd_bwd(m, x) for name, m in active.items()}
        inner = max(1, 2048 // tokens // 2)
        times = interleaved(steps, repeats, inner)
        params_bytes = {name: sum(p.numel() * 4 for p in m.parameters()) for name, m in active.items()}
        params_bytes["ours_stacked"] = params_bytes["ours"]  # shares the router; its own stacked copies
        for name in active:
            peak = tensor_peak_during(steps[name])
            wall, cpu = times[name]["wall"], times[name]["cpu"]
            row = {
                "tokens": tokens,
                "variant": name,
                "wall_ms": spread([1e3 * t for t in wall]),
                "cpu_ms": spread([1e3 * t for t in cpu]),
                "wall_vs_dense": spread([a / b for a, b in zip(wall, times["dense"]["wall"], strict=True)]),
                "cpu_vs_dense": spread([a / b for a, b in zip(cpu, times["dense"]["cpu"], strict=True)]),
                "tensor_peak_bytes": peak,
                "peak_above_params_bytes": peak - params_bytes[name],
            }
            rows.append(row)
            print(
                f"{tokens:5d} tokens  {name:20s} wall {format_spread(row['wall_ms'], 1):>24} ms "
                f"({format_spread(row['wall_vs_dense'])}x)  cpu {format_spread(row['cpu_vs_dense'])}x  "
                f"peak {peak / 2**20:.1f} MiB",
                flush=True,
            )
        for name, why in skipped.items():
            rows.append({"tokens": tokens, "variant": name, "skipped": why})
            print(f"{tokens:5d} tokens  {name:20s} skipped: {why}", flush=True)
    return rows


def corpus_batches(batch: int, seq: int, steps: int, seed: int) -> list[torch.Tensor]:
    from lightning_memopt.data import pydoc_documents

    text = "\n".join(pydoc_documents())[:400_000].encode()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq - 1, (steps, batch), generator=generator)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


def model_rows(
    config: dict[str, int], experts: int, top_k: int, repeats: int, steps_per_repeat: int
) -> list[dict[str, Any]]:
    from lightning_memopt.layers import active_parameters
    from lightning_memopt.models import build_llama

    batch, seq = 8, 128 if config["hidden_size"] >= 128 else 32
    models = {}
    torch.manual_seed(0)
    models["dense"] = build_llama("tiny", vocab_size=257, **config)
    wide = config | {"intermediate_size": top_k * config["intermediate_size"]}
    torch.manual_seed(0)
    models["dense_equal_active"] = build_llama("tiny", vocab_size=257, **wide)
    torch.manual_seed(0)
    upcycled = build_llama("tiny", vocab_size=257, **config)
    upcycle_to_moe(upcycled, num_experts=experts, top_k=top_k)
    models[f"upcycled_{experts}x_top{top_k}"] = upcycled
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}
    batches = corpus_batches(batch, seq, steps_per_repeat, seed=0)

    def train(name: str, optimizer_step: bool) -> Callable[[], None]:
        model, optimizer = models[name].train(), optimizers[name]

        def run() -> None:
            for ids in batches:
                model(input_ids=ids, labels=ids).loss.backward()
                if optimizer_step:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return run

    # The whole step, and forward + backward alone: AdamW's step grows with the total parameters
    # (all experts), forward + backward with the active ones.
    modes = {"train": True, "fwd_bwd": False}
    steps = {f"{name}/{mode}": train(name, flag) for name in models for mode, flag in modes.items()}
    times = interleaved(steps, repeats, inner=1)
    tokens = batch * seq * steps_per_repeat
    rows = []
    for name, model in models.items():
        total, active = active_parameters(model)
        row: dict[str, Any] = {
            "model": name,
            "total_parameters": total,
            "active_parameters": active,
            "batch": [batch, seq],
        }
        for mode in modes:
            wall, cpu = times[f"{name}/{mode}"]["wall"], times[f"{name}/{mode}"]["cpu"]
            dense_wall, dense_cpu = times[f"dense/{mode}"]["wall"], times[f"dense/{mode}"]["cpu"]
            row[mode] = {
                "tokens_per_s_wall": spread([tokens / t for t in wall]),
                "tokens_per_s_cpu": spread([tokens / t for t in cpu]),
                "wall_vs_dense": spread([b / a for a, b in zip(wall, dense_wall, strict=True)]),
                "cpu_vs_dense": spread([b / a for a, b in zip(cpu, dense_cpu, strict=True)]),
            }
        rows.append(row)
        print(
            f"{name:24s} {total / 1e6:6.2f}M total {active / 1e6:6.2f}M active  training "
            f"{format_spread(row['train']['tokens_per_s_wall'], 0)} tokens/s (wall), speed vs dense (cpu) "
            f"{format_spread(row['train']['cpu_vs_dense'])}, forward + backward alone "
            f"{format_spread(row['fwd_bwd']['cpu_vs_dense'])}",
            flush=True,
        )
    return rows


def verdict(rows: list[dict[str, Any]], targets: dict[int, float]) -> dict[str, Any]:
    """Per token count: our median ratio to dense against the target, and against the fastest
    Mixtral implementation, in wall and CPU time; our peak memory against that Mixtral's."""
    out: dict[str, Any] = {}
    for tokens, target in targets.items():
        here = {r["variant"]: r for r in rows if r["tokens"] == tokens and "skipped" not in r}
        if "ours" not in here:
            continue
        mixtral = {n: r for n, r in here.items() if n.startswith("mixtral_")}
        entry: dict[str, Any] = {"target_vs_dense": target}
        for clock in ("wall", "cpu"):
            ours = here["ours"][f"{clock}_vs_dense"]["median"]
            best_name = min(mixtral, key=lambda n: mixtral[n][f"{clock}_vs_dense"]["median"])
            best = mixtral[best_name][f"{clock}_vs_dense"]["median"]
            entry[clock] = {
                "ours_vs_dense": ours,
                "fastest_mixtral": best_name,
                "mixtral_vs_dense": best,
                "meets_target": ours <= target,
                "faster_than_mixtral": ours < best,
            }
        best_mem = min(mixtral, key=lambda n: mixtral[n]["wall_vs_dense"]["median"])
        entry["peak_vs_fastest_mixtral"] = here["ours"]["tensor_peak_bytes"] / mixtral[best_mem]["tensor_peak_bytes"]
        out[str(tokens)] = entry
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def render_markdown(report: dict[str, Any]) -> str:
    shape = report["layer_shape"]
    lines = [
        "# MoE at dense speed",
        "",
        f"One MoE layer, forward + backward: {shape['experts']} experts, top-{shape['top_k']}, hidden "
        f"{shape['hidden']}, expert width {shape['intermediate']}; dense = a gated MLP of width "
        f"{shape['top_k'] * shape['intermediate']} (equal active parameters). Median (min-max) over "
        f"{report['repeats']} interleaved repeats; ratios are per repeat against the dense MLP of the same "
        f"repeat. Machine: {machine_line(report['machine'])}.",
        "",
        "| tokens | variant | wall ms | wall / dense | CPU / dense | tensor peak MiB | peak - params MiB |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["layer"]:
        if "skipped" in r:
            lines.append(f"| {r['tokens']} | {r['variant']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(
            f"| {r['tokens']} | {r['variant']} | {format_spread(r['wall_ms'], 1)} | "
            f"{format_spread(r['wall_vs_dense'])} | {format_spread(r['cpu_vs_dense'])} | "
            f"{_mib(r['tensor_peak_bytes'])} | {_mib(r['peak_above_params_bytes'])} |"
        )
    lines += ["", "Targets (ours / dense, median):", ""]
    for tokens, v in report["verdict"].items():
        for clock in ("wall", "cpu"):
            c = v[clock]
            lines.append(
                f"- {tokens} tokens, {clock}: {c['ours_vs_dense']:.2f}x (target <= {v['target_vs_dense']}: "
                f"{'met' if c['meets_target'] else 'missed'}); fastest Mixtral ({c['fastest_mixtral']}) "
                f"{c['mixtral_vs_dense']:.2f}x: {'faster' if c['faster_than_mixtral'] else 'not faster'}"
            )
        lines.append(f"- {tokens} tokens: tensor peak {v['peak_vs_fastest_mixtral']:.2f}x the fastest Mixtral's")
    if not report["model"]:
        return "\n".join(lines) + "\n"
    model = report["model_shape"]
    lines += [
        "",
        f"A whole tiny LLaMA training (AdamW, {model['num_hidden_layers']} blocks, hidden {model['hidden_size']}, "
        f"MLP width {model['intermediate_size']}, batches of {report['model'][0]['batch'][0]} x "
        f"{report['model'][0]['batch'][1]} tokens of the embedded corpus; {report['train_steps']} steps per repeat). "
        "Training = forward, backward and AdamW's step; AdamW's step grows with the total parameters (all "
        "experts), forward + backward with the active ones.",
        "",
        "| model | parameters | active | training tokens/s (wall) | training speed vs dense (wall / CPU) "
        "| forward + backward speed vs dense (wall / CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["model"]:
        train, fwd_bwd = r["train"], r["fwd_bwd"]
        lines.append(
            f"| {r['model']} | {r['total_parameters'] / 1e6:.2f}M | {r['active_parameters'] / 1e6:.2f}M | "
            f"{format_spread(train['tokens_per_s_wall'], 0)} | {format_spread(train['wall_vs_dense'])} / "
            f"{format_spread(train['cpu_vs_dense'])} | {format_spread(fwd_bwd['wall_vs_dense'])} / "
            f"{format_spread(fwd_bwd['cpu_vs_dense'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--no-model", action="store_true", help="the layer measurements only")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = dict(SMOKE if args.smoke else FULL)
    if args.tokens:
        shape["tokens"] = args.tokens
    repeats = args.repeats or shape.pop("repeats")
    shape.pop("repeats", None)
    model_shape = SMOKE_MODEL if args.smoke else MODEL
    steps = args.train_steps or (1 if args.smoke else 4)

    report: dict[str, Any] = {
        "layer_shape": shape,
        "model_shape": model_shape,
        "repeats": repeats,
        "train_steps": steps,
        "machine": describe_machine("cpu"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    report["layer"] = layer_rows(shape, repeats)
    # Smoke runs use other token counts: the small one gets the 512-token target, the large the other.
    counts = sorted(shape["tokens"])
    targets = TARGETS if set(counts) == set(TARGETS) else {counts[0]: TARGETS[512], counts[-1]: TARGETS[2048]}
    report["verdict"] = verdict(report["layer"], targets)
    model_repeats = max(1, math.ceil(repeats / 2))
    report["model"] = (
        [] if args.no_model else model_rows(model_shape, shape["experts"], shape["top_k"], model_repeats, steps)
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "moe.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
