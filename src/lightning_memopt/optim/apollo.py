"""APOLLO and APOLLO-Mini: AdamW-level training with SGD-like optimizer memory.

The algorithm (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
arXiv 2412.05270), for a weight matrix ``W`` (``m x n``) in a low-rank group, step ``t``:

1. Project the gradient ``G`` with a random Gaussian ``P`` of rank ``r`` (entries of
   variance ``1/r``) that compresses the smaller dimension:
   ``R = G Pᵀ`` (``m x r``, ``P`` is ``r x n``) when ``m >= n``, else ``R = Pᵀ G``
   (``r x n``, ``P`` is ``m x r``). The channels are the rows of ``R`` in the first case and
   its columns in the second. ``P`` is redrawn every ``update_proj_gap`` steps from a
   per-parameter seed and never stored in the state (see :mod:`.projection`).
2. Adam moments on ``R`` with bias correction: ``N = M̂ / (sqrt(V̂) + eps)``.
3. Scaling factor ``s``: ``"channel"``: ``||N_c|| / ||R_c||`` for every channel ``c``;
   ``"tensor"``: ``||N||_F / ||R||_F``. The update direction is ``G * s * sqrt(scale)``.
4. Norm-growth limiter (``norm_growth_limit`` = gamma, default 1.01): if the update norm
   grew by more than gamma since the last step, it is scaled back to gamma times it.
5. Decoupled weight decay, then ``W -= lr * update``.

Parameters outside low-rank groups (embeddings, norms, biases, the LM head) get plain
AdamW inside the same optimizer. The state is tensors only: per low-rank matrix
``exp_avg`` and ``exp_avg_sq`` of ``r x max(m, n)`` elements each, plus the scalars
``step``, ``seed`` and ``prev_update_norm``.

Example:
    >>> import torch
    >>> from lightning_memopt.optim import APOLLO, apollo_param_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    >>> opt = APOLLO(apollo_param_groups(model, target_modules="all-linear"), lr=1e-2, rank=8)
    >>> model(torch.randn(16, 32)).pow(2).mean().backward()
    >>> opt.step()
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw as functional_adamw

from .projection import gaussian_projection

SCALE_TYPES = ("channel", "tensor")
# Guards the ratio ||N|| / ||R|| against an all-zero channel (same constant as the paper's code).
_RATIO_EPS = 1e-8
# Keys of the per-parameter state that live on the CPU whatever the parameter's device:
# host scalars, like torch.optim.Adam's "step", so that the step never syncs with the GPU.
_HOST_STATE_KEYS = ("step", "seed")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class APOLLO(torch.optim.Optimizer):
    """APOLLO optimizer (low-rank groups) with AdamW for every other parameter.

    Args:
        params: parameters or param groups. A group with ``low_rank=True`` gets the APOLLO
            update (each tensor must be 2-D); ``low_rank=False`` gets AdamW; a group that does
            not say gets APOLLO for its 2-D tensors and AdamW for the rest. Build groups with
            :func:`~lightning_memopt.optim.apollo_param_groups` to leave embeddings and the LM
            head to AdamW, as the paper does.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW` (decoupled decay).
        rank: projection rank r. A rank above a matrix's smaller dimension is clamped to it
            with a warning.
        scale_type: ``"channel"`` (one scaling factor per channel) or ``"tensor"`` (one per
            matrix).
        scale: the paper's alpha; the update is multiplied by ``sqrt(scale)``.
        update_proj_gap: steps between redraws of the random projection.
        norm_growth_limit: gamma of the norm-growth limiter, or ``None`` to turn it off.
        seed: base seed of the projections; parameter ``i`` (in group order) uses ``seed + i``.
        cache_projection: keep each parameter's current projection (``r x min(m, n)``) on its
            device between redraws (faster); ``False`` regenerates it every step (less memory).
            The cache is never part of the state dict.
        check_finite: before stepping, check that every gradient is finite; if one is not,
            skip the whole step (weights and state unchanged) and warn. This costs one host
            synchronisation per step on a GPU; with ``False`` a NaN/inf gradient propagates
            into the weights, as with :class:`torch.optim.AdamW`.

    Example:
        >>> model = torch.nn.Linear(16, 32)
        >>> opt = APOLLO([{"params": [model.weight], "low_rank": True},
        ...               {"params": [model.bias], "low_rank": False}], lr=1e-3, rank=4)
        >>> model(torch.randn(8, 16)).sum().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg', 'exp_avg_sq', 'prev_update_norm', 'seed', 'step']
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rank: int = 256,
        scale_type: str = "channel",
        scale: float = 1.0,
        update_proj_gap: int = 200,
        norm_growth_limit: float | None = 1.01,
        seed: int = 0,
        cache_projection: bool = True,
        check_finite: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "rank": rank,
            "scale_type": scale_type,
            "scale": scale,
            "update_proj_gap": update_proj_gap,
            "norm_growth_limit": norm_growth_limit,
            "low_rank": None,
        }
        self._validate_group(defaults, "defaults")
        self.seed = int(seed)
        self.cache_projection = cache_projection
        self.check_finite = check_finite
        self._projection_cache: dict[torch.Tensor, tuple[tuple[int, int], torch.Tensor]] = {}
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(_keep_host_state_on_cpu)

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_group(group: dict[str, Any], where: str) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if not _is_finite_number(lr) or lr < 0:
            raise ValueError(f"APOLLO: invalid lr={group['lr']!r} in {where}; use a finite number >= 0.")
        betas = group["betas"]
        if len(betas) != 2 or not all(_is_finite_number(b) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"APOLLO: invalid betas={betas!r} in {where}; use two finite numbers in [0, 1), "
                "e.g. betas=(0.9, 0.999)."
            )
        if not _is_finite_number(group["eps"]) or group["eps"] < 0:
            raise ValueError(f"APOLLO: invalid eps={group['eps']!r} in {where}; use a finite number >= 0.")
        if not _is_finite_number(group["weight_decay"]) or group["weight_decay"] < 0:
            raise ValueError(
                f"APOLLO: invalid weight_decay={group['weight_decay']!r} in {where}; use a finite number >= 0."
            )
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"APOLLO: invalid rank={rank!r} in {where}; use a positive integer such as 256.")
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(
                f"APOLLO: unknown scale_type={group['scale_type']!r} in {where}; "
                f"choose one of {', '.join(repr(s) for s in SCALE_TYPES)}."
            )
        if not _is_finite_number(group["scale"]) or group["scale"] <= 0:
            raise ValueError(f"APOLLO: invalid scale={group['scale']!r} in {where}; use a finite number > 0.")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
            raise ValueError(f"APOLLO: invalid update_proj_gap={gap!r} in {where}; use a positive integer such as 200.")
        limit = group["norm_growth_limit"]
        if limit is not None and (not _is_finite_number(limit) or limit < 1.0):
            raise ValueError(
                f"APOLLO: invalid norm_growth_limit={limit!r} in {where}; use a number >= 1 (e.g. 1.01) "
                "or None to turn the limiter off."
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        self._validate_group(group, where)
        if group["low_rank"]:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"APOLLO: {where} has low_rank=True but holds a tensor of shape {tuple(p.shape)}; "
                        "low-rank groups take 2-D weight matrices only. Put it in a group with "
                        "low_rank=False (apollo_param_groups(model) does this for you)."
                    )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def is_low_rank(group: dict[str, Any], param: torch.Tensor) -> bool:
        """Whether ``param`` of ``group`` gets the APOLLO update (else AdamW)."""
        if group["low_rank"] is None:
            return param.dim() == 2
        return bool(group["low_rank"])

    def _param_seed(self, param: torch.Tensor) -> int:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p is param:
                    return self.seed + index
                index += 1
        raise KeyError("parameter is not managed by this optimizer")

    @staticmethod
    def effective_rank(group: dict[str, Any], shape: torch.Size | tuple[int, ...]) -> int:
        """The rank used for a matrix of ``shape``: ``min(rank, min(shape))``."""
        return min(group["rank"], min(shape))

    def _projection(self, param: torch.Tensor, state: dict[str, torch.Tensor], window: int, rank: int) -> torch.Tensor:
        m, n = param.shape
        seed = int(state["seed"])
        key = (seed, window)
        if self.cache_projection:
            cached = self._projection_cache.get(param)
            if cached is not None and cached[0] == key:
                return cached[1]
        local = _local(param)
        # m >= n: P is r x n and R = G Pᵀ;  m < n: P is m x r and R = Pᵀ G.
        rows, cols = (rank, n) if m >= n else (m, rank)
        proj = gaussian_projection(seed, window, rows, cols, rank=rank, device=local.device, dtype=local.dtype)
        if self.cache_projection:
            self._projection_cache[param] = (key, proj)
        return proj

    def _init_low_rank_state(self, group: dict[str, Any], param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[param]
        m, n = param.shape
        rank = self.effective_rank(group, param.shape)
        if rank < group["rank"]:
            warnings.warn(
                f"APOLLO: rank={group['rank']} is larger than the smaller dimension of a {m}x{n} matrix; "
                f"using rank {rank} for it.",
                stacklevel=3,
            )
        moment_shape = (m, rank) if m >= n else (rank, n)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["seed"] = torch.tensor(self._param_seed(param), dtype=torch.int64)
        state["exp_avg"] = torch.zeros(moment_shape, dtype=param.dtype, device=_local(param).device)
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        # +inf: the first step has no previous norm, so the limiter lets it through.
        state["prev_update_norm"] = torch.full((), math.inf, dtype=torch.float32, device=state["exp_avg"].device)
        return state

    def _init_adamw_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[param]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _grads_are_finite(self) -> bool:
        grads = [_local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        # Max-abs norms cannot overflow, and NaN propagates through them.
        norms = torch._foreach_norm(grads, ord=math.inf)
        flags = [torch.isfinite(n).all().to("cpu", non_blocking=False) for n in norms]
        return bool(torch.stack(flags).all())

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss, as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.check_finite and not self._grads_are_finite():
            warnings.warn(
                "APOLLO: skipped a step because a gradient holds NaN or inf; weights and optimizer "
                "state are unchanged. Lower the learning rate or enable gradient clipping.",
                RuntimeWarning,
                stacklevel=2,
            )
            return loss
        for group in self.param_groups:
            low_rank, adamw = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("APOLLO does not support sparse gradients.")
                (low_rank if self.is_low_rank(group, p) else adamw).append(p)
            if adamw:
                self._adamw_step(group, adamw)
            if low_rank:
                self._apollo_step(group, low_rank)
        return loss

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        states = [self.state[p] or self._init_adamw_state(p) for p in params]
        beta1, beta2 = group["betas"]
        on_cpu = all(_local(p).device.type == "cpu" for p in params)
        functional_adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            # torch's fused CPU kernel is the fastest AdamW here; elsewhere the host-side
            # step counters call for the foreach path.
            foreach=not on_cpu,
            fused=on_cpu,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _apollo_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        gap, limit = group["update_proj_gap"], group["norm_growth_limit"]
        channel = group["scale_type"] == "channel"

        grads, projected, exp_avgs, exp_avg_sqs, states = [], [], [], [], []
        bias_c1, sqrt_bias_c2 = [], []
        for p in params:
            state = self.state[p] if self.state[p] else self._init_low_rank_state(group, p)
            if "prev_update_norm" not in state and limit is not None:
                state["prev_update_norm"] = torch.full((), math.inf, device=state["exp_avg"].device)
            state["step"] += 1
            step = int(state["step"])
            rank = state["exp_avg"].shape[1] if p.shape[0] >= p.shape[1] else state["exp_avg"].shape[0]
            proj = self._projection(p, state, (step - 1) // gap, rank)
            grad = _local(p.grad)
            projected.append(grad @ proj.T if p.shape[0] >= p.shape[1] else proj.T @ grad)
            grads.append(grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            states.append(state)
            bias_c1.append(1.0 - beta1**step)
            sqrt_bias_c2.append(math.sqrt(1.0 - beta2**step))

        # Adam on the projected gradients, batched across parameters.
        torch._foreach_lerp_(exp_avgs, projected, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, projected, projected, 1.0 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, sqrt_bias_c2)
        torch._foreach_add_(denoms, eps)
        normalized = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_div_(normalized, bias_c1)
        del denoms

        if weight_decay != 0.0:
            torch._foreach_mul_([_local(p) for p in params], 1.0 - lr * weight_decay)
        step_scale = -lr * math.sqrt(group["scale"])
        for p, grad, r, n_, state in zip(params, grads, projected, normalized, states):
            # Channels are the rows of R when m >= n and its columns otherwise.
            channel_dim = 1 if p.shape[0] >= p.shape[1] else 0
            if channel:
                factor = torch.linalg.vector_norm(n_, dim=channel_dim) / (
                    torch.linalg.vector_norm(r, dim=channel_dim) + _RATIO_EPS
                )
                factor = factor.unsqueeze(channel_dim)
            else:
                factor = torch.linalg.vector_norm(n_) / (torch.linalg.vector_norm(r) + _RATIO_EPS)
            if limit is not None:
                factor = self._limit_norm_growth(grad, factor, channel, channel_dim, state, limit)
            _local(p).addcmul_(grad, factor.to(grad.dtype), value=step_scale)

    @staticmethod
    def _limit_norm_growth(
        grad: torch.Tensor,
        factor: torch.Tensor,
        channel: bool,
        channel_dim: int,
        state: dict[str, torch.Tensor],
        limit: float,
    ) -> torch.Tensor:
        """Scale ``factor`` so that ``||grad * factor||`` grows at most ``limit``-fold per step.

        Computed without materialising ``grad * factor`` and without a host sync.
        """
        if channel:
            grad_norms = torch.linalg.vector_norm(grad, dim=channel_dim, keepdim=True)
            update_norm = torch.linalg.vector_norm(factor * grad_norms)
        else:
            update_norm = factor * torch.linalg.vector_norm(grad)
        update_norm = update_norm.float()
        prev = state["prev_update_norm"]
        limiter = torch.clamp(update_norm / (prev + _RATIO_EPS), min=limit) / limit
        prev.copy_(update_norm / limiter)
        return factor / limiter.to(factor.dtype)

    # ------------------------------------------------------------------ memory
    def projection_cache_bytes(self) -> int:
        """Bytes held by the cached projection matrices (not part of the state dict)."""
        return sum(proj.numel() * proj.element_size() for _, proj in self._projection_cache.values())


class APOLLOMini(APOLLO):
    """APOLLO-Mini: rank 1, one tensor-wise scaling factor, scale 128 (near-SGD memory).

    Identical to ``APOLLO(params, rank=1, scale_type="tensor", scale=128)``; every argument
    of :class:`APOLLO` can still be set.

    Example:
        >>> model = torch.nn.Linear(16, 32)
        >>> opt = APOLLOMini([{"params": [model.weight], "low_rank": True}], lr=1e-3)
        >>> (opt.defaults["rank"], opt.defaults["scale_type"], opt.defaults["scale"])
        (1, 'tensor', 128.0)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        rank: int = 1,
        scale_type: str = "tensor",
        scale: float = 128.0,
        update_proj_gap: int = 200,
        norm_growth_limit: float | None = 1.01,
        seed: int = 0,
        cache_projection: bool = True,
        check_finite: bool = True,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rank=rank,
            scale_type=scale_type,
            scale=scale,
            update_proj_gap=update_proj_gap,
            norm_growth_limit=norm_growth_limit,
            seed=seed,
            cache_projection=cache_projection,
            check_finite=check_finite,
        )


def _keep_host_state_on_cpu(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: step counters and seeds back to the CPU (host scalars)."""
    for state in optimizer.state.values():
        for key in _HOST_STATE_KEYS:
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                state[key] = value.to("cpu")
    if isinstance(optimizer, APOLLO):
        optimizer._projection_cache.clear()
