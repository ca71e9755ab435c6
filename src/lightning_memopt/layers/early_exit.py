"""Early-exit heads on a causal LM (EE-LLM, LayerSkip): train them, then stop at a confident one.

:func:`add_early_exits` attaches an *exit* after chosen decoder blocks of a Hugging Face causal
LM. An exit is the model's final norm followed by its LM head, both **shared** with the final
exit by default (LayerSkip: no new parameters, the early layers learn to speak the head's
language), or a **copy** of each initialised from the final ones with ``share_head=False``
(EE-LLM's own exit heads: ``hidden x vocab`` new weights per exit).

Exit layers are **block indices**, numbered from 0 as in ``model.model.layers[i]``: an exit at
``i`` reads the output of block ``i``, after ``i + 1`` blocks have run. The last block
(``num_layers - 1``) is the model's own final exit and cannot be listed.

Training: :func:`early_exit_loss` runs the model once, takes the hidden state after each exit
block from a forward hook, and returns the weighted sum of the exits' cross-entropies and the
final one, with each loss on its own for logging. :func:`add_early_exits` also makes that sum
the model's own training loss (:mod:`~lightning_memopt.layers.objective`): in training mode
``model(input_ids=ids, labels=ids).loss`` equals ``early_exit_loss(model, ids).loss`` and each
exit's loss is recorded as ``exit_<layer>_loss`` (:func:`~lightning_memopt.layers.last_loss_parts`),
so the stock ``transformers.Trainer``, TRL and plain loops train the exits with no custom loss;
in eval mode ``.loss`` is the final layer's, comparable with a model without exits. Weights are
a fixed list, or LayerSkip's scale that grows with depth (:func:`layerskip_weights`); an optional curriculum
(``"rotational"`` or ``"gradual"``, as in LayerSkip) switches exits on and off by step.

Memory: an exit's logits are ``batch x seq x vocab`` floats (32k-way: 128 KiB per token in
fp32). The exits' losses are computed one at a time, each under activation checkpointing, so
only the hidden state (which the model keeps for its own backward anyway) is saved and the
logits are rebuilt one exit at a time in backward: the peak holds one exit's logits, never all
of them. ``checkpoint_heads=False`` keeps each exit's logits alive until backward (faster, one
``batch x seq x vocab`` tensor per exit).

Inference: :func:`early_exit_forward` gives, for every token of a sequence, the prediction of
the first exit whose top softmax probability reaches ``threshold`` (``threshold >= 1``: never
exit, the full model; ``0``: always the first exit), the layer it exited at and the fraction of
layers skipped. Decoding lives beside it: :func:`~.early_exit_decoding.early_exit_generate`
(confidence exit with a KV cache that really skips the layers, and recomputes a skipped layer's
keys and values later, in one batch with the next token that goes deeper: EE-LLM's *KV
recomputation*) and :func:`~.speculative.self_speculative_generate` (LayerSkip's lossless
self-speculative decoding).

Example:
    >>> import torch
    >>> from lightning_memopt.models import build_llama
    >>> torch.manual_seed(0) and None
    >>> model = build_llama("tiny", vocab_size=257, num_hidden_layers=4)
    >>> exits = add_early_exits(model, exit_layers=[1, 2])
    >>> tokens = torch.randint(0, 257, (2, 16))
    >>> out = early_exit_loss(model, tokens)
    >>> sorted(out.exit_losses), out.loss.shape
    ([1, 2], torch.Size([]))
    >>> early_exit_forward(model, tokens, threshold=0.0).exit_layers.unique().tolist()
    [1]
    >>> remove_early_exits(model)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .blocks import find_transformer_blocks
from .objective import LossTerm, ObjectiveStep, add_loss_term, remove_loss_term

if TYPE_CHECKING:
    from .exit_gates import ExitGates

__all__ = [
    "CURRICULA",
    "EarlyExitForwardOutput",
    "EarlyExitLossOutput",
    "EarlyExitObjective",
    "EarlyExits",
    "ExitHead",
    "add_early_exits",
    "early_exit_forward",
    "early_exit_loss",
    "get_early_exits",
    "layerskip_weights",
    "remove_early_exits",
    "shifted_cross_entropy",
]

# Where the exits live on the model: a plain attribute (no module), so that shared heads are not
# registered twice; own heads are registered as the submodule ``early_exit_heads``.
_ATTR = "_memopt_early_exits"
_HEADS = "early_exit_heads"
# The name of the exits' term in the model's training objective (layers/objective.py).
LOSS_TERM = "early_exits"
# Names HF decoders give their final norm (LLaMA/Mistral/Qwen: norm, GPT-2/Bloom: ln_f, OPT: final_layer_norm).
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "norm_f", "final_norm", "final_layernorm")
CURRICULA = (None, "rotational", "gradual")
IGNORE_INDEX = -100


class ExitHead(nn.Module):
    """One exit: a norm, then the LM head (hidden states -> logits).

    Example:
        >>> head = ExitHead(nn.LayerNorm(4), nn.Linear(4, 10))
        >>> head(torch.zeros(2, 3, 4)).shape
        torch.Size([2, 3, 10])
    """

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


def layerskip_weights(exit_layers: Sequence[int], num_layers: int, scale: float = 1.0) -> list[float]:
    """LayerSkip's loss scale (arXiv 2404.16710, eq. 3), normalised to sum to 1, with layers
    counted by the blocks they have run (``d = index + 1``): an exit after ``d`` blocks weighs
    ``scale * (1 + 2 + ... + d)`` and the final layer ``L + scale * (1 + ... + (L - 1))``, so
    deeper exits count more and the final most. (The paper counts from 0, which gives the
    first block's exit weight 0: counting from 1 keeps every exit trained.)

    Returns one weight per exit, then the final one's.

    Example:
        >>> [round(w, 3) for w in layerskip_weights([1, 2], num_layers=4)]  # 3, 6 and 4 + 6, over 19
        [0.158, 0.316, 0.526]
    """
    raw = [scale * sum(range(1, layer + 2)) for layer in exit_layers]
    raw.append(num_layers + scale * sum(range(1, num_layers)))
    total = sum(raw)
    return [w / total for w in raw]


@dataclass
class EarlyExits:
    """The exits attached to a model (what :func:`add_early_exits` returns; also
    :func:`get_early_exits`). Holds the hooks that capture the exit blocks' outputs.

    Example:
        >>> from lightning_memopt.models import build_llama
        >>> exits = add_early_exits(build_llama("tiny", vocab_size=257), [1])
        >>> exits.exit_layers, exits.num_layers, exits.shared
        ((1,), 4, True)
    """

    exit_layers: tuple[int, ...]
    num_layers: int
    blocks: list[nn.Module] = field(repr=False)
    heads: dict[int, ExitHead] = field(repr=False)
    final_head: ExitHead = field(repr=False)
    shared: bool
    loss_weights: str | tuple[float, ...]
    layerskip_scale: float = 1.0
    curriculum: str | None = None
    curriculum_steps: int = 1
    checkpoint_heads: bool = True
    _captured: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _capturing: bool = field(default=False, repr=False)
    _handles: list[Any] = field(default_factory=list, repr=False)

    # -- capture -------------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        for layer in self.exit_layers:
            self._handles.append(self.blocks[layer].register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int):
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            if self._capturing:
                self._captured[layer] = output[0] if isinstance(output, (tuple, list)) else output

        return capture

    @contextmanager
    def capture(self) -> Iterator[dict[int, torch.Tensor]]:
        """Record the output of each exit block during the forward passes inside the block.

        Only inside it: a normal forward (or the recomputation of an activation-checkpointed
        block in backward) keeps nothing.

        Example:
            >>> from lightning_memopt.models import build_llama
            >>> model = build_llama("tiny", vocab_size=257)
            >>> exits = add_early_exits(model, [0, 2])
            >>> with exits.capture() as hidden:
            ...     _ = model(torch.zeros(1, 4, dtype=torch.long))
            >>> sorted(hidden), hidden[0].shape
            ([0, 2], torch.Size([1, 4, 256]))
        """
        self.start_capture()
        try:
            yield self._captured
        finally:
            self.stop_capture()

    def start_capture(self) -> None:
        """Start recording the exit blocks' outputs (what :meth:`capture` does on entry), for
        frameworks whose forward runs between two hooks.

        Example:
            >>> from lightning_memopt.models import build_llama
            >>> model = build_llama("tiny", vocab_size=257)
            >>> exits = add_early_exits(model, [1])
            >>> exits.start_capture(); _ = model(torch.zeros(1, 4, dtype=torch.long))
            >>> sorted(exits.stop_capture())
            [1]
        """
        self._captured = {}
        self._capturing = True

    def stop_capture(self) -> dict[int, torch.Tensor]:
        """Stop recording; returns what was recorded since :meth:`start_capture` and forgets it.

        Example:
            >>> from lightning_memopt.models import build_llama
            >>> add_early_exits(build_llama("tiny", vocab_size=257), [1]).stop_capture()
            {}
        """
        captured, self._captured, self._capturing = self._captured, {}, False
        return captured

    def remove_hooks(self) -> None:
        """Detach the capture hooks (:func:`remove_early_exits` calls it).

        Example:
            >>> from lightning_memopt.models import build_llama
            >>> add_early_exits(build_llama("tiny", vocab_size=257), [1]).remove_hooks()
        """
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def exit_losses(
        self,
        hidden: dict[int, torch.Tensor],
        labels: torch.Tensor,
        layers: Sequence[int] | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift: bool = True,
    ) -> dict[int, torch.Tensor]:
        """Each exit's next-token cross-entropy from captured hidden states (see :meth:`capture`),
        one exit at a time; under autograd each is checkpointed (``checkpoint_heads``), so its
        logits are rebuilt in backward instead of kept.

        ``num_items_in_batch``: as transformers' causal-LM loss under gradient accumulation, the
        sum over this batch divided by it (default: the mean). ``shift=False``: ``labels`` are
        already aligned with the positions (transformers' ``shift_labels``).

        Example:
            >>> from lightning_memopt.models import build_llama
            >>> model = build_llama("tiny", vocab_size=257)
            >>> exits = add_early_exits(model, [1])
            >>> tokens = torch.randint(0, 257, (1, 6))
            >>> with exits.capture() as hidden:
            ...     _ = model(tokens)
            ...     losses = exits.exit_losses(hidden, tokens)
            >>> list(losses)
            [1]
        """
        layers = self.exit_layers if layers is None else layers
        missing = [layer for layer in layers if layer not in hidden]
        if missing:
            raise RuntimeError(
                f"early exits: the forward never ran exit block(s) {missing}; the exits' blocks are not those the "
                "model runs (pass blocks=[...] to add_early_exits), or the forward ran outside capture()."
            )
        losses: dict[int, torch.Tensor] = {}
        for layer in layers:
            head, state = self.heads[layer], hidden[layer]
            args = (head, state, labels.to(state.device), num_items_in_batch, shift)
            if self.checkpoint_heads and torch.is_grad_enabled() and state.requires_grad:
                losses[layer] = checkpoint(_exit_loss, *args, use_reentrant=False)
            else:
                losses[layer] = _exit_loss(*args)
        return losses

    # -- weights -------------------------------------------------------------------------------

    def active_exits(self, step: int | None = None) -> list[int]:
        """The exits that train at optimizer step ``step`` under the curriculum (all of them
        without one, or when ``step`` is ``None``).

        ``"rotational"``: one exit in ``curriculum_steps`` (by position) trains at each step,
        in turn. ``"gradual"``: exits switch on from the deepest to the shallowest, one more
        every ``curriculum_steps`` steps. The final loss always trains.

        Example:
            >>> from lightning_memopt.models import build_llama
            >>> exits = add_early_exits(build_llama("tiny", vocab_size=257, num_hidden_layers=6), [1, 2, 3],
            ...                         curriculum="gradual", curriculum_steps=10)
            >>> exits.active_exits(0), exits.active_exits(10), exits.active_exits(25)
            ([3], [2, 3], [1, 2, 3])
        """
        if self.curriculum is None or step is None:
            return list(self.exit_layers)
        if self.curriculum == "rotational":
            period = self.curriculum_steps
            return [layer for i, layer in enumerate(self.exit_layers) if i % period == step % period]
        shown = 1 + step // self.curriculum_steps
        return list(self.exit_layers[-shown:])

    def weights(self, active: Sequence[int] | None = None) -> dict[int | str, float]:
        """Loss weight of each active exit and of ``"final"``. LayerSkip's weights are
        re-normalised over the active losses (so they always sum to 1); a fixed list is used as
        given.

        Example:
            >>> from lightning_memopt.models import build_llama
            >>> exits = add_early_exits(build_llama("tiny", vocab_size=257), [1], loss_weights=[0.5])
            >>> exits.weights()
            {1: 0.5, 'final': 1.0}
        """
        active = list(self.exit_layers) if active is None else list(active)
        if self.loss_weights == "layerskip":
            full = layerskip_weights(self.exit_layers, self.num_layers, self.layerskip_scale)
            raw: dict[int | str, float] = {layer: full[self.exit_layers.index(layer)] for layer in active}
            raw["final"] = full[-1]
            total = sum(raw.values())
            return {key: value / total for key, value in raw.items()}
        given = dict(zip(self.exit_layers, self.loss_weights))
        out: dict[int | str, float] = {layer: given[layer] for layer in active}
        out["final"] = self.loss_weights[-1] if len(self.loss_weights) > len(self.exit_layers) else 1.0
        return out


def get_early_exits(model: nn.Module) -> EarlyExits | None:
    """The exits :func:`add_early_exits` attached to ``model``, or ``None``.

    Example:
        >>> get_early_exits(nn.Linear(2, 2)) is None
        True
    """
    return getattr(model, _ATTR, None)


def _find_final_norm(model: nn.Module, blocks: list[nn.Module]) -> nn.Module | None:
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    found = None
    for name, module in model.named_modules():
        if id(module) in in_blocks or not name:
            continue
        if name.rsplit(".", 1)[-1] in _FINAL_NORM_NAMES and not list(module.children()):
            found = module  # the last one in module order: the norm after the blocks
    return found


def _check_exit_layers(exit_layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    layers = list(exit_layers)
    last = num_layers - 1
    fix = f"list block indices between 0 and {last - 1} (the model has {num_layers} blocks, numbered 0..{last})"
    if not layers:
        raise ValueError(f"add_early_exits: exit_layers is empty; {fix}.")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"add_early_exits: exit layer {layer!r} is not an int; {fix}.")
        if layer == last:
            raise ValueError(
                f"add_early_exits: exit layer {layer} is the last block, whose output already goes to the model's "
                f"own final head; drop it and {fix}."
            )
        if not 0 <= layer < last:
            raise ValueError(f"add_early_exits: exit layer {layer} is out of range; {fix}.")
    duplicates = sorted({layer for layer in layers if layers.count(layer) > 1})
    if duplicates:
        raise ValueError(
            f"add_early_exits: exit_layers={layers} lists {duplicates} more than once; list each block once: "
            f"{sorted(set(layers))}."
        )
    if layers != sorted(layers):
        raise ValueError(f"add_early_exits: exit_layers={layers} must be in increasing order; write {sorted(layers)}.")
    return tuple(layers)


def _check_weights(loss_weights: str | Sequence[float] | None, exit_layers: tuple[int, ...]) -> str | tuple[float, ...]:
    if loss_weights is None or loss_weights == "layerskip":
        return "layerskip"
    if isinstance(loss_weights, str):
        raise ValueError(
            f"add_early_exits: loss_weights={loss_weights!r} is not known; use 'layerskip' or a list of numbers."
        )
    weights = tuple(float(w) for w in loss_weights)
    n = len(exit_layers)
    if len(weights) not in (n, n + 1):
        raise ValueError(
            f"add_early_exits: loss_weights={list(weights)} has {len(weights)} values for {n} exits "
            f"{list(exit_layers)}; give {n} (one per exit; the final loss weighs 1) or {n + 1} (the last for the "
            "final loss)."
        )
    bad = [w for w in weights if not (w >= 0 and math.isfinite(w))]
    if bad:
        raise ValueError(f"add_early_exits: loss_weights={list(weights)} holds {bad}; weights must be finite and >= 0.")
    return weights


def add_early_exits(
    model: nn.Module,
    exit_layers: Sequence[int],
    *,
    share_head: bool = True,
    loss_weights: str | Sequence[float] | None = "layerskip",
    layerskip_scale: float = 1.0,
    curriculum: str | None = None,
    curriculum_steps: int = 1,
    checkpoint_heads: bool = True,
    blocks: Sequence[nn.Module] | None = None,
    norm: nn.Module | None = None,
    head: nn.Module | None = None,
) -> EarlyExits:
    """Attach exits after blocks ``exit_layers`` (0-based block indices) of a causal LM.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM`` from
            :func:`~lightning_memopt.models.build_llama`, or any decoder whose blocks, final
            norm and LM head can be found; pass ``blocks``/``norm``/``head`` otherwise).
        exit_layers: increasing block indices in ``0 .. num_layers - 2``.
        share_head: ``True`` (LayerSkip): every exit uses the model's final norm and LM head,
            no new parameters. ``False`` (EE-LLM): each exit gets its own copy of the final
            norm and LM head, initialised from them and registered as
            ``model.early_exit_heads`` (so they train, and are saved in the state dict).
        loss_weights: ``"layerskip"`` (:func:`layerskip_weights`, the default), or one weight
            per exit (the final loss weighs 1), or one per exit plus one for the final loss.
        layerskip_scale: the ``e_scale`` of LayerSkip's weights.
        curriculum: ``None`` (all exits train at every step), ``"rotational"`` or ``"gradual"``
            (see :meth:`EarlyExits.active_exits`); it acts where a step is passed to
            :func:`early_exit_loss`.
        curriculum_steps: the period of the rotation, or the steps between two exits switching on.
        checkpoint_heads: recompute each exit's logits in backward instead of keeping them
            (see the module docs).
        blocks, norm, head: override what is found: the decoder blocks, the final norm and the
            module mapping normed hidden states to logits.

    After it, the model's own ``forward`` returns the early-exit objective as ``.loss`` in
    training mode with ``labels`` (see :class:`EarlyExitObjective`); the curriculum advances
    with :func:`~lightning_memopt.layers.objective.set_training_step` (which
    ``LayerMetricsCallback`` and the Lightning ``EarlyExit`` callback call every step).

    Raises:
        ValueError: for exit layers out of range, duplicated, unsorted or the last block; for
            weights of the wrong length; for a model that already has exits or whose blocks,
            final norm or head cannot be found.

    Example:
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257)
        >>> exits = add_early_exits(model, [1], share_head=False)
        >>> sum(p.numel() for p in model.early_exit_heads.parameters())  # a norm and a 256 x 257 head
        66048
    """
    if get_early_exits(model) is not None:
        raise ValueError(
            f"add_early_exits: this {type(model).__name__} already has exits at "
            f"{list(get_early_exits(model).exit_layers)}; call remove_early_exits(model) first."
        )
    found = list(blocks) if blocks is not None else find_transformer_blocks(model)
    if len(found) < 2:
        raise ValueError(
            f"add_early_exits: found {len(found)} transformer block(s) in {type(model).__name__}; early exits need a "
            "stack of at least 2. Pass blocks=[...] (the decoder layers in order)."
        )
    num_layers = len(found)
    layers = _check_exit_layers(exit_layers, num_layers)
    weights = _check_weights(loss_weights, layers)
    if curriculum not in CURRICULA:
        raise ValueError(f"add_early_exits: curriculum={curriculum!r}; use one of {list(CURRICULA)}.")
    if curriculum_steps < 1:
        raise ValueError(f"add_early_exits: curriculum_steps={curriculum_steps}; use an int >= 1.")
    final_norm = norm if norm is not None else _find_final_norm(model, found)
    if final_norm is None:
        raise ValueError(
            f"add_early_exits: no final norm found in {type(model).__name__} (looked for modules named "
            f"{list(_FINAL_NORM_NAMES)} outside the blocks). Pass norm=... (nn.Identity() if the model has none)."
        )
    lm_head = (
        head if head is not None else model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    )
    if lm_head is None:
        raise ValueError(
            f"add_early_exits: {type(model).__name__} has no output embeddings (LM head); pass head=... (the module "
            "that maps normed hidden states to logits)."
        )
    final_head = ExitHead(final_norm, lm_head)
    if share_head:
        heads = {layer: final_head for layer in layers}
    else:
        own = nn.ModuleDict({str(layer): ExitHead(copy.deepcopy(final_norm), _copy_head(lm_head)) for layer in layers})
        model.add_module(_HEADS, own)
        heads = {layer: own[str(layer)] for layer in layers}
    exits = EarlyExits(
        exit_layers=layers,
        num_layers=num_layers,
        blocks=found,
        heads=heads,
        final_head=final_head,
        shared=share_head,
        loss_weights=weights,
        layerskip_scale=layerskip_scale,
        curriculum=curriculum,
        curriculum_steps=curriculum_steps,
        checkpoint_heads=checkpoint_heads,
    )
    exits._install_hooks()
    setattr(model, _ATTR, exits)
    add_loss_term(model, LOSS_TERM, EarlyExitObjective())
    return exits


def _copy_head(head: nn.Module) -> nn.Module:
    # A tied LM head shares its weight with the input embedding; the copy must own its own.
    clone = copy.deepcopy(head)
    for name, param in list(clone.named_parameters(recurse=False)):
        setattr(clone, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
    return clone


def remove_early_exits(model: nn.Module) -> None:
    """Undo :func:`add_early_exits`: remove the hooks, the attribute, any own exit heads and the
    exits' term of the training objective (the model's own loss again).

    A model without exits is left alone.

    Example:
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257)
        >>> _ = add_early_exits(model, [1], share_head=False)
        >>> remove_early_exits(model)
        >>> hasattr(model, "early_exit_heads"), get_early_exits(model)
        (False, None)
    """
    exits = get_early_exits(model)
    if exits is None:
        return
    exits.remove_hooks()
    remove_loss_term(model, LOSS_TERM)
    delattr(model, _ATTR)
    if _HEADS in model._modules:
        del model._modules[_HEADS]


def _require_exits(model: nn.Module, caller: str) -> EarlyExits:
    exits = get_early_exits(model)
    if exits is None:
        raise ValueError(
            f"{caller}: the model has no early exits; call add_early_exits(model, exit_layers=[...]) first."
        )
    return exits


# -- training ----------------------------------------------------------------------------------


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy as Hugging Face causal LMs compute it: position ``t`` predicts
    ``labels[t + 1]``; ``-100`` is ignored; the mean over the counted tokens, in fp32.

    Example:
        >>> round(shifted_cross_entropy(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 2]])).item(), 4)  # log(5)
        1.6094
    """
    return _next_token_loss(logits, labels)


