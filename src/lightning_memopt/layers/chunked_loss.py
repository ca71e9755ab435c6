"""Causal-LM cross-entropy without the full logits: the LM head and the loss, chunk by chunk.

A causal LM's logits are ``batch x seq x vocab`` floats: at a 32000-token vocabulary they are
the largest activation of a small model (8 x 256 tokens: 250 MiB in float32, and the loss's
backward makes two more of that size). :func:`chunked_cross_entropy` applies the LM head and
the cross-entropy to ``chunk_size`` tokens at a time in a custom autograd function: forward
keeps only each token's log-sum-exp; backward recomputes one chunk's logits at a time, turns
them into the softmax gradient in place and accumulates the head's weight gradient into one
buffer (``addmm_``). The peak holds one chunk's logits instead of three full logits tensors,
for one extra LM-head matmul per step.

The result equals ``F.cross_entropy(hidden @ weight.T, labels)`` up to float rounding (the
softmax is taken in float32 whatever the input dtype).

Example:
    >>> import torch
    >>> hidden, head = torch.randn(2, 16, 8), torch.nn.Linear(8, 50, bias=False)
    >>> labels = torch.randint(0, 50, (2, 16))
    >>> loss = chunked_cross_entropy(hidden, head.weight, labels, chunk_size=5)
    >>> full = torch.nn.functional.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    >>> torch.allclose(loss, full, atol=1e-6)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .objective import get_objective, set_main_loss

__all__ = ["chunked_causal_lm_loss", "chunked_cross_entropy", "remove_chunked_loss", "use_chunked_loss"]

_MAIN_LOSS_NAME = "chunked_loss"
# Config attributes of causal LMs whose logits are not ``lm_head(last_hidden_state)``
# (soft-capped, scaled): their loss cannot be computed from the head's weight alone.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` (rows of ``hidden`` are tokens),
    with logits materialised one chunk of rows at a time in forward and in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_size: int,
        ignore_index: int,
    ) -> torch.Tensor:
        counted = targets != ignore_index
        safe_targets = torch.where(counted, targets, 0)
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = F.linear(hidden[rows], weight, bias).float()
            lse[rows] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_targets[rows, None]).squeeze(1)
            total += ((lse[rows] - picked) * counted[rows]).sum()
        ctx.save_for_backward(hidden, weight, bias, safe_targets, counted, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, counted, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            # d(lse - logit[target]) / d logits = softmax - onehot(target), for counted tokens.
            grad_logits = F.linear(hidden[rows], weight, bias).float()
            grad_logits.sub_(lse[rows, None]).exp_()
            grad_logits.scatter_add_(1, targets[rows, None], torch.full_like(lse[rows, None], -1.0))
            grad_logits.mul_((counted[rows] * grad_total)[:, None])
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden[rows])
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def chunked_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    *,
    bias: torch.Tensor | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean (or summed) next-token cross-entropy of ``hidden_states @ weight.T (+ bias)`` against ``labels``,
    computed ``chunk_size`` tokens at a time so that the full logits never exist.

    Args:
        hidden_states: ``(..., seq, hidden)``, the decoder's final (normalised) hidden states.
        weight: the LM head's ``(vocab, hidden)`` weight; ``bias``: its bias, if it has one.
        labels: ``(..., seq)`` token ids; ``ignore_index`` entries are not counted.
        chunk_size: tokens per chunk (across the batch, after flattening); a larger chunk is
            faster, a smaller one holds less memory (logits of ``chunk_size x vocab`` floats).
        shift: predict token ``t + 1`` from position ``t`` (Hugging Face's ``labels``
            convention); ``False``: ``labels`` are already aligned with ``hidden_states``.
        reduction: ``"mean"`` over the counted tokens, or ``"sum"`` (divide it by the number of
            tokens of the whole accumulated batch yourself, as HF's ``num_items_in_batch`` does).

    Returns:
        the loss, a float32 scalar (the mean is NaN when no token is counted, as
        ``F.cross_entropy`` gives).

    Raises:
        ValueError: for a ``chunk_size`` below 1, or shapes that do not match.

    Example:
        >>> h, w = torch.randn(1, 6, 4), torch.randn(10, 4)
        >>> chunked_cross_entropy(h, w, torch.tensor([[1, 2, 3, 4, 5, 6]]), chunk_size=2).shape
        torch.Size([])
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_cross_entropy: chunk_size={chunk_size!r} must be a positive number of tokens.")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_cross_entropy: reduction={reduction!r}; use 'mean' or 'sum'.")
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"chunked_cross_entropy: hidden_states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} "
            "must agree on every dimension but the last (hidden)."
        )
    if hidden_states.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"chunked_cross_entropy: the head weight {tuple(weight.shape)} does not take hidden size "
            f"{hidden_states.shape[-1]}; pass the LM head's (vocab, hidden) weight."
        )
    if shift:
        hidden_states, labels = hidden_states[..., :-1, :], labels[..., 1:]
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = labels.reshape(-1)
    total = _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, ignore_index)
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()


def chunked_causal_lm_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, chunk_size: int = 1024
) -> torch.Tensor:
    """A Hugging Face causal LM's next-token loss through :func:`chunked_cross_entropy`: the
    decoder's last hidden state (``model.get_decoder()``), then its LM head
    (``model.get_output_embeddings()``) and the loss, ``chunk_size`` tokens at a time.

    Only for models whose logits are the LM head applied to that hidden state (LLaMA, Mistral,
    Qwen2/3), not those that transform, scale or soft-cap them first.

    Raises:
        ValueError: when the LM head is a sharded DTensor (FSDP): only the model's own forward
            gathers it.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> ids = torch.randint(0, 50, (2, 8))
        >>> torch.allclose(chunked_causal_lm_loss(model, ids, chunk_size=3), model(ids, labels=ids).loss, atol=1e-5)
        True
    """
    head = model.get_output_embeddings()
    if callable(getattr(head.weight, "to_local", None)):
        raise ValueError(
            "chunked_causal_lm_loss cannot be used under FSDP (apollo_fsdp): the LM head is sharded and only the "
            "model's own forward gathers it. Use the model's own loss (CausalLM: model.loss_chunk_size: null)."
        )
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    labels = input_ids if labels is None else labels
    return chunked_cross_entropy(hidden, head.weight, labels, chunk_size, bias=head.bias)


def _check_chunkable(model: nn.Module) -> nn.Module:
    """The LM head of ``model``, or a ``ValueError`` saying why its loss cannot be chunked."""
    config = getattr(model, "config", None)
    transforms = [a for a in _LOGIT_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)]
    if transforms:
        raise ValueError(
            f"use_chunked_loss: {type(model).__name__} transforms its logits ({', '.join(transforms)}), so its "
            "loss is not the cross-entropy of lm_head(hidden) that the chunked loss computes; keep its own loss."
        )
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not callable(get_decoder) or get_decoder() is None or head is None or not hasattr(head, "weight"):
        raise ValueError(
            f"use_chunked_loss: {type(model).__name__} is not a Hugging Face causal LM with a decoder "
            "(get_decoder()) and an LM head (get_output_embeddings()); pass e.g. a LlamaForCausalLM."
        )
    if callable(getattr(head.weight, "to_local", None)):
        raise ValueError(
            "use_chunked_loss cannot be used under FSDP: the LM head is sharded and only the model's own forward "
            "gathers it. Call use_chunked_loss before sharding is not enough either; keep the model's own loss."
        )
    return head


# Arguments of a causal LM's forward that its decoder does not take.
_HEAD_ONLY_ARGUMENTS = ("labels", "num_items_in_batch", "logits_to_keep", "shift_labels", "ignore_index", "return_dict")


def _chunked_main_loss(chunk_size: int) -> Any:
    def main_loss(model: nn.Module, forward: Any, kwargs: dict[str, Any]) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        head = _check_chunkable(model)
        decoder_kwargs = {k: v for k, v in kwargs.items() if k not in _HEAD_ONLY_ARGUMENTS}
        decoder_output = model.get_decoder()(**decoder_kwargs)
        hidden = decoder_output.last_hidden_state
        labels, shift_labels = kwargs["labels"], kwargs.get("shift_labels")
        ignore_index = kwargs.get("ignore_index", -100)
        if shift_labels is not None:  # transformers' convention: already aligned, no shift
            labels, shift = shift_labels, False
        else:
            shift = True
        labels = labels.to(hidden.device)
        num_items = kwargs.get("num_items_in_batch")
        if num_items is None:
            loss = chunked_cross_entropy(
                hidden, head.weight, labels, chunk_size, bias=head.bias, shift=shift, ignore_index=ignore_index
            )
        else:
            # As transformers' ForCausalLMLoss under gradient accumulation: the sum over this
            # micro-batch divided by the token count of the whole accumulated batch.
            total = chunked_cross_entropy(
                hidden,
                head.weight,
                labels,
                chunk_size,
                bias=head.bias,
                shift=shift,
                ignore_index=ignore_index,
                reduction="sum",
            )
            if torch.is_tensor(num_items):
                num_items = num_items.to(total.device)
            loss = total / num_items
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            cache=decoder_output.get("cache"),
            hidden_states=getattr(decoder_output, "hidden_states", None),
            attentions=getattr(decoder_output, "attentions", None),
        )

    return main_loss


def use_chunked_loss(model: nn.Module, chunk_size: int = 1024) -> nn.Module:
    """Make a Hugging Face causal LM's own ``forward`` compute its training loss chunk by chunk.

    After it, in **training mode with** ``labels``, ``model(input_ids, labels=labels)`` runs the
    decoder, then the LM head and the cross-entropy ``chunk_size`` tokens at a time
    (:func:`chunked_cross_entropy`): ``.loss`` equals the plain loss (value and gradients, up
    to float rounding; ``num_items_in_batch`` and ``shift_labels`` are honoured as transformers
    does), and **``.logits`` is** ``None``: the full logits never exist. In eval mode, or
    without labels, the forward is the model's own (logits returned; eval loss unchanged).
    So the stock ``transformers.Trainer``, TRL and plain loops train with the chunked loss and
    no subclass. Built on :mod:`~lightning_memopt.layers.objective` (it is the model's *main
    loss*); :func:`remove_chunked_loss` undoes it.

    Only for models whose logits are the LM head applied to the decoder's last hidden state
    (LLaMA, Mistral, Qwen2/3, GPT-2 ...), not those that soft-cap or scale them (refused).

    Args:
        model: a Hugging Face causal LM (``get_decoder()`` and ``get_output_embeddings()``).
        chunk_size: tokens per chunk (across the batch): smaller holds less memory.

    Returns:
        ``model`` (changed in place).

    Raises:
        ValueError: for a bad ``chunk_size``, a model that is not such a causal LM, or whose
            logits are transformed.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> ids = torch.randint(0, 50, (2, 8))
        >>> plain = model(ids, labels=ids).loss
        >>> out = use_chunked_loss(model, chunk_size=4)(ids, labels=ids)
        >>> out.logits is None, torch.allclose(out.loss, plain, atol=1e-6)
        (True, True)
        >>> _ = remove_chunked_loss(model)
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"use_chunked_loss: chunk_size={chunk_size!r} must be a positive number of tokens (e.g. 1024)."
        )
    _check_chunkable(model)
    objective = get_objective(model)
    if objective is not None and objective.main_loss_name == _MAIN_LOSS_NAME:
        set_main_loss(model, None)  # a new chunk size replaces the old one
    set_main_loss(model, _chunked_main_loss(chunk_size), _MAIN_LOSS_NAME)
    return model


def remove_chunked_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`use_chunked_loss`: the model's own loss (and logits) again. Nothing when absent.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> remove_chunked_loss(model) is model
        True
    """
    objective = get_objective(model)
    if objective is not None and objective.main_loss_name == _MAIN_LOSS_NAME:
        set_main_loss(model, None)
    return model
