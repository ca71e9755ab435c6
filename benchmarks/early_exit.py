"""Early exits earn their keep: decoding tokens/s of self-speculative decoding and confidence exit
against Hugging Face greedy ``generate``, on a LLaMA trained here with the early-exit loss.

1. **Train** a LLaMA (8 blocks, hidden 256, exits after blocks 1, 3 and 5, shared head) with
   LayerSkip's early-exit loss on the embedded corpus (the CPython docs and the standard library's
   sources, BPE 2048: 1.5M training tokens, 80k held out; 2M tokens trained, 1.3 passes), then
   report each exit's validation loss. The weights are cached in ``/tmp`` (keyed by the settings), so a
   second run only decodes.
2. **Decode** the same held-out prompts (``--new-tokens``, default 64, batch 1, no EOS stop) with:

   - HF greedy: ``model.generate(do_sample=False, use_cache=True)`` (the baseline);
   - HF's own self-speculative decoding, ``generate(assistant_early_exit=e)`` (shared head);
   - ours, full model (:func:`early_exit_generate` at threshold 1: our decode loop, no exits);
   - ours, self-speculative (:func:`self_speculative_generate`, exit layer x draft length):
     lossless, checked token for token against HF greedy;
   - ours, confidence exit (:func:`early_exit_generate`), two rules: the exit head's softmax at
     exit 3, and learned exit gates (:func:`fit_exit_gates`, fitted on training text) at every
     exit; thresholds calibrated on other held-out text. Reported: the fraction of new tokens
     equal to the full model's (generated), the same teacher forced, and the change of the
     held-out loss when each token takes its exit's prediction (:func:`early_exit_forward`).

   Methods are timed interleaved (every repeat runs each method once on every prompt, in a
   rotated order), so load from other processes hits them alike; the table gives the median and
   the range of the per-repeat tokens/s ratio to HF greedy of the same repeat.

Usage::

    python benchmarks/early_exit.py --threads 2           # train (17 min on 2 idle cores) + decode (8 min)
    python benchmarks/early_exit.py --smoke --out /tmp/x  # tiny model, a few steps (the test)

Writes ``<out>/early_exit.json``, ``.md`` and ``.png`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from lightning_memopt.data import TextDataModule
from lightning_memopt.layers import (
    ExitGates,
    add_early_exits,
    early_exit_forward,
    early_exit_generate,
    early_exit_loss,
    exit_agreement,
    fit_exit_gates,
    get_early_exits,
    self_speculative_generate,
)
from lightning_memopt.models import build_llama

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared helpers
from machine import describe_machine, machine_line

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = Path("/tmp/lightning_memopt_early_exit")
SPEC_TARGET, CONF_TARGET, CONF_AGREEMENT = 1.3, 1.5, 0.95

FULL = {
    "layers": 8,
    "hidden": 256,
    "intermediate": 688,
    "heads": 4,
    "exits": [1, 3, 5],
    "vocab": 2048,
    "seq_len": 128,
    "batch": 16,
    "steps": 1000,
    "lr": 3e-3,
    "max_train_minutes": 25.0,
    "sources": ["pydoc", "stdlib"],
    "prompts": 4,
    "prompt_len": 32,
    "new_tokens": 64,
    "repeats": 9,
    # exit layer, draft length[, draft confidence: end a draft after a token the exit is unsure of]
    "spec": [[3, 4], [3, 6], [5, 6], [3, 8, 0.3], [5, 8, 0.3]],
    "hf_assistant": [3],
    # Confidence exit, two rules. "softmax": a token exits where the exit head's top probability
    # reaches the threshold; every exit tried costs a head (hidden x vocab), about 0.4 of a block
    # here, whether the token exits or not, so one mid-depth exit. "gates": learned gates
    # (fit_exit_gates, on training text) predict where an exit agrees with the final layer; a gate
    # costs two small matrix products and the head runs only for tokens that exit, so all exits.
    "confidence_exits": [3],
    "threshold_grid": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03],
    "gated_exits": [1, 3, 5],
    "gate_threshold_grid": [0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7],
    "gate_batches": 32,
    # Thresholds are calibrated on held-out text the measured prompts are not in: for each target,
    # the lowest threshold of the grid whose generated tokens (on `calibration_prompts` prompts)
    # or teacher-forced predictions (on the first held-out batch) agree with the full model's at
    # that rate. A small model trained for minutes is rarely confident in absolute terms.
    "agreement_targets": [0.99, 0.97, 0.95],
    "teacher_forced_targets": [0.95],
    "calibration_prompts": 8,
    "val_batches": 6,
}
SMOKE = {
    **FULL,
    "layers": 4,
    "hidden": 64,
    "intermediate": 176,
    "exits": [1, 2],
    "vocab": 512,
    "seq_len": 64,
    "batch": 4,
    "steps": 3,
    "max_train_minutes": 2.0,
    "prompts": 2,
    "prompt_len": 8,
    "new_tokens": 8,
    "repeats": 2,
    "spec": [[1, 3]],
    "hf_assistant": [1],
    "confidence_exits": [1, 2],
    "agreement_targets": [0.0],  # exercises the calibration: the lowest grid threshold passes
    "teacher_forced_targets": [0.0],
    "threshold_grid": [0.9, 0.5],
    "gated_exits": [1, 2],
    "gate_threshold_grid": [0.9, 0.5],
    "gate_batches": 2,
    "calibration_prompts": 1,
    "val_batches": 1,
    "max_chars": 60_000,
}


# -- training ------------------------------------------------------------------------------------


def build(cfg: dict[str, Any], vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_llama(
        "tiny",
        vocab_size=vocab,
        num_hidden_layers=cfg["layers"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_attention_heads=cfg["heads"],
    )
    add_early_exits(model, cfg["exits"], checkpoint_heads=False)
    return model


def data_module(cfg: dict[str, Any]) -> TextDataModule:
    dm = TextDataModule(
        sources=cfg["sources"],
        tokenizer="bpe",
        bpe_vocab_size=cfg["vocab"],
        seq_len=cfg["seq_len"],
        batch_size=cfg["batch"],
        max_chars=cfg.get("max_chars"),
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _key(cfg: dict[str, Any]) -> str:
    fields = ("layers", "hidden", "intermediate", "heads", "exits", "vocab", "seq_len", "batch", "steps", "lr")
    fields += ("max_chars", "max_train_minutes", "sources")
    return hashlib.sha1(json.dumps([cfg.get(f) for f in fields]).encode()).hexdigest()[:12]


@torch.no_grad()
def validation_losses(model: torch.nn.Module, dm: TextDataModule, batches: int) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(dm.val_dataloader()):
        if i >= batches:
            break
        out = early_exit_loss(model, batch["input_ids"])
        for layer, loss in out.exit_losses.items():
            sums[f"exit_{layer}"] = sums.get(f"exit_{layer}", 0.0) + float(loss)
        sums["final"] = sums.get("final", 0.0) + float(out.final_loss)
        count += 1
    return {name: total / count for name, total in sums.items()}


def train(cfg: dict[str, Any], dm: TextDataModule, retrain: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or load the cached weights of) the early-exit LLaMA; returns it and the training log."""
    model = build(cfg, dm.num_tokens)
    path = CACHE_DIR / f"model-{_key(cfg)}.pt"
    if path.exists() and not retrain:
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["log"]
    model.train()
    steps, warmup = cfg["steps"], max(1, cfg["steps"] // 15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=0.0)

    start, done, losses = time.perf_counter(), 0, []
    budget = 60 * cfg["max_train_minutes"]
    deadline = start + budget

    def schedule(step: int) -> float:
        # Linear warm-up, then cosine decay to 10% over the steps or the time budget, whichever
        # runs out first (on a shared CPU the step rate is unknown in advance).
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, max((step - warmup) / max(1, steps - warmup), (time.perf_counter() - start) / budget))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    while done < steps and time.perf_counter() < deadline:
        for batch in dm.train_dataloader():
            out = early_exit_loss(model, batch["input_ids"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done += 1
            losses.append(float(out.final_loss.detach()))
            if done % 10 == 0:
                print(f"step {done}: final loss {statistics.mean(losses[-10:]):.3f}", flush=True)
            if done >= steps or time.perf_counter() >= deadline:
                break
    log = {
        "steps": done,
        "planned_steps": steps,
        "train_seconds": round(time.perf_counter() - start, 1),
        "tokens": done * cfg["batch"] * cfg["seq_len"],
        "val_loss": validation_losses(model, dm, cfg["val_batches"]),
    }
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "log": log}, path)
    return model.eval(), log


