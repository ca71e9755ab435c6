"""Activation checkpointing of transformer blocks: full or selective, never applied twice.

:func:`apply_activation_checkpointing` makes every transformer block of a model (found by
:func:`~lightning_memopt.layers.blocks.find_transformer_blocks`, or the blocks you name) run
its forward under non-reentrant :func:`torch.utils.checkpoint.checkpoint`: only the block's
inputs stay alive until backward, which recomputes the rest. The ``"selective"`` policy keeps
the outputs of matrix multiplications and attention kernels (the expensive ops) and recomputes
only the cheap ones (norms, activations, element-wise ops), through torch's selective
checkpoint contexts.

The block's ``forward`` is replaced on the instance; the module tree, parameter names and
``state_dict`` keys stay unchanged, so the function composes with FSDP2's per-block sharding
(apply it before or after ``fully_shard``) and with checkpoints saved without it. A block is
marked when wrapped, so a second call (a strategy option and a callback, say) leaves it alone:
:func:`is_activation_checkpointed` tells whether a model is already checkpointed.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]))
    >>> len(apply_activation_checkpointing(model))
    3
    >>> is_activation_checkpointed(model), len(apply_activation_checkpointing(model))  # idempotent
    (True, 0)
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .blocks import find_transformer_blocks

__all__ = [
    "POLICIES",
    "apply_activation_checkpointing",
    "is_activation_checkpointed",
    "measure_activation_bytes",
    "remove_activation_checkpointing",
    "save_matmuls_policy",
]

POLICIES = ("full", "selective")
# Set on a wrapped block: the policy it was wrapped with.
_MARK = "_memopt_checkpoint_policy"

# The ops whose outputs the "selective" policy keeps: matrix multiplications and fused
# attention (what is costly to recompute); everything else is recomputed in backward.
_MATMUL_OP_NAMES = (
    "mm",
    "addmm",
    "bmm",
    "baddbmm",
    "_scaled_mm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)
SAVED_OPS = frozenset(
    getattr(torch.ops.aten, name).default for name in _MATMUL_OP_NAMES if hasattr(torch.ops.aten, name)
)

Policy = str | Sequence[Any] | Callable[..., CheckpointPolicy]


def save_matmuls_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The ``"selective"`` policy: save matmul and attention outputs, recompute the rest.

    Example:
        >>> save_matmuls_policy(None, torch.ops.aten.mm.default)
        <CheckpointPolicy.MUST_SAVE: 0>
        >>> save_matmuls_policy(None, torch.ops.aten.gelu.default)
        <CheckpointPolicy.PREFER_RECOMPUTE: 3>
    """
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _context_fn(policy: Policy) -> Callable[[], Any] | None:
    if isinstance(policy, str):
        if policy == "full":
            return None
        if policy == "selective":
            return functools.partial(create_selective_checkpoint_contexts, save_matmuls_policy)
        raise ValueError(
            f"activation checkpointing: unknown policy={policy!r}; use one of {', '.join(map(repr, POLICIES))}, "
            "a list of aten ops to save (e.g. [torch.ops.aten.mm.default]) or a selective-checkpoint policy "
            "function (ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy."
        )
    if callable(policy) or isinstance(policy, (list, tuple)):
        return functools.partial(create_selective_checkpoint_contexts, policy)
    raise ValueError(f"activation checkpointing: policy={policy!r} is neither a name, a list of ops nor a function.")


def _policy_name(policy: Policy) -> str:
    return policy if isinstance(policy, str) else "custom"


