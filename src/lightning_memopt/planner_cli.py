"""``lightning-memopt estimate``: will this training run fit, per device, before renting GPUs?

A front-end over :func:`lightning_memopt.memory.planner.plan`: it builds the model on the meta
device (a named size, a local Hugging Face model folder or a ``config.json``; no weights are
read and no memory is used, so a 70B model takes seconds), then prints the bytes per device
(parameters, gradients, optimizer state, activations per block and for the logits,
optimizer-step temporaries, total) beside the fp32 AdamW baseline, a verdict against
``--gpu-memory`` and, with ``--json``, the same figures as JSON.

Example:
    $ lightning-memopt estimate --model 7b --optimizer apollo_mini --devices 8 --gpu-memory 80GiB
    $ lightning-memopt estimate --model 70b --devices 64 --sharding hybrid --nodes 8 \\
          --activation-checkpointing full --json plan.json
    $ lightning-memopt estimate --model ./my-model-folder --devices 1 --int8-weights --layerwise
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_memopt.memory.planner import (
    CHECKPOINTING,
    PRECISIONS,
    SHARDINGS,
    MemoryPlan,
    PlanSettings,
    parse_memory_size,
    plan,
)
from lightning_memopt.memory.report import format_bytes
from lightning_memopt.models.llama import LLAMA_SIZES, build_llama

PROG = "lightning-memopt estimate"


class PlannerError(ValueError):
    """A bad argument: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``estimate`` arguments.

    Example:
        >>> build_parser().parse_args(["--model", "7b"]).devices
        1
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Memory per device of a training run, before it runs: the model is built on the meta "
        "device, so even 70B takes seconds and no memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"a named size ({', '.join(LLAMA_SIZES)}), a local Hugging Face model folder or a config JSON file",
    )
    parser.add_argument("--optimizer", default="apollo_mini", help="a registry name: apollo, apollo_mini, adamw ...")
    parser.add_argument("--optimizer-options", default=None, help="the optimizer's options, e.g. 'rank=128'")
    parser.add_argument("--devices", type=int, default=1, help="GPUs in all (every node together)")
    parser.add_argument("--sharding", choices=SHARDINGS, default="full", help="FSDP2 full sharding or hybrid (HSDP)")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (hybrid sharding: shard within a node)")
    parser.add_argument(
        "--mesh", default=None, help="hybrid sharding's (replicas, shard) mesh as R,S; default: nodes, devices/nodes"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="micro-batch size per device")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed", help="Lightning's precision flag")
    parser.add_argument("--int8-weights", action="store_true", help="INT8 block weights (one device only)")
    parser.add_argument("--layerwise", action="store_true", help="layer-wise (in-backward) optimizer updates")
    parser.add_argument(
        "--activation-checkpointing", choices=CHECKPOINTING, default=None, help="checkpoint every block"
    )
    parser.add_argument("--chunked-loss", action="store_true", help="LM head + loss a chunk of tokens at a time")
    parser.add_argument("--loss-chunk-size", type=int, default=1024, help="tokens per chunk of the chunked loss")
    parser.add_argument("--gpu-memory", default=None, help="memory of one GPU for the verdict, e.g. 80GiB or 24GB")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the plan as JSON")
    return parser


def load_meta_model(spec: str) -> nn.Module:
    """The causal LM named by ``spec``, on the meta device, in fp32.

    Raises:
        PlannerError: for an unknown size or a path that holds no config.

    Example:
        >>> type(load_meta_model("tiny")).__name__
        'LlamaForCausalLM'
    """
    key = spec.lower()
    if key in LLAMA_SIZES:
        with torch.device("meta"):
            return build_llama(key)
    path = Path(spec)
    if not path.exists():
        raise PlannerError(
            f"--model {spec!r} is neither a known size ({', '.join(LLAMA_SIZES)}) nor an existing folder or "
            "config JSON; pick a size or give the path of a Hugging Face model folder."
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = path if path.is_dir() else path.parent
    if path.is_dir() and not (path / "config.json").is_file():
        raise PlannerError(f"--model {spec!r}: the folder has no config.json; give a Hugging Face model folder.")
    try:
        if path.is_dir():
            config = AutoConfig.from_pretrained(folder)
        else:
            fields = json.loads(path.read_text())
            model_type = fields.pop("model_type", None)
            if model_type is None:
                raise PlannerError(f"--model {spec!r}: the JSON has no model_type; is it a Hugging Face config?")
            config = AutoConfig.for_model(model_type, **fields)
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, PlannerError):
            raise
        raise PlannerError(f"--model {spec!r}: not a readable Hugging Face config ({err}).") from err
    config.use_cache = False
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)