# -- decoding -------------------------------------------------------------------------------------


@dataclass
class Rule:
    """A confidence-exit rule: the exits it tries, how a token decides (the exit head's softmax, or
    learned gates), and the threshold grid its calibration searches."""

    kind: str  # "softmax" or "gates"
    exits: list[int]
    grid: list[float]
    gates: ExitGates | None = None

    def label(self, threshold: float) -> str:
        return f"confidence exit {threshold:g}" + (", gates" if self.kind == "gates" else "")

    def generate(self, model: torch.nn.Module, prompt: torch.Tensor, new: int, threshold: float) -> Any:
        return early_exit_generate(model, prompt, new, threshold=threshold, exit_layers=self.exits, gates=self.gates)

    def forward(self, model: torch.nn.Module, batch: torch.Tensor, threshold: float, **kwargs: Any) -> Any:
        return early_exit_forward(model, batch, threshold=threshold, exit_layers=self.exits, gates=self.gates, **kwargs)


def confidence_rules(cfg: dict[str, Any], gates: ExitGates) -> list[Rule]:
    return [
        Rule("softmax", cfg["confidence_exits"], cfg["threshold_grid"]),
        Rule("gates", cfg["gated_exits"], cfg["gate_threshold_grid"], gates),
    ]


def fit_gates(model: torch.nn.Module, dm: TextDataModule, cfg: dict[str, Any]) -> tuple[ExitGates, dict[str, Any]]:
    """Exit gates fitted on the first ``gate_batches`` training batches (text the model trained on)."""
    start = time.perf_counter()
    batches = [b["input_ids"] for _, b in zip(range(cfg["gate_batches"]), dm.train_dataloader())]
    tokens = sum(b.numel() for b in batches)
    gates = fit_exit_gates(model, batches, max_tokens=tokens)
    log = {
        "tokens": tokens,
        "seconds": round(time.perf_counter() - start, 1),
        "training_agreement": {str(k): v for k, v in gates.training_agreement.items()},
    }
    return gates, log