def _next_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift: bool = True,
) -> torch.Tensor:
    # transformers' ForCausalLMLoss: fp32 logits, -100 ignored; the mean, or the sum over the
    # number of tokens of the whole accumulated batch when the Trainer passes it.
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction=reduction
    )
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def _exit_loss(
    head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift: bool = True,
) -> torch.Tensor:
    return _next_token_loss(head(hidden), labels, num_items_in_batch, shift)


def _weighted_sum(
    final_loss: torch.Tensor, exit_losses: dict[int, torch.Tensor], weights: dict[int | str, float]
) -> torch.Tensor:
    """The early-exit objective: ``w_final * final + sum_k w_k * exit_k`` (one definition for
    :func:`early_exit_loss` and the model's own training loss)."""
    total = weights["final"] * final_loss
    for layer, loss in exit_losses.items():
        total = total + weights[layer] * loss
    return total


@dataclass
class EarlyExitLossOutput:
    """What :func:`early_exit_loss` returns.

    Attributes:
        loss: the weighted sum, to call ``backward`` on.
        final_loss: the final layer's cross-entropy (the model's usual loss).
        exit_losses: each active exit's cross-entropy, by block index.
        weights: the weight each term got (``"final"`` for the final loss).
        logits: the final layer's logits (the model's output).

    Example:
        >>> out = EarlyExitLossOutput(torch.tensor(1.0), torch.tensor(1.0), {}, {"final": 1.0}, None)
        >>> out.loss.item()
        1.0
    """

    loss: torch.Tensor
    final_loss: torch.Tensor
    exit_losses: dict[int, torch.Tensor]
    weights: dict[int | str, float]
    logits: torch.Tensor | None