def _own_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _chunked_loss(model: nn.Module, ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    from lightning_memopt.layers import chunked_causal_lm_loss

    return chunked_causal_lm_loss(model, ids, chunk_size=chunk_size)


def _checkpoint(model: nn.Module, policy: str, blocks: list[nn.Module]) -> None:
    from lightning_memopt.layers import apply_activation_checkpointing

    apply_activation_checkpointing(model, policy=policy, blocks=blocks)


def _mesh(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        replicas, shard = (int(x) for x in text.replace("x", ",").split(","))
    except ValueError as err:
        raise PlannerError(f"--mesh {text!r}: write the (replicas, shard) mesh as R,S, e.g. --mesh 2,8.") from err
    return replicas, shard


def settings_from_args(args: argparse.Namespace) -> PlanSettings:
    """:class:`PlanSettings` from parsed arguments, checked.

    Example:
        >>> settings_from_args(build_parser().parse_args(["--model", "7b", "--devices", "8"])).mesh()
        (1, 8)
    """
    try:
        gpu_memory = parse_memory_size(args.gpu_memory) if args.gpu_memory is not None else None
        settings = PlanSettings(
            optimizer=args.optimizer,
            options=args.optimizer_options,
            devices=args.devices,
            sharding=args.sharding,
            nodes=args.nodes,
            device_mesh=_mesh(args.mesh),
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            precision=args.precision,
            int8_weights=args.int8_weights,
            layerwise=args.layerwise,
            activation_checkpointing=args.activation_checkpointing,
            chunked_loss=args.chunked_loss,
            loss_chunk_size=args.loss_chunk_size,
            gpu_memory=gpu_memory,
        )
        settings.validate()
    except (KeyError, ValueError) as err:
        raise PlannerError(str(err).strip("\"'")) from err
    return settings


def run_plan(args: argparse.Namespace) -> tuple[MemoryPlan, nn.Module]:
    """Build the model and plan it (see :func:`main`); returns the plan and the meta model.

    Raises:
        PlannerError: for a bad argument (one line, naming the fix).

    Example:
        >>> args = build_parser().parse_args(["--model", "tiny", "--seq-len", "32", "--devices", "2"])
        >>> result, model = run_plan(args)
        >>> result.mesh, next(model.parameters()).device.type
        ((1, 2), 'meta')
    """
    from lightning_memopt.layers.blocks import find_transformer_blocks
    from lightning_memopt.layers.checkpointing import SAVED_OPS

    settings = settings_from_args(args)
    model = load_meta_model(args.model)
    blocks = find_transformer_blocks(model)
    loss = functools.partial(_chunked_loss, chunk_size=settings.loss_chunk_size) if settings.chunked_loss else _own_loss
    try:
        result = plan(
            model,
            settings,
            loss_fn=loss,
            full_loss_fn=_own_loss,
            blocks=blocks,
            apply_checkpointing=lambda m, policy: _checkpoint(m, policy, blocks),
            selective_ops=SAVED_OPS,
        )
    except (KeyError, ValueError) as err:
        raise PlannerError(str(err).strip("\"'")) from err
    return result, model


def _ratio(value: int, base: int) -> str:
    if base == 0:
        return "-"
    return f"{value / base:.2f}x"


def render(result: MemoryPlan, model_name: str) -> Any:
    """The plan as a rich table (80 columns).

    Example:
        >>> from lightning_memopt.memory.planner import PlanSettings
        >>> p = MemoryPlan(PlanSettings(), (1, 1), 1, 2, 3, 4, 5, 0, 15, {k: 8 for k in
        ...     ("params", "grads", "optimizer_state", "activations", "temporaries", "fsdp_buffers", "total")})
        >>> type(render(p, "tiny")).__name__
        'Table'
    """
    from rich.table import Table

    s = result.settings
    replicas, shard = result.mesh
    techniques = [
        name
        for name, on in (
            ("INT8 weights", s.int8_weights),
            ("layer-wise", s.layerwise),
            (f"{s.activation_checkpointing} checkpointing", s.activation_checkpointing),
            ("chunked loss", s.chunked_loss),
        )
        if on
    ]
    title = (
        f"{model_name} ({result.numel / 1e9:.2f}B params), {s.optimizer}, {s.precision}, "
        f"{s.devices} device(s), mesh {replicas}x{shard}, batch {s.batch_size} x {s.seq_len} tokens"
        + (f"; {', '.join(techniques)}" if techniques else "")
    )
    table = Table(title=title, title_justify="left", width=80)
    table.add_column("per device", no_wrap=True)
    table.add_column("this run", justify="right", no_wrap=True)
    table.add_column("AdamW fp32", justify="right", no_wrap=True)
    table.add_column("ratio", justify="right", no_wrap=True)
    base = result.baseline
    detail = result.activation_detail
    rows = [
        ("parameters", result.params, base["params"]),
        ("gradients", result.grads, base["grads"]),
        ("optimizer state", result.optimizer_state, base["optimizer_state"]),
        ("activations", result.activations, base["activations"]),
    ]
    for label, value, baseline in rows:
        table.add_row(label, format_bytes(value), format_bytes(baseline), _ratio(value, baseline))
    table.add_row(f"  per block (x{detail.get('blocks', 0)})", format_bytes(detail.get("per_block", 0)), "", "")
    table.add_row("  logits + loss", format_bytes(detail.get("head_and_loss", 0)), "", "")
    table.add_row("  backward peak", format_bytes(detail.get("backward_peak", 0)), "", "")
    table.add_row(
        "step temporaries",
        format_bytes(result.temporaries),
        format_bytes(base["temporaries"]),
        _ratio(result.temporaries, base["temporaries"]),
    )
    if shard > 1:
        table.add_row(
            "FSDP buffers",
            format_bytes(result.fsdp_buffers),
            format_bytes(base["fsdp_buffers"]),
            _ratio(result.fsdp_buffers, base["fsdp_buffers"]),
        )
    table.add_row(
        "total (peak)",
        format_bytes(result.total),
        format_bytes(base["total"]),
        _ratio(result.total, base["total"]),
        style="bold",
    )
    return table


def main(argv: list[str] | None = None) -> int:
    """``lightning-memopt estimate``: print the plan; exit code 0, or 2 on a bad argument.

    Example:
        >>> main(["--model", "tiny", "--seq-len", "64", "--gpu-memory", "1GiB"])  # doctest: +SKIP
        0
    """
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result, _ = run_plan(args)
    except PlannerError as err:
        # One line, no traceback: what was wrong and how to fix it.
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    console = Console(width=80)
    console.print(render(result, args.model))
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    if result.settings.gpu_memory is not None:
        console.print(result.verdict(), highlight=False, style="green" if result.fits() else "red")
    if args.json_path:
        document = {"model": args.model, **result.to_dict()}
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"wrote {args.json_path}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