@torch.no_grad()
def exit_rule_coverage(
    model: torch.nn.Module, gates: ExitGates, batches: list[torch.Tensor], precision: float = 0.95
) -> dict[str, dict[str, float]]:
    """Per exit, on held-out batches: how often the exit agrees with the final layer, and the
    largest fraction of tokens each rule (the gate's probability, the exit head's top softmax
    probability) can let exit there while those tokens still agree at ``precision``."""
    exits = get_early_exits(model)
    hidden, agreement = exit_agreement(model, batches)
    out: dict[str, dict[str, float]] = {}
    for layer in exits.exit_layers:
        agree = agreement[layer]
        scores = {
            "gate": gates(layer, hidden[layer]),
            "softmax": exits.heads[layer](hidden[layer]).float().softmax(-1).amax(-1),
        }
        row = {"agreement": float(agree.mean())}
        for rule, score in scores.items():
            ordered = agree[score.argsort(descending=True)]
            running = ordered.cumsum(0) / torch.arange(1, ordered.numel() + 1)
            passing = (running >= precision).nonzero()
            row[f"{rule}_coverage"] = (int(passing.max()) + 1) / ordered.numel() if passing.numel() else 0.0
        out[str(layer)] = row
    return out


def methods(
    model: torch.nn.Module, cfg: dict[str, Any], new: int, rules: list[Rule]
) -> dict[str, Callable[[torch.Tensor], Any]]:
    """name -> decode(prompt): every method makes exactly ``new`` tokens (no EOS stop)."""

    def hf(prompt: torch.Tensor, **kwargs: Any) -> Any:
        return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, **kwargs)

    table: dict[str, Callable[[torch.Tensor], Any]] = {"HF greedy": hf}
    for layer in cfg["hf_assistant"]:
        table[f"HF assistant_early_exit={layer + 1}"] = lambda p, e=layer + 1: hf(p, assistant_early_exit=e)
    table["ours, full model"] = lambda p: early_exit_generate(model, p, new, threshold=1.0)
    for layer, draft, *confidence in cfg["spec"]:
        name = f"self-speculative exit {layer}, draft {draft}" + (
            f", stop below p {confidence[0]}" if confidence else ""
        )
        table[name] = lambda p, e=layer, k=draft, c=(confidence or [0.0])[0]: self_speculative_generate(
            model, p, new, exit_layer=e, num_draft_tokens=k, draft_confidence=c
        )
    for rule in rules:
        for threshold in cfg["chosen_thresholds"][rule.kind]:
            table[rule.label(threshold)] = lambda p, r=rule, t=threshold: r.generate(model, p, new, t)
    return table