def early_exit_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    step: int | None = None,
    **kwargs: Any,
) -> EarlyExitLossOutput:
    """One forward of ``model`` and the early-exit training loss: the weighted sum of each
    exit's next-token cross-entropy and the final one (weights from :func:`add_early_exits`).

    ``labels`` default to ``input_ids`` (shifted inside, ``-100`` ignored, as HF does).
    ``step`` drives the curriculum, if any. Extra keyword arguments go to the model's forward.

    Example:
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257)
        >>> _ = add_early_exits(model, [1], loss_weights=[0.5, 1.0])
        >>> out = early_exit_loss(model, torch.randint(0, 257, (2, 8)))
        >>> torch.allclose(out.loss, 0.5 * out.exit_losses[1] + out.final_loss)
        True
    """
    exits = _require_exits(model, "early_exit_loss")
    labels = input_ids if labels is None else labels
    active = exits.active_exits(step)
    with exits.capture() as captured:
        output = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = dict(captured)
    logits = output.logits
    final_loss = shifted_cross_entropy(logits, labels)
    weights = exits.weights(active)
    exit_losses = exits.exit_losses(hidden, labels, active)
    return EarlyExitLossOutput(
        _weighted_sum(final_loss, exit_losses, weights), final_loss, exit_losses, weights, logits
    )


