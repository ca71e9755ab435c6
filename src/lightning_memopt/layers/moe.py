"""Mixture-of-experts layers: top-k routing, sparse upcycling and modality-aware expert groups.

- :class:`MoELayer` (Mixtral-style): a router scores ``num_experts`` expert MLPs per token, each
  token is sent to its ``top_k`` best experts only (the (token, expert) pairs are sorted by
  expert, gathered with one ``index_select``, run through the experts back to back on contiguous
  slices, and summed back with one ``index_add_``: no expert ever computes a token it was not
  chosen for), and the experts' outputs are summed with the renormalised top-k router
  probabilities. Forward + backward is within about 1.2x (512 tokens) and 1.05x (2048 tokens) of
  the dense MLP with equal active parameters on a CPU thread (``benchmarks/moe.py``).
- Sparse upcycling (Komatsuzaki et al., arXiv 2212.05055) lives in
  :mod:`~lightning_memopt.layers.upcycling`: :func:`~lightning_memopt.layers.upcycle_to_moe`
  turns the MLP of chosen blocks of a Hugging Face model into an :class:`MoELayer` whose experts
  are copies of it (the upcycled model computes what the dense one did, at initialisation).
- Modality-aware expert groups (MoMa, arXiv 2407.21770): ``modality_groups=[4, 4]`` splits 8
  experts into two groups; a token of modality ``m`` is routed only within group ``m``. The
  ids are given per token or per sequence through :func:`moe_modality` (a context manager on
  the whole model), since a Hugging Face model's ``forward`` has no argument for them.

Losses after each forward (see :func:`moe_aux_loss`): ``layer.aux_loss`` is the Switch/Mixtral
load-balancing loss ``E * sum_i f_i * P_i`` (1.0 when perfectly balanced) and ``layer.z_loss``
the router z-loss of ST-MoE (arXiv 2202.08906). ``layer.tokens_per_expert`` counts the routed
tokens, for logging the experts' load. :func:`add_moe_loss` (which ``upcycle_to_moe`` calls)
adds their weighted sum to the model's own training loss, as transformers' Mixtral adds its
router loss: ``model(input_ids=ids, labels=ids).loss`` is then the objective in training mode.

Example:
    >>> import torch
    >>> from lightning_memopt.layers import MoELayer, moe_aux_loss
    >>> layer = MoELayer(hidden_size=16, num_experts=4, top_k=2, intermediate_size=32)
    >>> layer(torch.randn(2, 5, 16)).shape
    torch.Size([2, 5, 16])
    >>> layer.tokens_per_expert.sum().item()  # 10 tokens x 2 experts each
    20
    >>> bool(moe_aux_loss(layer) >= 1.0)  # the balance loss is at least 1 (1 = perfectly balanced)
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .objective import LossTerm, ObjectiveStep, add_loss_term, remove_loss_term

# The name of the MoE losses' term in the model's training objective (layers/objective.py).
LOSS_TERM = "moe_losses"

__all__ = [
    "GatedMLP",
    "MoELayer",
    "MoELoss",
    "MoERouter",
    "active_parameters",
    "add_moe_loss",
    "check_moe_routing",
    "moe_aux_loss",
    "moe_expert_loads",
    "moe_layers",
    "moe_modality",
    "moe_z_loss",
    "remove_moe_loss",
    "set_moe_modality",
]


class GatedMLP(nn.Module):
    """The LLaMA/Mixtral expert: ``down(silu(gate(x)) * up(x))``, no biases.

    Example:
        >>> GatedMLP(8, 16)(torch.randn(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoERouter(nn.Module):
    """The router: one logit per expert, ``x @ weight.T``.

    Deliberately not an ``nn.Linear``: :func:`~lightning_memopt.optim.apollo_param_groups`
    gives low-rank updates to the blocks' ``nn.Linear`` layers (the experts), and the router (a
    tiny ``num_experts x hidden`` matrix to which routing is very sensitive) stays with the
    full-rank AdamW update by default.

    Example:
        >>> MoERouter(8, 4)(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(self, hidden_size: int, num_experts: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal initialisation with ``init_std`` (also what a meta-device model gets when a
        sharding strategy materialises it).

        Example:
            >>> MoERouter(8, 4, init_std=0.0).weight.abs().sum().item()
            0.0
        """
        nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def check_moe_routing(num_experts: int, top_k: int, modality_groups: Sequence[int] | None = None) -> None:
    """Raise a ``ValueError`` (naming the bad value and the fix) unless ``num_experts``, ``top_k``
    and ``modality_groups`` make a valid routing: what :class:`MoELayer` and
    :func:`~lightning_memopt.layers.upcycle_to_moe` check, for adapters that want to fail early.

    Example:
        >>> check_moe_routing(8, 2, [4, 4])
        >>> check_moe_routing(4, 5)
        Traceback (most recent call last):
        ...
        ValueError: top_k=5 with num_experts=4: ...
    """
    if num_experts < 2:
        raise ValueError(f"num_experts={num_experts}: a mixture needs at least 2 experts (8 is the Mixtral choice).")
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k={top_k} with num_experts={num_experts}: each token picks top_k of the experts, so use "
            f"1 <= top_k <= {num_experts} (2 is the Mixtral choice)."
        )
    if modality_groups is None:
        return
    groups = list(modality_groups)
    if not groups or any(int(g) != g or g < 1 for g in groups):
        raise ValueError(f"modality_groups={groups!r}: give one positive expert count per modality, e.g. [4, 4].")
    if sum(groups) != num_experts:
        raise ValueError(
            f"modality_groups={groups!r} sum to {sum(groups)} experts but num_experts={num_experts}: the groups "
            f"partition the experts, so their sizes must add up to {num_experts} (e.g. "
            f"{[num_experts // len(groups)] * len(groups)} if that divides evenly)."
        )
    if min(groups) < top_k:
        raise ValueError(
            f"modality_groups={groups!r} with top_k={top_k}: a token is routed to top_k experts of its own group, "
            f"so every group needs at least {top_k} experts (or lower top_k)."
        )


class MoELayer(nn.Module):
    """A sparse mixture of expert MLPs with a top-k router (Mixtral-style).

    Args:
        hidden_size: the width of the tokens (last dimension of the input).
        num_experts: how many experts.
        top_k: how many experts each token goes to.
        expert: the MLP to copy into every expert (sparse upcycling); any module that maps
            ``(tokens, hidden)`` to ``(tokens, hidden)``. ``None``: a fresh :class:`GatedMLP`
            of ``intermediate_size`` per expert.
        intermediate_size: the hidden width of the fresh experts (without ``expert``).
        capacity_factor: ``None`` (the default, as Mixtral): every expert takes every token
            sent to it. A number: each expert takes at most
            ``ceil(capacity_factor * tokens * top_k / num_experts)`` tokens per forward (with
            modality groups: the tokens of its modality and the experts of its group); first
            choices are served before second choices, and earlier tokens before later ones.
            An overflowing (token, expert) pair is dropped: it contributes nothing, the other
            expert weights of that token are *not* renormalised, and a token that loses all
            its experts gets a zero MLP output (the block's residual connection carries it
            through unchanged). ``dropped_tokens`` counts the dropped pairs.
        modality_groups: expert counts per modality (MoMa), e.g. ``[4, 4]``: experts 0-3 serve
            modality 0, experts 4-7 modality 1. The ids come from :func:`moe_modality`.
        router_init_std: the standard deviation of the router's normal initialisation.
        normalize_top_k: renormalise the top-k probabilities to sum to 1 (Mixtral). With
            ``top_k=1`` this makes the weight always 1, so the router then learns only from
            the auxiliary losses; Switch (``top_k=1``) uses ``False``.

    After each forward: ``aux_loss`` (load balance, ``num_experts * sum_i f_i * P_i``, where
    ``f_i`` is the fraction of the ``tokens * top_k`` routing choices that picked expert ``i``
    and ``P_i`` the mean router probability of expert ``i``; 1.0 when balanced. This is the
    Switch loss for ``top_k=1``; transformers' Mixtral loss is ``top_k`` times it. With
    modality groups it is computed within each group, then averaged weighted by the group's
    share of tokens), ``z_loss`` (mean squared log-sum-exp of the router logits),
    ``tokens_per_expert`` (routed choices per expert, before any capacity drop) and
    ``dropped_tokens``.

    Example:
        >>> layer = MoELayer(8, num_experts=4, top_k=2, intermediate_size=16, modality_groups=[2, 2])
        >>> with moe_modality(layer, torch.tensor([0, 0, 1])):  # one id per token here
        ...     out = layer(torch.randn(3, 8))
        >>> layer.tokens_per_expert.tolist()  # 2 prose tokens on experts 0-1, 1 code token on 2-3
        [2, 2, 1, 1]
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int = 8,
        top_k: int = 2,
        expert: nn.Module | None = None,
        intermediate_size: int | None = None,
        capacity_factor: float | None = None,
        modality_groups: Sequence[int] | None = None,
        router_init_std: float = 0.02,
        normalize_top_k: bool = True,
    ) -> None:
        super().__init__()
        check_moe_routing(num_experts, top_k, modality_groups)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor!r}: use a number > 0 (e.g. 1.25) or None (no limit).")
        if expert is None and intermediate_size is None:
            raise ValueError("MoELayer: pass expert=<an MLP module to copy> or intermediate_size=<int> for GatedMLPs.")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.normalize_top_k = normalize_top_k
        self.modality_groups = list(modality_groups) if modality_groups is not None else None
        self.router = MoERouter(hidden_size, num_experts, router_init_std)
        if expert is not None:
            self.experts = nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))
        else:
            self.experts = nn.ModuleList(GatedMLP(hidden_size, intermediate_size) for _ in range(num_experts))
        groups = self.modality_groups or [num_experts]
        # Which group each expert belongs to (a plain tensor, not state: it follows from the config).
        # Built on the CPU even under `with torch.device("meta")` (a meta model for the memory
        # estimate); forward moves it to the input's device.
        cpu = torch.device("cpu")
        self._expert_group = torch.repeat_interleave(
            torch.arange(len(groups), device=cpu), torch.tensor(groups, device=cpu)
        )
        self.modality_ids: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.dropped_tokens: torch.Tensor | None = None

    @property
    def expert_parameters(self) -> int:
        """Parameters of one expert (all experts have the same shapes).

        Example:
            >>> MoELayer(4, 2, 1, intermediate_size=8).expert_parameters  # 3 matrices of 4 x 8
            96
        """
        return sum(p.numel() for p in self.experts[0].parameters())

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"modality_groups={self.modality_groups}"
        )

    def _token_modalities(self, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        if self.modality_groups is None:
            return None
        ids = self.modality_ids
        if ids is None:
            raise ValueError(
                f"this MoELayer routes by modality (modality_groups={self.modality_groups}) but no modality ids are "
                "set: run the model inside `with moe_modality(model, modality_ids):` (ids per token, shape "
                "(batch, seq), or per sequence, shape (batch,)); in Lightning the batch's 'modality_ids' is used."
            )
        ids = ids.to(device)
        lead = shape[:-1]
        if ids.dim() == 1 and len(lead) == 2 and ids.shape[0] == lead[0] and ids.numel() != math.prod(lead):
            ids = ids[:, None].expand(lead)  # one id per sequence
        elif ids.dim() == 1 and len(lead) == 2 and ids.shape[0] == lead[0] and lead[1] == 1:
            ids = ids[:, None]
        if ids.numel() != math.prod(lead):
            raise ValueError(
                f"modality_ids of shape {tuple(ids.shape)} do not fit the tokens of shape {tuple(lead)}: give one id "
                "per token (batch, seq) or one per sequence (batch,)."
            )
        ids = ids.reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self.modality_groups)):
            raise ValueError(
                f"modality_ids hold values in [{int(ids.min())}, {int(ids.max())}] but modality_groups="
                f"{self.modality_groups} defines modalities 0..{len(self.modality_groups) - 1}."
            )
        return ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        tokens, k, num_experts = x.shape[0], self.top_k, self.num_experts
        logits = self.router(x).float()
        modality = self._token_modalities(shape, x.device)
        if self._expert_group.device != x.device:
            self._expert_group = self._expert_group.to(x.device)
        expert_group = self._expert_group
        if modality is not None:
            allowed = expert_group[None, :] == modality[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        # Choice-major pairs (all first choices, then all second ...): pair ``p`` is token
        # ``p % tokens``, so a stable sort by expert serves first choices before second choices
        # (and earlier tokens before later ones) when capacity is limited.
        flat_expert = chosen.t().reshape(-1)
        counts = torch.bincount(flat_expert, minlength=num_experts)
        order = torch.argsort(flat_expert, stable=True)

        self.tokens_per_expert = counts.detach()
        self._aux_losses(logits, probs, counts, chosen, modality, expert_group, tokens)

        kept = counts
        if self.capacity_factor is not None:
            if modality is None:
                capacity = torch.full_like(counts, math.ceil(self.capacity_factor * tokens * k / num_experts))
            else:  # an even share within the expert's own group
                group_tokens = torch.bincount(modality, minlength=len(self.modality_groups))[expert_group]
                group_sizes = torch.tensor(self.modality_groups, device=x.device)[expert_group]
                capacity = torch.ceil(self.capacity_factor * group_tokens * k / group_sizes).long()
            kept = torch.minimum(counts, capacity)
            # A pair survives when its rank within its expert's run of the sorted order is below
            # the expert's capacity: index arithmetic, no per-expert loop.
            starts = torch.cumsum(counts, 0) - counts
            sorted_expert = flat_expert[order]
            rank = torch.arange(order.numel(), device=x.device) - starts[sorted_expert]
            order = order[rank < kept[sorted_expert]]
        self.dropped_tokens = (counts - kept).sum().detach()
        return self._experts_forward(x, order % tokens, weights.t().reshape(-1)[order], kept).reshape(shape)

    def _experts_forward(
        self, x: torch.Tensor, token: torch.Tensor, weight: torch.Tensor, per_expert: torch.Tensor
    ) -> torch.Tensor:
        """Run the (token, expert) pairs, sorted by expert, through their experts and sum them back.

        One gather (``index_select``) and one scatter (``index_add_``) for all experts: with one
        gather and one scatter per expert instead, the backward pass zero-fills and adds a full
        ``tokens x hidden`` gradient per expert, which cost as much as the experts' own small
        matmuls at 512 tokens. The experts run back to back on contiguous slices of the
        gathered rows; this is what ``torch._grouped_mm`` does on the CPU too (one GEMM per
        group), measured no faster there (``benchmarks/moe.py``), and it keeps each expert an
        ordinary module: per-expert ``nn.Linear`` matrices for APOLLO and INT8 weights, and any
        MLP for sparse upcycling.
        """
        # The one host read of the forward: the slice sizes (free on the CPU, one sync on a GPU).
        sizes = per_expert.tolist()
        rows = x.index_select(0, token).split(sizes)
        # With gradients on, an expert without tokens still runs (on an empty batch): every
        # parameter then gets a gradient, zero or not, as DDP and FSDP expect on every rank.
        track = torch.is_grad_enabled()
        outputs = [expert(part) for expert, part, n in zip(self.experts, rows, sizes, strict=True) if n or track]
        y = torch.cat(outputs) if outputs else x.new_zeros(0, x.shape[-1])
        y = y * weight[:, None].to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def _aux_losses(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        counts: torch.Tensor,
        chosen: torch.Tensor,
        modality: torch.Tensor | None,
        expert_group: torch.Tensor,
        tokens: int,
    ) -> None:
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean() if tokens else logits.sum()
        if modality is None:
            f = counts.float() / max(tokens * self.top_k, 1)
            self.aux_loss = self.num_experts * (f * probs.mean(dim=0)).sum() if tokens else probs.sum()
            return
        loss = probs.new_zeros(())
        for g, size in enumerate(self.modality_groups):
            members = modality == g
            n = int(members.sum())
            if n == 0:
                continue
            in_group = expert_group == g
            g_counts = torch.bincount(chosen[members].reshape(-1), minlength=self.num_experts)[in_group]
            f = g_counts.float() / (n * self.top_k)
            p = probs[members][:, in_group].mean(dim=0)
            loss = loss + (n / tokens) * size * (f * p).sum()
        self.aux_loss = loss


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """The :class:`MoELayer` modules of ``model`` with their qualified names.

    Example:
        >>> moe_layers(nn.Sequential(nn.Linear(4, 4), MoELayer(4, 2, 1, intermediate_size=8)))[0][0]
        '1'
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def _mean_loss(model: nn.Module, attribute: str) -> torch.Tensor:
    values = [getattr(m, attribute) for _, m in moe_layers(model) if getattr(m, attribute) is not None]
    if not values:
        raise ValueError(
            f"moe {attribute}: {type(model).__name__} has no MoE layer that ran a forward yet "
            "(upcycle it with upcycle_to_moe, then run the model)."
        )
    return torch.stack(values).mean()


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The load-balancing loss of the last forward, averaged over the model's MoE layers (so its
    weight does not depend on how many layers are MoE). 1.0 when every layer is balanced.

    Add ``weight * moe_aux_loss(model)`` to the training loss (Switch/Mixtral use 0.01-0.02).

    Raises:
        ValueError: when the model has no MoE layer, or none has run a forward.

    Example:
        >>> layer = MoELayer(4, num_experts=2, top_k=1, intermediate_size=8)
        >>> _ = layer(torch.randn(6, 4))
        >>> moe_aux_loss(layer).shape
        torch.Size([])
    """
    return _mean_loss(model, "aux_loss")


def moe_z_loss(model: nn.Module) -> torch.Tensor:
    """The router z-loss of the last forward (ST-MoE: mean squared log-sum-exp of the router
    logits; it keeps the logits small), averaged over the MoE layers. ST-MoE weights it 0.001.

    Example:
        >>> layer = MoELayer(4, num_experts=2, top_k=1, intermediate_size=8)
        >>> _ = layer(torch.randn(6, 4))
        >>> bool(moe_z_loss(layer) > 0)
        True
    """
    return _mean_loss(model, "z_loss")


def moe_expert_loads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per MoE layer, the share of the last forward's routing choices each expert received
    (sums to 1; ``1 / num_experts`` each when balanced).

    Example:
        >>> layer = MoELayer(4, num_experts=2, top_k=2, intermediate_size=8)
        >>> _ = layer(torch.randn(3, 4))
        >>> moe_expert_loads(nn.Sequential(layer))["0"].tolist()  # top_k = num_experts: every expert
        [0.5, 0.5]
    """
    loads = {}
    for name, layer in moe_layers(model):
        if layer.tokens_per_expert is not None:
            counts = layer.tokens_per_expert.float()
            loads[name] = counts / counts.sum().clamp(min=1)
    return loads