class _CheckpointedForward:
    """The block's new ``forward``: the old one under non-reentrant checkpointing.

    A class (not a closure) so that ``copy.deepcopy`` and pickling of the model carry the
    reference to the copied block, not to the original.
    """

    def __init__(self, module: nn.Module, context_fn: Callable[[], Any] | None, previous: Any) -> None:
        self.module = module
        self.context_fn = context_fn
        # An instance-level forward someone installed before us (accelerate hooks do), else None.
        self.previous = previous

    def original(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        extra = {"context_fn": self.context_fn} if self.context_fn is not None else {}
        # The block's keyword arguments are bound first, so that none is taken for one of
        # checkpoint's own (preserve_rng_state, debug, ...).
        return checkpoint(functools.partial(self.original, **kwargs), *args, use_reentrant=False, **extra)


def _hf_checkpointing_on(model: nn.Module) -> bool:
    # transformers' own activation_checkpointing_enable() / gradient_checkpointing_enable() sets
    # this flag on each of its layers (duck-typed, so no transformers import).
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _resolve_blocks(model: nn.Module, blocks: Iterable[str | type[nn.Module] | nn.Module] | None) -> list[nn.Module]:
    if blocks is None:
        found = find_transformer_blocks(model)
        if not found:
            raise ValueError(
                f"activation checkpointing: found no repeated transformer block in {type(model).__name__} "
                "(no HF _no_split_modules and no nn.ModuleList of identical modules). Name the blocks: "
                "blocks=['MyBlock'] (class names), ['model.layers.0', ...] (module names) or module objects."
            )
        return found
    named = dict(model.named_modules())
    modules: list[nn.Module] = []
    class_selectors: list[str | type[nn.Module]] = []
    for item in blocks:
        if isinstance(item, nn.Module):
            modules.append(item)
        elif isinstance(item, str) and item in named:
            modules.append(named[item])
        else:
            class_selectors.append(item)
    if class_selectors:
        modules.extend(find_transformer_blocks(model, class_selectors))
    return list({id(m): m for m in modules}.values())


def apply_activation_checkpointing(
    model: nn.Module,
    policy: Policy = "full",
    blocks: Iterable[str | type[nn.Module] | nn.Module] | None = None,
) -> list[nn.Module]:
    """Checkpoint the activations of ``model``'s transformer blocks (non-reentrant); idempotent.

    Args:
        model: any ``nn.Module``; an HF model or a plain one with an ``nn.ModuleList`` of blocks.
        policy: ``"full"`` (keep only each block's inputs, recompute everything in backward),
            ``"selective"`` (also keep the outputs of matmuls and attention kernels, recompute
            norms, activations and element-wise ops: less recompute, more memory), a list of
            aten ops to keep (``[torch.ops.aten.mm.default]``), or a policy function for
            :func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`.
        blocks: which modules to checkpoint: ``None`` finds the transformer blocks
            (:func:`~lightning_memopt.layers.blocks.find_transformer_blocks`); otherwise class
            names (``"LlamaDecoderLayer"``), classes, qualified module names
            (``"model.layers.0"``) or modules.

    Returns:
        The blocks wrapped by this call; blocks already checkpointed are skipped, so a second
        call returns ``[]``. A model using transformers' own gradient checkpointing
        (``gradient_checkpointing_enable()``) is left alone, with a warning.

    With an HF model (also one nested in a wrapper), ``config.use_cache`` is turned off, as
    transformers does under gradient checkpointing: a KV cache filled during forward would be
    filled again by the recompute.

    Example:
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.ff = nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.ff(x).relu()
        >>> model = nn.Sequential(nn.ModuleList([Block(), Block()]))
        >>> [type(b).__name__ for b in apply_activation_checkpointing(model, policy="selective")]
        ['Block', 'Block']
    """
    context_fn = _context_fn(policy)
    if _hf_checkpointing_on(model):
        warnings.warn(
            f"activation checkpointing: {type(model).__name__} already uses transformers' gradient checkpointing "
            "(gradient_checkpointing_enable()); leaving it as it is. Call model.gradient_checkpointing_disable() "
            "first to use this policy instead.",
            stacklevel=2,
        )
        return []
    wrapped = []
    for block in _resolve_blocks(model, blocks):
        if is_activation_checkpointed(block):
            continue
        block.forward = _CheckpointedForward(block, context_fn, block.__dict__.get("forward"))
        setattr(block, _MARK, _policy_name(policy))
        wrapped.append(block)
    if wrapped:
        for module in model.modules():  # the HF model may sit inside a wrapper (a LightningModule)
            config = getattr(module, "config", None)
            if getattr(config, "use_cache", False) is True:
                config.use_cache = False
    return wrapped


def is_activation_checkpointed(model: nn.Module) -> bool:
    """Whether ``model`` or any module inside it is already activation-checkpointed.

    True for blocks wrapped by :func:`apply_activation_checkpointing`, for torch's
    ``checkpoint_wrapper`` modules and for transformers' own gradient checkpointing.

    Example:
        >>> is_activation_checkpointed(nn.Linear(2, 2))
        False
    """
    if _hf_checkpointing_on(model):
        return True
    return any(getattr(m, _MARK, None) is not None or type(m).__name__ == "CheckpointWrapper" for m in model.modules())


def remove_activation_checkpointing(model: nn.Module) -> int:
    """Undo :func:`apply_activation_checkpointing`; returns how many blocks were restored.

    Example:
        >>> model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]))
        >>> _ = apply_activation_checkpointing(model)
        >>> remove_activation_checkpointing(model), is_activation_checkpointed(model)
        (2, False)
    """
    restored = 0
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, _CheckpointedForward):
            if forward.previous is not None:
                module.forward = forward.previous
            else:
                del module.forward
            delattr(module, _MARK)
            restored += 1
    return restored


def measure_activation_bytes(forward: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run ``forward()`` and measure the bytes it allocated that are still alive when it returns.

    That is the activation memory a backward pass will need (tensors saved for backward plus
    the output). On CUDA it is the allocator's ``memory_allocated`` difference; on the CPU it
    is the net allocation recorded by the torch profiler (``profile_memory=True``), which is
    slower: use it for measurements, not in a training loop.

    Returns:
        ``(output, bytes)``; keep ``output`` to run backward on it.

    Example:
        >>> layer = nn.Linear(64, 64)
        >>> out, nbytes = measure_activation_bytes(lambda: layer(torch.randn(32, 64)).relu())
        >>> nbytes >= out.nbytes
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        output = forward()
        torch.cuda.synchronize(device)
        return output, torch.cuda.memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        output = forward()
    return output, int(sum(event.self_cpu_memory_usage for event in prof.events()))