class EarlyExitObjective(LossTerm):
    """The exits' term of the model's training objective, which :func:`add_early_exits`
    registers (:func:`~lightning_memopt.layers.add_loss_term`, name ``"early_exits"``).

    In a training forward with ``labels`` it captures the exit blocks' outputs, then replaces
    ``.loss`` (the model's own, final-layer loss) by the weighted sum of it and the active exits'
    losses, exactly as :func:`early_exit_loss` (same weights and curriculum; one exit's logits at
    a time, recomputed in backward), and records each exit's loss as ``exit_<layer>_loss``.
    ``num_items_in_batch`` (the HF Trainer under gradient accumulation) and ``shift_labels`` are
    honoured as transformers' loss does. The curriculum step is the last one given to
    :meth:`set_training_step` (``None`` before any: every exit trains).

    Example:
        >>> from lightning_memopt.layers import last_loss_parts
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257)
        >>> _ = add_early_exits(model, [1], loss_weights=[0.5])
        >>> ids = torch.randint(0, 257, (2, 8))
        >>> loss = model(input_ids=ids, labels=ids).loss  # training mode: the early-exit objective
        >>> sorted(last_loss_parts(model)), torch.allclose(loss, early_exit_loss(model, ids).loss)
        (['exit_1_loss'], True)
    """

    def __init__(self) -> None:
        self.training_step: int | None = None
        self._name = LOSS_TERM

    def set_training_step(self, step: int) -> None:
        """Remember the optimizer step, for the curriculum."""
        self.training_step = step

    def around_forward(self, step: ObjectiveStep, name: str) -> Any:
        self._name = name
        return _require_exits(step.model, "early exits' training loss").capture()

    def __call__(self, step: ObjectiveStep) -> None:
        exits = _require_exits(step.model, "early exits' training loss")
        labels, shift = step.inputs.get("labels"), True
        if step.inputs.get("shift_labels") is not None:  # transformers' convention: already aligned
            labels, shift = step.inputs["shift_labels"], False
        active = exits.active_exits(self.training_step)
        weights = exits.weights(active)
        exit_losses = exits.exit_losses(
            step.state[self._name],
            labels,
            active,
            num_items_in_batch=step.inputs.get("num_items_in_batch"),
            shift=shift,
        )
        step.loss = _weighted_sum(step.loss, exit_losses, weights)
        for layer, loss in exit_losses.items():
            step.parts[f"exit_{layer}_loss"] = loss.detach()