def active_parameters(model: nn.Module) -> tuple[int, int]:
    """``(total, active per token)`` parameter counts: a token runs through ``top_k`` of each
    MoE layer's experts only.

    Example:
        >>> layer = MoELayer(4, num_experts=4, top_k=1, intermediate_size=8)  # router 16 + 4 x 96
        >>> active_parameters(layer)
        (400, 112)
    """
    total = sum(p.numel() for p in model.parameters())
    idle = sum((m.num_experts - m.top_k) * m.expert_parameters for _, m in moe_layers(model))
    return total, total - idle


def set_moe_modality(model: nn.Module, modality_ids: torch.Tensor | None) -> None:
    """Set (or clear, with ``None``) the modality ids that every MoE layer of ``model`` routes by:
    one id per token, shape ``(batch, seq)``, or per sequence, shape ``(batch,)``. Layers
    without ``modality_groups`` ignore them. Prefer :func:`moe_modality`, which clears them.

    Example:
        >>> layer = MoELayer(4, num_experts=2, top_k=1, intermediate_size=8, modality_groups=[1, 1])
        >>> set_moe_modality(layer, torch.tensor([1, 1]))
        >>> _ = layer(torch.randn(2, 4)); layer.tokens_per_expert.tolist()
        [0, 2]
        >>> set_moe_modality(layer, None)
    """
    for _, layer in moe_layers(model):
        layer.modality_ids = modality_ids