def _tokens(result: Any) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result.sequences


@torch.no_grad()
def decode_benchmark(
    model: torch.nn.Module, cfg: dict[str, Any], prompts: list[torch.Tensor], rules: list[Rule]
) -> dict[str, Any]:
    """Interleaved, repeated timing of every method on every prompt; token agreement with HF greedy."""
    new = cfg["new_tokens"]
    table = methods(model, cfg, new, rules)
    names = list(table)
    for fn in table.values():  # warm-up: first-call costs (allocations, lazy imports) are not decoding
        fn(prompts[0][:, :4])
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    outputs: dict[str, list[Any]] = {}
    for repeat in range(cfg["repeats"]):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:  # a rotated order per repeat
            results = []
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            for prompt in prompts:
                results.append(table[name](prompt))
            wall[name].append(time.perf_counter() - wall_start)
            cpu[name].append(time.process_time() - cpu_start)
            outputs.setdefault(name, results)
        print(f"repeat {repeat + 1}/{cfg['repeats']} done", flush=True)
    reference = [_tokens(r)[0, p.shape[1] :] for r, p in zip(outputs["HF greedy"], prompts)]
    tokens = new * len(prompts)
    rows = []
    for name in names:
        made = [_tokens(r)[0, p.shape[1] :] for r, p in zip(outputs[name], prompts)]
        equal = sum(int((m == ref).sum()) for m, ref in zip(made, reference))
        row: dict[str, Any] = {
            "method": name,
            "tokens_per_s": statistics.median(tokens / t for t in wall[name]),
            "speedup": _ratios(wall["HF greedy"], wall[name]),
            "cpu_speedup": _ratios(cpu["HF greedy"], cpu[name]),
            "vs_ours_full": _ratios(wall["ours, full model"], wall[name]),
            "agreement": equal / tokens,
            "lossless": all(torch.equal(m, ref) for m, ref in zip(made, reference)),
        }
        first = outputs[name][0]
        if hasattr(first, "acceptance_rate"):
            drafted = sum(r.drafted_tokens for r in outputs[name])
            row["acceptance_rate"] = sum(r.accepted_tokens for r in outputs[name]) / drafted if drafted else 0.0
            row["tokens_per_pass"] = tokens / sum(r.verify_passes for r in outputs[name])
        if hasattr(first, "fraction_skipped"):
            row["fraction_skipped"] = statistics.mean(r.fraction_skipped for r in outputs[name])
        rows.append(row)
    return {
        "rows": rows,
        "tokens_per_method": tokens,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "reference_tokens": [ref.tolist() for ref in reference],
        "reference_distinct_tokens": statistics.mean(len(set(ref.tolist())) for ref in reference),
    }