# -- inference: teacher-forced -----------------------------------------------------------------


def _never_exits(threshold: float) -> bool:
    # A softmax reaches 1.0 only by float rounding: threshold >= 1 means "run the full model".
    return threshold >= 1.0


@dataclass
class EarlyExitForwardOutput:
    """What :func:`early_exit_forward` returns.

    Attributes:
        logits: ``batch x seq x vocab``: each token's logits from the exit it stopped at.
        exit_layers: ``batch x seq``: that exit's block index (``num_layers - 1``: the final).
        num_layers: the model's number of blocks.
        loss: next-token cross-entropy of those logits, when ``labels`` were given.

    Example:
        >>> out = EarlyExitForwardOutput(torch.zeros(1, 2, 3), torch.tensor([[1, 3]]), 4)
        >>> out.mean_layers_run, out.fraction_skipped
        (3.0, 0.25)
    """

    logits: torch.Tensor
    exit_layers: torch.Tensor
    num_layers: int
    loss: torch.Tensor | None = None

    @property
    def mean_layers_run(self) -> float:
        """Blocks run per token, on average."""
        return float((self.exit_layers + 1).float().mean())

    @property
    def fraction_skipped(self) -> float:
        """The fraction of blocks each token skips, on average."""
        return 1.0 - self.mean_layers_run / self.num_layers