@contextmanager
def moe_modality(model: nn.Module, modality_ids: torch.Tensor) -> Iterator[None]:
    """Route every forward inside the block by ``modality_ids`` (e.g. 0 = prose, 1 = code).

    This is how modality ids reach the MoE layers through a Hugging Face model's ``forward``,
    which has no argument for them. With activation checkpointing the forward is recomputed
    during backward: keep ``loss.backward()`` inside the block then.

    Example:
        >>> layer = MoELayer(4, num_experts=4, top_k=1, intermediate_size=8, modality_groups=[2, 2])
        >>> with moe_modality(layer, torch.tensor([[0, 0, 0], [1, 1, 1]])):  # (batch, seq)
        ...     _ = layer(torch.randn(2, 3, 4))
        >>> int(layer.tokens_per_expert[:2].sum()), int(layer.tokens_per_expert[2:].sum())
        (3, 3)
    """
    previous = [(layer, layer.modality_ids) for _, layer in moe_layers(model)]
    set_moe_modality(model, modality_ids)
    try:
        yield
    finally:
        for layer, ids in previous:
            layer.modality_ids = ids


class MoELoss(LossTerm):
    """The MoE term of the model's training objective (what :func:`add_moe_loss` registers):
    after a training forward with ``labels``, ``.loss += aux_loss_weight * moe_aux_loss(model) +
    z_loss_weight * moe_z_loss(model)``, and both losses are recorded (unweighted) as the parts
    ``moe_aux_loss`` and ``moe_z_loss``.

    Example:
        >>> term = MoELoss(aux_loss_weight=0.01, z_loss_weight=0.001)
        >>> term.aux_loss_weight, term.z_loss_weight
        (0.01, 0.001)
    """

    def __init__(self, aux_loss_weight: float = 0.01, z_loss_weight: float = 0.001) -> None:
        for name, value in (("aux_loss_weight", aux_loss_weight), ("z_loss_weight", z_loss_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < math.inf):
                raise ValueError(f"{name}={value!r}: use a finite number >= 0 (0 turns that loss off).")
        self.aux_loss_weight = float(aux_loss_weight)
        self.z_loss_weight = float(z_loss_weight)

    def __call__(self, step: ObjectiveStep) -> None:
        aux, z = moe_aux_loss(step.model), moe_z_loss(step.model)
        step.parts["moe_aux_loss"] = aux.detach()
        step.parts["moe_z_loss"] = z.detach()
        if self.aux_loss_weight:
            step.loss = step.loss + self.aux_loss_weight * aux.to(step.loss.device)
        if self.z_loss_weight:
            step.loss = step.loss + self.z_loss_weight * z.to(step.loss.device)


def add_moe_loss(model: nn.Module, aux_loss_weight: float = 0.01, z_loss_weight: float = 0.001) -> MoELoss:
    """Make ``model``'s own training loss include its MoE layers' weighted auxiliary losses
    (replacing the weights of an earlier call). :func:`~lightning_memopt.layers.upcycle_to_moe`
    calls it; call it yourself for a model built with :class:`MoELayer` s, or one loaded
    already upcycled.

    Then, in training mode with ``labels``, ``model(...).loss`` is the model's loss plus
    ``aux_loss_weight * moe_aux_loss + z_loss_weight * moe_z_loss`` (Switch/Mixtral weigh the
    balance loss 0.01-0.02, ST-MoE the z-loss 0.001), so the stock ``transformers.Trainer``
    trains with them; eval-mode ``.loss`` is the model's own. :func:`remove_moe_loss` undoes it.

    Example:
        >>> from lightning_memopt.layers import last_loss_parts, upcycle_to_moe
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257, num_hidden_layers=2)
        >>> _ = upcycle_to_moe(model, num_experts=4, top_k=2, aux_loss_weight=0.0, z_loss_weight=0.0)
        >>> ids = torch.randint(0, 257, (1, 8))
        >>> plain = model(input_ids=ids, labels=ids).loss
        >>> _ = add_moe_loss(model, aux_loss_weight=0.5, z_loss_weight=0.0)
        >>> loss = model(input_ids=ids, labels=ids).loss
        >>> torch.allclose(loss, plain + 0.5 * moe_aux_loss(model)), sorted(last_loss_parts(model))
        (True, ['moe_aux_loss', 'moe_z_loss'])
    """
    term = MoELoss(aux_loss_weight, z_loss_weight)
    add_loss_term(model, LOSS_TERM, term)
    return term


def remove_moe_loss(model: nn.Module) -> None:
    """Undo :func:`add_moe_loss`: the model's own loss again (the MoE layers stay).

    Example:
        >>> model = nn.Sequential(MoELayer(4, num_experts=2, top_k=1, intermediate_size=8))
        >>> _ = add_moe_loss(model); remove_moe_loss(model)
    """
    remove_loss_term(model, LOSS_TERM)


def __getattr__(name: str) -> Any:
    # Upcycling moved to upcycling.py; the old import path keeps working.
    if name in ("upcycle_to_moe", "BertFeedForward", "BertResidualNorm"):
        from . import upcycling

        return getattr(upcycling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