def _ratios(baseline: list[float], times: list[float]) -> dict[str, float]:
    """Per-repeat speed ratios (baseline time / method time): median and range."""
    ratios = [b / t for b, t in zip(baseline, times)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _held_out_batches(dm: TextDataModule, cfg: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The held-out batches of teacher-forced calibration (the first, which holds the calibration
    prompts) and of the measurement (the ``val_batches`` after them)."""
    skip = max(1, math.ceil(cfg["calibration_prompts"] / cfg["batch"]))
    loader = [b["input_ids"] for _, b in zip(range(skip + cfg["val_batches"]), dm.val_dataloader())]
    return loader[:skip], loader[skip:] or loader


def _teacher_forced(
    model: torch.nn.Module, rule: Rule, threshold: float, batches: list[torch.Tensor], full: list[Any]
) -> dict[str, float]:
    agree = total = 0
    losses, skipped = [], []
    for batch, reference in zip(batches, full, strict=True):
        exited = rule.forward(model, batch, threshold, labels=batch)
        agree += int((exited.logits.argmax(-1) == reference.logits.argmax(-1)).sum())
        total += batch.numel()
        losses.append(float(exited.loss - reference.loss))
        skipped.append(exited.fraction_skipped)
    return {
        "teacher_forced_agreement": agree / total,
        "loss_change": statistics.mean(losses),
        "teacher_forced_skipped": statistics.mean(skipped),
    }


@torch.no_grad()
def confidence_quality(
    model: torch.nn.Module, dm: TextDataModule, cfg: dict[str, Any], rules: list[Rule]
) -> dict[str, dict[str, float]]:
    """Teacher forced on held-out blocks, per rule and threshold: agreement of each token's exit
    prediction with the full model's, the fraction of blocks skipped, and the loss change."""
    _, batches = _held_out_batches(dm, cfg)
    full = [early_exit_forward(model, b, threshold=1.0, labels=b) for b in batches]
    return {
        rule.label(threshold): _teacher_forced(model, rule, threshold, batches, full)
        for rule in rules
        for threshold in cfg["chosen_thresholds"][rule.kind]
    }


@torch.no_grad()
def calibrate_thresholds(
    model: torch.nn.Module, dm: TextDataModule, cfg: dict[str, Any], rule: Rule
) -> tuple[list[float], dict[str, dict[str, float]]]:
    """For each agreement target, the lowest threshold of the rule's grid whose *generated* tokens
    equal the full model's greedy tokens at that rate on calibration prompts (the first held-out
    blocks; the measured prompts are the last ones), and likewise for each teacher-forced target
    on the first held-out batch. Generated agreement is the strict measure: one early
    disagreement changes the text that every later token is conditioned on."""
    new = cfg["new_tokens"]
    prompts = [dm.val_dataset[i]["input_ids"][None, : cfg["prompt_len"]] for i in range(cfg["calibration_prompts"])]
    full = [early_exit_generate(model, p, new, threshold=1.0).sequences[0, p.shape[1] :] for p in prompts]
    batches, _ = _held_out_batches(dm, cfg)
    full_forced = [early_exit_forward(model, b, threshold=1.0, labels=b) for b in batches]
    generated: dict[str, float] = {}
    forced: dict[str, float] = {}
    for threshold in sorted(rule.grid, reverse=True):
        equal = 0
        for prompt, reference in zip(prompts, full, strict=True):
            made = rule.generate(model, prompt, new, threshold).sequences[0, prompt.shape[1] :]
            equal += int((made == reference).sum())
        generated[f"{threshold:g}"] = equal / (new * len(prompts))
        forced[f"{threshold:g}"] = _teacher_forced(model, rule, threshold, batches, full_forced)[
            "teacher_forced_agreement"
        ]
    chosen = set()
    for targets, agreement in ((cfg["agreement_targets"], generated), (cfg["teacher_forced_targets"], forced)):
        for target in targets:
            passing = [float(t) for t, a in agreement.items() if a >= target]
            if passing:
                chosen.add(min(passing))
    return sorted(chosen, reverse=True), {"generated": generated, "teacher_forced": forced}


def targets(rows: list[dict[str, Any]], quality: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The issue's targets, read off the rows. A confidence-exit row counts only if it is faster
    than our own full-model loop: otherwise its speed-up over HF greedy is the loop's, not the
    exits' (a threshold that almost never exits would "meet" the target)."""
    spec = [r["speedup"]["median"] for r in rows if "speculative" in r["method"] and r["lossless"]]
    paying = [r for r in rows if "confidence" in r["method"] and r["vs_ours_full"]["median"] > 1.0]
    out: dict[str, Any] = {
        "best_speculative": max(spec, default=0.0),
        "speculative_met": max(spec, default=0.0) >= SPEC_TARGET,
    }
    for measure, agreement in (
        ("generated", lambda r: r["agreement"]),
        ("teacher_forced", lambda r: quality.get(r["method"], {}).get("teacher_forced_agreement", 0.0)),
    ):
        passing = [r for r in paying if agreement(r) >= CONF_AGREEMENT]
        best = max(passing, key=lambda r: r["speedup"]["median"], default=None)
        out[f"confidence_{measure}"] = {
            "method": best["method"] if best else None,
            "speedup": best["speedup"]["median"] if best else 0.0,
            "vs_ours_full": best["vs_ours_full"]["median"] if best else 0.0,
            "agreement": agreement(best) if best else 0.0,
            "met": bool(best) and best["speedup"]["median"] >= CONF_TARGET,
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    cfg, train_log = report["config"], report["train"]
    lines = [
        f"LLaMA {cfg['layers']} blocks, hidden {cfg['hidden']}, vocab {cfg['vocab']}, exits after blocks "
        f"{cfg['exits']} (shared head); trained {train_log['steps']} steps ({train_log['tokens']} tokens, "
        f"{train_log['train_seconds']:.0f} s) with the early-exit loss on {' + '.join(cfg['sources'])}.",
        "",
        "Validation loss: " + ", ".join(f"{k} {v:.3f}" for k, v in train_log["val_loss"].items()) + ".",
        "",
        f"Decoding {cfg['prompts']} held-out prompts of {cfg['prompt_len']} tokens, {cfg['new_tokens']} new tokens "
        f"each, batch 1, {report['machine']['threads']} thread(s), {cfg['repeats']} interleaved repeats. Speed-up: "
        "median [min-max] over repeats of HF greedy's time / the method's time (wall clock; CPU time in the next "
        "column). Agreement: new tokens equal to HF greedy's at the same position. Machine: "
        f"{machine_line(report['machine'])}.",
        "",
        "| method | tokens/s | speed-up vs HF greedy | CPU-time speed-up | vs our full loop | agreement | "
        "acceptance | tokens/pass | skipped | teacher-forced agreement | loss change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(r: dict[str, float]) -> str:
        return f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"

    for row in report["decode"]["rows"]:
        quality = report["confidence_quality"].get(row["method"], {})
        cells = [
            row["method"],
            f"{row['tokens_per_s']:.1f}",
            ratio(row["speedup"]),
            ratio(row["cpu_speedup"]),
            ratio(row["vs_ours_full"]),
            f"{row['agreement']:.1%}" + (" (lossless)" if row["lossless"] else ""),
            f"{row['acceptance_rate']:.1%}" if "acceptance_rate" in row else "",
            f"{row['tokens_per_pass']:.2f}" if "tokens_per_pass" in row else "",
            f"{row['fraction_skipped']:.1%}" if "fraction_skipped" in row else "",
            f"{quality['teacher_forced_agreement']:.1%}" if quality else "",
            f"{quality['loss_change']:+.3f}" if quality else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    target = report["target"]
    lines += [
        "",
        f"HF greedy's continuations hold {report['decode']['reference_distinct_tokens']:.1f} distinct tokens (of "
        f"{cfg['new_tokens']}) on average; the first one reads {report['sample']!r}.",
        "",
        f"Exit gates: fitted on {report['gates']['tokens']} training tokens in {report['gates']['seconds']} s; "
        "there, the exits agreed with the final layer on "
        + ", ".join(f"{a:.1%} (exit {k})" for k, a in report["gates"]["training_agreement"].items())
        + " of the tokens. On the held-out batches, the fraction of tokens each rule can let exit while they "
        "agree with the final layer at 95%: "
        + ", ".join(
            f"exit {k}: gate {c['gate_coverage']:.1%}, softmax {c['softmax_coverage']:.1%}"
            for k, c in report["gates"].get("coverage_at_95", {}).items()
        )
        + ".",
        "",
        *(
            line
            for kind, exits in (("softmax", cfg["confidence_exits"]), ("gates", cfg["gated_exits"]))
            for line in (
                f"Threshold calibration, {kind} rule (exits {exits}; threshold: generated agreement on "
                f"{cfg['calibration_prompts']} other held-out prompts / teacher-forced agreement on another held-out "
                "batch): "
                + ", ".join(
                    f"{t}: {a:.1%} / {cfg['calibration'][kind]['teacher_forced'][t]:.1%}"
                    for t, a in cfg["calibration"][kind]["generated"].items()
                )
                + f"; chosen for generated targets {cfg['agreement_targets']} and teacher-forced targets "
                f"{cfg['teacher_forced_targets']}: {cfg['chosen_thresholds'][kind]}.",
                "",
            )
        ),
        f"Targets: self-speculative lossless >= {SPEC_TARGET}x HF greedy: best {target['best_speculative']:.2f}x "
        f"({'met' if target['speculative_met'] else 'missed'}). Confidence exit >= {CONF_TARGET}x at >= "
        f"{CONF_AGREEMENT:.0%} agreement, counting only rows faster than our own full-model loop (the exits pay, "
        "not only the loop): "
        + "; ".join(
            f"by {measure.replace('_', '-')} agreement "
            + (
                f"{best['speedup']:.2f}x ({best['method']}: {best['agreement']:.1%} agreement, "
                f"{best['vs_ours_full']:.2f}x our full loop), {'met' if best['met'] else 'missed'}"
                if best["method"]
                else "no row qualifies, missed"
            )
            for measure, best in (
                ("generated", target["confidence_generated"]),
                ("teacher_forced", target["confidence_teacher_forced"]),
            )
        )
        + ".",
    ]
    return "\n".join(lines)


def record_run(report: dict[str, Any], out: Path) -> None:
    """Append this run's headline figures to ``early_exit_runs.json`` and rewrite
    ``early_exit_runs.md`` (one column per run), so separate runs' spreads are on record: a figure
    only one run reached is not a result."""
    path = out / "early_exit_runs.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append(
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine_line(report["machine"]),
            "repeats": report["config"]["repeats"],
            "rows": {
                row["method"]: {"speedup": row["speedup"], "vs_ours_full": row["vs_ours_full"]["median"]}
                for row in report["decode"]["rows"]
            },
        }
    )
    path.write_text(json.dumps(runs, indent=2) + "\n")
    methods = list(dict.fromkeys(name for run in runs for name in run["rows"]))
    lines = [
        "Early-exit decoding, run by run (separate processes): speed-up against HF greedy, median [min-max] over "
        "each run's interleaved repeats, and in parentheses against our own full-model loop.",
        "",
        *(f"- Run {i}: {run['date']}, {run['repeats']} repeats, {run['machine']}." for i, run in enumerate(runs, 1)),
        "",
        "| method | " + " | ".join(f"run {i}" for i in range(1, len(runs) + 1)) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for method in methods:
        cells = []
        for run in runs:
            row = run["rows"].get(method)
            speed = row["speedup"] if row else None
            cells.append(
                f"{speed['median']:.2f}x [{speed['min']:.2f}-{speed['max']:.2f}] ({row['vs_ours_full']:.2f}x)"
                if row
                else ""
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (out / "early_exit_runs.md").write_text("\n".join(lines) + "\n")


def plot(report: dict[str, Any], path: Path) -> None:
    """Speed-up against agreement, one marker per method (legend on the right); a confidence-exit
    row also has a hollow marker at its teacher-forced agreement, joined to its generated one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for row in report["decode"]["rows"]:
        speed = row["speedup"]
        marker = "o" if "speculative" in row["method"] else "s" if "confidence" in row["method"] else "^"
        drawn = ax.errorbar(
            row["agreement"],
            speed["median"],
            yerr=[[speed["median"] - speed["min"]], [speed["max"] - speed["median"]]],
            fmt=marker,
            capsize=3,
            label=row["method"],
        )
        forced = report["confidence_quality"].get(row["method"], {}).get("teacher_forced_agreement")
        if forced is not None:
            color = drawn[0].get_color()
            ax.plot([row["agreement"], forced], [speed["median"]] * 2, ":", color=color)
            ax.plot(forced, speed["median"], marker, mfc="none", color=color)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("new tokens equal to HF greedy's (filled: generated; hollow: teacher forced)")
    ax.set_ylabel("speed-up vs HF greedy (median, range)")
    ax.set_title("Early-exit decoding on a 2-core CPU")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps (for the test)")
    parser.add_argument("--train-only", action="store_true", help="train (or load) and report the exits' losses")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached weights")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (decoding uses 1)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved decoding repeats (default 9)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for early_exit.json, .md, .png")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats {args.repeats}: expected at least 1")
        cfg["repeats"] = args.repeats
    dm = data_module(cfg)
    # One thread: on shared cores OpenMP's spinning threads wait on each other (3-5x slower steps).
    torch.set_num_threads(args.threads)
    model, log = train(cfg, dm, retrain=args.retrain or args.smoke)
    print(json.dumps(log, indent=2), flush=True)
    if args.train_only:
        return {"train": log}
    model.generation_config.eos_token_id = None  # every method makes new_tokens tokens
    model.generation_config.pad_token_id = 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 decoding of a small model: one thread is fastest on shared cores
    try:
        machine = describe_machine()  # with the decoding's one thread
        gates, gates_log = fit_gates(model, dm, cfg)
        rules = confidence_rules(cfg, gates)
        cfg["chosen_thresholds"], cfg["calibration"] = {}, {}
        for rule in rules:
            cfg["chosen_thresholds"][rule.kind], cfg["calibration"][rule.kind] = calibrate_thresholds(
                model, dm, cfg, rule
            )
        print(f"confidence thresholds: {cfg['chosen_thresholds']}", flush=True)
        # Prompts from the last held-out blocks: neither trained on nor used to pick thresholds.
        count = len(dm.val_dataset)
        prompts = [dm.val_dataset[count - 1 - i]["input_ids"][None, : cfg["prompt_len"]] for i in range(cfg["prompts"])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # HF's notes about generation flags: not ours to fix
            decode = decode_benchmark(model, cfg, prompts, rules)
        quality = confidence_quality(model, dm, cfg, rules)
        gates_log["coverage_at_95"] = exit_rule_coverage(model, gates, _held_out_batches(dm, cfg)[1])
    finally:
        torch.set_num_threads(threads)
    sample = dm.tokenizer.decode(decode["reference_tokens"][0])
    report = {
        "benchmark": "early_exit",
        "machine": {**machine, "transformers": transformers.__version__},
        "config": cfg,
        "train": log,
        "gates": gates_log,
        "decode": decode,
        "confidence_quality": quality,
        "sample": sample,
        "target": targets(decode["rows"], quality),
    }
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "early_exit.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "early_exit.md").write_text(text + "\n")
    plot(report, args.out / "early_exit.png")
    record_run(report, args.out)
    return report


if __name__ == "__main__":
    main()