@torch.no_grad()
def early_exit_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    threshold: float,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    exit_layers: Sequence[int] | None = None,
    gates: ExitGates | None = None,
) -> EarlyExitForwardOutput:
    """Per-token confidence-based exit over a whole sequence (teacher forcing).

    ``exit_layers`` restricts the exits tried to a subset of the model's (default: all), as
    :func:`early_exit_generate` does. With ``gates`` (:func:`fit_exit_gates`), a token exits where
    its gate's probability is at least ``threshold`` instead of the softmax's, as
    :func:`early_exit_generate` decides with the same gates.

    Each token takes the prediction of the first exit whose top softmax probability is at
    least ``threshold``, else the final layer's. ``threshold >= 1`` never exits (the full
    model's logits, exactly); ``threshold = 0`` always takes the first exit (exactly the model
    cut after that block, plus the head). All blocks run here, since later tokens attend to
    deeper states of earlier ones; the exit layers say what :func:`early_exit_generate` skips
    when it decodes the same tokens. Exit logits are computed only for tokens still running,
    one exit at a time.

    Example:
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257)
        >>> _ = add_early_exits(model, [1])
        >>> tokens = torch.randint(0, 257, (1, 8))
        >>> out = early_exit_forward(model, tokens, threshold=2.0)
        >>> torch.equal(out.logits, model(tokens).logits), out.fraction_skipped
        (True, 0.0)
    """
    exits = _require_exits(model, "early_exit_forward")
    tried = _tried_exits(exits, exit_layers, gates, "early_exit_forward")
    with exits.capture() as captured:
        output = model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = dict(captured)
    logits = output.logits.clone()
    final = exits.num_layers - 1
    exit_layers = torch.full(input_ids.shape, final, dtype=torch.long, device=input_ids.device)
    if not _never_exits(threshold):
        running = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        for layer in sorted(tried):
            if not running.any():
                break
            states = hidden[layer][running]
            if gates is None:
                exit_logits = exits.heads[layer](states).to(logits.dtype)
                confident = exit_logits.float().softmax(-1).amax(-1) >= threshold
                exit_logits = exit_logits[confident]
            else:  # the head runs only for the tokens whose gate fires, as in decoding
                confident = gates.fires(layer, states, threshold)
                exit_logits = exits.heads[layer](states[confident]).to(logits.dtype)
            where = running.nonzero(as_tuple=True)
            chosen = tuple(index[confident] for index in where)
            logits[chosen] = exit_logits
            exit_layers[chosen] = layer
            running[chosen] = False
    loss = shifted_cross_entropy(logits, labels) if labels is not None else None
    return EarlyExitForwardOutput(logits, exit_layers, exits.num_layers, loss)


def _tried_exits(
    exits: EarlyExits, exit_layers: Sequence[int] | None, gates: ExitGates | None, caller: str
) -> tuple[int, ...]:
    """The exits a confidence-exit call tries (default: all), checked against the model's and the gates'."""
    tried = exits.exit_layers if exit_layers is None else tuple(exit_layers)
    unknown = [layer for layer in tried if layer not in exits.exit_layers]
    if unknown:
        raise ValueError(
            f"{caller}: exit_layers={list(tried)} names {unknown}, which are not exits of the model; "
            f"its exits are {list(exits.exit_layers)}."
        )
    if gates is not None:
        hidden_size = getattr(exits.final_head.head, "in_features", gates.hidden_size)
        gates.check_covers(tried, hidden_size, caller)
    return tried


def __getattr__(name: str) -> Any:
    # Generation moved to early_exit_decoding.py; the old import path keeps working.
    if name in ("early_exit_generate", "EarlyExitGenerateOutput"):
        from . import early_exit_decoding as decoding

        return getattr(decoding, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
