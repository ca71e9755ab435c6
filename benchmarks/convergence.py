"""Convergence with tuned learning rates: the APOLLO paper's pre-training comparison, small.

A LLaMA-family model (~12M parameters: hidden 384, 6 blocks, a 4096-token BPE) is pre-trained on
the embedded corpus (the CPython documentation and the standard library's sources) with every
optimizer under the same token budget and the paper's schedule (10% linear warm-up, cosine decay
to 10%). The corpus is split by *document* (every 20th document held out), so the validation text
never appears in training. Each optimizer gets its own learning-rate sweep (three values around the
paper's recommendation, all reported); the best learning rate is then repeated with more seeds.

Contenders: ``adamw`` (fused), ``apollo`` (rank hidden/4, channel-wise scaling), ``apollo_mini``,
``adamw8bit`` (bitsandbytes), ``apollo_mini+int8`` (INT8 weights with stochastic rounding),
``apollo_mini+layerwise`` (in-backward updates) and, when ``galore-torch`` is installed (the
``bench`` extra), ``galore`` (rank hidden/4, the GaLore paper's scale 0.25).

The sweep is long on a CPU (each run is ``--tokens`` tokens), so it is resumable: every finished
run is appended to ``convergence.json`` at once, and a later invocation skips the runs that are
there (same optimizer, learning rate, seed, token budget and model); a run cut off midway continues
from its last evaluation (``partial/``). Run it in pieces with ``--only`` and ``--lrs``; the table,
``convergence.md`` and the plot ``convergence.png`` are rebuilt from all runs each time.

``convergence.json`` is a list of runs, each ``{"optimizer", "lr", "seed", "val_loss",
"optimizer_state_bytes", "tokens_per_s", ...}`` (plus the curve and the settings), for other tools.

Usage::

    python benchmarks/convergence.py                          # the whole sweep (hours on 2 cores)
    python benchmarks/convergence.py --only adamw,apollo_mini # some optimizers now, the rest later
    python benchmarks/convergence.py --only adamw --lrs 1e-3  # one run (about 40 min on 2 cores)
    python benchmarks/convergence.py --report                 # rebuild the table and plot only
    python benchmarks/convergence.py --smoke --out /tmp/x     # a tiny model, seconds (the test)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from machine import describe_machine, machine_line  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """Model, data and budget: every run of one sweep shares them."""

    hidden: int = 384
    layers: int = 6
    heads: int = 6
    intermediate: int = 1024
    vocab: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    tokens: int = 4_000_000
    eval_every: int = 100
    val_blocks: int = 64
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    max_chars: int | None = None

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))


SMOKE = Setting(
    hidden=32,
    layers=2,
    heads=2,
    intermediate=64,
    vocab=300,
    seq_len=32,
    batch_size=4,
    tokens=4 * 32 * 12,
    eval_every=4,
    val_blocks=4,
    max_chars=60_000,
)


@dataclass(frozen=True)
class Contender:
    """An optimizer as the sweep runs it: a registry name, options, extras, and its LR grid."""

    name: str
    registry_name: str
    lrs: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    int8_weights: bool = False
    layerwise: bool = False


def contenders(setting: Setting) -> dict[str, Contender]:
    """The paper's comparison. Grids: AdamW around 1e-3 (GaLore/APOLLO papers' baseline at 60M),
    APOLLO and APOLLO-Mini around 1e-2 (the APOLLO paper's), GaLore around 1e-2 (GaLore's)."""
    rank = max(1, setting.hidden // 4)
    adam_grid = (1e-3, 3e-3, 1e-2)
    apollo_grid = (3e-3, 1e-2, 3e-2)
    rows = [
        Contender("adamw", "adamw", adam_grid, {"fused": True}),
        Contender("apollo", "apollo", apollo_grid, {"rank": rank, "scale_type": "channel"}),
        Contender("apollo_mini", "apollo_mini", apollo_grid),
        Contender("adamw8bit", "adamw8bit", adam_grid),
        Contender("apollo_mini+int8", "apollo_mini", apollo_grid, int8_weights=True),
        Contender("apollo_mini+layerwise", "apollo_mini", apollo_grid, layerwise=True),
    ]
    if importlib.util.find_spec("galore_torch") is not None:
        rows.append(Contender("galore", "galore", apollo_grid, {"rank": rank}))
    return {c.name: c for c in rows}


# ----------------------------------------------------------------------------- data
def document_split_blocks(setting: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation blocks of ``seq_len`` tokens from documents that never overlap:
    every 20th document of the corpus is held out, the rest is training text."""
    from lightning_memopt.data.corpus import load_corpus
    from lightning_memopt.data.tokenizer import build_tokenizer, default_cache_dir

    documents = load_corpus(["pydoc", "stdlib"], setting.max_chars)
    train_docs = [d for i, d in enumerate(documents) if i % 20 != 0]
    val_docs = [d for i, d in enumerate(documents) if i % 20 == 0]
    # The tokenizer learns its merges from the training documents only.
    tokenizer = build_tokenizer("bpe", train_docs, setting.vocab, default_cache_dir())

    def blocks(docs: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for encoded in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            ids += [*encoded, tokenizer.eos_token_id]
        usable = len(ids) // setting.seq_len * setting.seq_len
        return torch.tensor(ids[:usable], dtype=torch.long).view(-1, setting.seq_len)

    return blocks(train_docs), blocks(val_docs)[: setting.val_blocks]


# ----------------------------------------------------------------------------- one run
def build_model(setting: Setting, vocab_size: int, seed: int) -> torch.nn.Module:
    from lightning_memopt.models import build_llama

    torch.manual_seed(seed)
    return build_llama(
        "tiny",
        vocab_size=vocab_size,
        hidden_size=setting.hidden,
        intermediate_size=setting.intermediate,
        num_hidden_layers=setting.layers,
        num_attention_heads=setting.heads,
        num_key_value_heads=setting.heads,
        max_position_embeddings=setting.seq_len,
    )


def build_optimizer(contender: Contender, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    from lightning_memopt.optim import LayerwiseOptimizer, create_optimizer

    if contender.registry_name == "galore":
        from galore_torch import GaLoreAdamW

        from lightning_memopt.optim import apollo_param_groups

        groups = apollo_param_groups(model)
        for group in groups:
            if group.pop("low_rank"):
                group.update(rank=contender.options["rank"], update_proj_gap=200, scale=0.25, proj_type="std")
        return GaLoreAdamW(groups, lr=lr, weight_decay=0.0)
    optimizer = create_optimizer(contender.registry_name, model, contender.options, lr=lr, weight_decay=0.0)
    return LayerwiseOptimizer(optimizer) if contender.layerwise else optimizer


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    model.train()
    return total / len(blocks)


def train_run(
    contender: Contender,
    lr: float,
    seed: int,
    setting: Setting,
    train: torch.Tensor,
    val: torch.Tensor,
    vocab: int,
    partial: Path | None = None,
) -> dict[str, Any]:
    """Pre-train one model from scratch; the final validation loss, the curve, state and speed.

    With ``partial`` (a file path), the run saves itself there at every evaluation and continues
    from it when the file exists, so a run cut off after half an hour loses one evaluation interval,
    not the whole run; the file is deleted when the run finishes. The speed is the median step
    time, so a paused or briefly shared machine does not bend it.
    """
    from lightning_memopt.memory import breakdown
    from lightning_memopt.models import WarmupCosineLR
    from lightning_memopt.quant import quantize_linear_weights

    model = build_model(setting, vocab, seed)
    if contender.int8_weights:
        quantize_linear_weights(model)
    optimizer = build_optimizer(contender, model, lr)
    scheduler = WarmupCosineLR(
        optimizer, total_steps=setting.steps, warmup_steps=setting.warmup_fraction, min_lr_ratio=setting.min_lr_ratio
    )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    first_step, step_seconds, diverged = 0, [], False
    saved = torch.load(partial, weights_only=True) if partial is not None and partial.exists() else None
    if saved is not None and saved["setting"] != asdict(setting):
        print(f"    {partial} was saved under other settings: starting the run afresh", flush=True)
        saved = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        first_step, step_seconds = saved["step"], saved["step_seconds"]
        curve = [tuple(point) for point in saved["curve"]]
        print(f"    continuing {contender.name} lr {lr:g} seed {seed} from step {first_step}", flush=True)
    else:
        curve = [(0, validation_loss(model, val, setting.batch_size))]
    step = first_step - 1
    for step in range(first_step, setting.steps):
        rows = order[(torch.arange(setting.batch_size) + step * setting.batch_size) % len(order)]
        batch = train[rows]
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step_seconds.append(time.perf_counter() - start)
        if not math.isfinite(float(loss.detach())):
            diverged = True
            break
        if (step + 1) % setting.eval_every == 0 or step + 1 == setting.steps:
            tokens = (step + 1) * setting.batch_size * setting.seq_len
            curve.append((tokens, validation_loss(model, val, setting.batch_size)))
            if partial is not None and step + 1 < setting.steps:
                _save_partial(partial, setting, model, optimizer, scheduler, step + 1, step_seconds, curve)
    if partial is not None:
        partial.unlink(missing_ok=True)
    return {
        "optimizer": contender.name,
        "lr": lr,
        "seed": seed,
        "val_loss": curve[-1][1] if not diverged else float("nan"),
        "diverged": diverged,
        "optimizer_state_bytes": breakdown(model, optimizer, grads=False).optimizer_state_bytes,
        "tokens_per_s": setting.batch_size * setting.seq_len / statistics.median(step_seconds),
        "tokens": setting.tokens,
        "steps": setting.steps,
        "curve": curve,
        "setting": asdict(setting),
    }


def _save_partial(
    path: Path,
    setting: Setting,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    step_seconds: list[float],
    curve: list[tuple[int, float]],
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "step": step,
        "step_seconds": step_seconds,
        "curve": curve,
        "setting": asdict(setting),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)  # atomic: a kill during the save keeps the previous file


def partial_path(out: Path, name: str, lr: float, seed: int) -> Path:
    """Where an unfinished run keeps its state between invocations."""
    return out / "partial" / f"{name}-lr{lr:g}-seed{seed}.pt"


# ----------------------------------------------------------------------------- the sweep
def _same_run(run: dict[str, Any], name: str, lr: float, seed: int, setting: Setting) -> bool:
    return (
        run["optimizer"] == name
        and math.isclose(run["lr"], lr)
        and run["seed"] == seed
        and run.get("setting") == asdict(setting)
    )


def best_lr(runs: list[dict[str, Any]], name: str) -> float | None:
    """The learning rate of ``name``'s lowest final validation loss (seed 0 runs of the sweep)."""
    candidates = [r for r in runs if r["optimizer"] == name and r["seed"] == 0 and math.isfinite(r["val_loss"])]
    return min(candidates, key=lambda r: r["val_loss"])["lr"] if candidates else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer at its best learning rate: perplexity over seeds, ratios to AdamW."""
    rows = []
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        lr = best_lr(runs, name)
        if lr is None:
            continue
        at_best = [r for r in runs if r["optimizer"] == name and math.isclose(r["lr"], lr)]
        ppl = [math.exp(r["val_loss"]) for r in at_best]
        rows.append(
            {
                "optimizer": name,
                "best_lr": lr,
                "seeds": len(at_best),
                "val_ppl_mean": statistics.fmean(ppl),
                "val_ppl_min": min(ppl),
                "val_ppl_max": max(ppl),
                "optimizer_state_bytes": at_best[0]["optimizer_state_bytes"],
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in at_best),
                "swept_lrs": sorted({r["lr"] for r in runs if r["optimizer"] == name and r["seed"] == 0}),
            }
        )
    base = next((r for r in rows if r["optimizer"] == "adamw"), None)
    for row in rows:
        row["ppl_vs_adamw"] = row["val_ppl_mean"] / base["val_ppl_mean"] if base else None
        row["state_vs_adamw"] = row["optimizer_state_bytes"] / base["optimizer_state_bytes"] if base else None
        row["speed_vs_adamw"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
    return rows


def render_markdown(rows: list[dict[str, Any]], runs: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    setting = runs[0]["setting"] if runs else {}
    lines = [
        "# Convergence with tuned learning rates",
        "",
        f"LLaMA hidden {setting.get('hidden')}, {setting.get('layers')} blocks, vocab {setting.get('vocab')}, "
        f"{setting.get('tokens', 0) / 1e6:.1f}M training tokens per run (batch {setting.get('batch_size')} x "
        f"{setting.get('seq_len')}), 10% warm-up + cosine to 10%; validation on held-out documents. "
        f"Machine: {machine_line(machine)}.",
        "",
        "| optimizer | best lr | seeds | val perplexity (min-max) | x AdamW "
        "| state MiB | x AdamW | tokens/s | x AdamW |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['optimizer']} | {row['best_lr']:g} | {row['seeds']} | {row['val_ppl_mean']:.2f} "
            f"({row['val_ppl_min']:.2f}-{row['val_ppl_max']:.2f}) | {ratio(row['ppl_vs_adamw'])} "
            f"| {row['optimizer_state_bytes'] / 2**20:.1f} | {ratio(row['state_vs_adamw'])} "
            f"| {row['tokens_per_s']:,.0f} | {ratio(row['speed_vs_adamw'])} |"
        )
    lines += [
        "",
        "Every run (final validation loss):",
        "",
        "| optimizer | lr | seed | val loss |",
        "|---|---:|---:|---:|",
    ]
    for run in sorted(runs, key=lambda r: (r["optimizer"], r["lr"], r["seed"])):
        lines.append(f"| {run['optimizer']} | {run['lr']:g} | {run['seed']} | {run['val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], path: Path) -> None:
    """Validation-loss curves of each optimizer's best run, and final loss against learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, sensitivity) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        best = next(
            r
            for r in runs
            if r["optimizer"] == row["optimizer"] and math.isclose(r["lr"], row["best_lr"]) and r["seed"] == 0
        )
        tokens, losses = zip(*best["curve"])
        curves.plot([t / 1e6 for t in tokens], losses, label=f"{row['optimizer']} (lr {row['best_lr']:g})")
        swept = sorted((r["lr"], r["val_loss"]) for r in runs if r["optimizer"] == row["optimizer"] and r["seed"] == 0)
        sensitivity.plot(*zip(*swept), marker="o", label=row["optimizer"])
    curves.set(xlabel="training tokens (M)", ylabel="validation loss", title="best learning rate of each")
    sensitivity.set(xscale="log", xlabel="learning rate", ylabel="final validation loss", title="sensitivity")
    for ax in (curves, sensitivity):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs: list[dict[str, Any]], out: Path, machine: dict[str, Any]) -> list[dict[str, Any]]:
    rows = summarise(runs)
    (out / "convergence.md").write_text(render_markdown(rows, runs, machine))
    if rows:
        plot(runs, rows, out / "convergence.png")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated contenders (default: all)")
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per run (default 4M)")
    parser.add_argument("--lrs", default=None, help="learning rates of the grid to run now, comma-separated")
    parser.add_argument("--seeds", type=int, default=2, help="seeds at each optimizer's best learning rate")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of convergence.json/.md/.png")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--report", action="store_true", help="rebuild the table and plot from the runs; train nothing")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and budget, 2 contenders (the test)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = SMOKE if args.smoke else Setting()
    if args.tokens is not None:
        if args.tokens < setting.batch_size * setting.seq_len:
            parser.error(f"--tokens {args.tokens}: less than one batch ({setting.batch_size * setting.seq_len} tokens)")
        setting = Setting(**{**asdict(setting), "tokens": args.tokens})
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected at least 1")
    available = contenders(setting)
    default = ["adamw", "apollo_mini"] if args.smoke else list(available)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else default
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {', '.join(available)}")

    wanted_lrs = None
    if args.lrs:
        try:
            wanted_lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
        except ValueError:
            parser.error(f"--lrs {args.lrs!r}: expected comma-separated numbers such as 1e-3,3e-3")

    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "convergence.json"
    runs: list[dict[str, Any]] = json.loads(results_file.read_text()) if results_file.exists() else []
    machine = describe_machine()
    if args.report:
        return write_report(runs, args.out, machine)

    train, val = document_split_blocks(setting)
    vocab = int(max(train.max(), val.max())) + 1
    print(f"{len(train)} training blocks, {len(val)} validation blocks; {setting.steps} steps per run", flush=True)

    def run_once(contender: Contender, lr: float, seed: int) -> None:
        if any(_same_run(r, contender.name, lr, seed, setting) for r in runs):
            return
        partial = partial_path(args.out, contender.name, lr, seed)
        result = train_run(contender, lr, seed, setting, train, val, vocab, partial)
        result["machine"] = machine
        runs.append(result)
        results_file.write_text(json.dumps(runs, indent=1) + "\n")  # at once: the sweep is resumable
        print(
            f"  {contender.name} lr {lr:g} seed {seed}: val loss {result['val_loss']:.4f}, "
            f"{result['tokens_per_s']:,.0f} tokens/s",
            flush=True,
        )

    for name in names:
        contender = available[name]
        for lr in contender.lrs:
            if wanted_lrs is None or any(math.isclose(lr, w) for w in wanted_lrs):
                run_once(contender, lr, 0)
        if wanted_lrs is not None and not all(
            any(_same_run(r, name, lr, 0, setting) for r in runs) for lr in contender.lrs
        ):
            continue  # the extra seeds wait until the whole grid has run
        chosen = best_lr([r for r in runs if r.get("setting") == asdict(setting)], name)
        if chosen is not None:
            for seed in range(1, args.seeds):
                run_once(contender, chosen, seed)
    current = [r for r in runs if r.get("setting") == asdict(setting)]
    rows = write_report(current, args.out, machine)
    print((args.out / "convergence.md").read_text())
    return rows


if __name__ == "__main__":
    main()
