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

Each step is a function of :mod:`.apollo_math` (pure, one per step of the paper's Algorithm
1), shared with the FSDP2 step (:mod:`.sharding`); the CPU tuning is in :mod:`.kernels`. This
module holds the optimizer: state, groups, checks, loading, and the plan of a step.

Parameters outside low-rank groups (embeddings, norms, biases, the LM head) get plain
AdamW inside the same optimizer. The state is tensors only: per low-rank matrix
``exp_avg`` and ``exp_avg_sq`` of ``r x max(m, n)`` elements each, plus the scalars
``step``, ``seed`` and ``prev_update_norm``.

Example:
    >>> import torch
    >>> from lightning_memopt.optim import APOLLO, apollo_param_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    >>> opt = APOLLO(apollo_param_groups(model, target_modules="all-linear"), lr=1e-2, rank=4)
    >>> model(torch.randn(16, 32)).pow(2).mean().backward()
    >>> opt.step()
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.adamw import adamw as functional_adamw

from . import apollo_math
from .apollo_math import SCALE_TYPES, ApolloHyperparameters, low_rank_shape  # noqa: F401 (SCALE_TYPES: public here)
from .kernels import BLOCK_8BIT, all_finite, blockwise_chunks, project_into
from .sharding import all_ranks_finite, apollo_step_sharded, is_dtensor, zeros_like_layout
from .sharding import local_view as _local
from .workspace import Workspace


@dataclass
class _Prepared:
    """What a step computes for a group's unsharded low-rank matrices before it changes any state
    (see :meth:`APOLLO._prepare_low_rank`)."""

    # The limiter's norms of each G (None: the limiter is off, or they are taken in the step).
    grad_norms: list[torch.Tensor] | None = None
    # Each matrix's projected gradient R, taken early (None: projected chunk by chunk in the step).
    projected: list[torch.Tensor] | None = None


@dataclass
class _GroupPlan:
    """One param group's work in a step: its matrices with the APOLLO update, its AdamW
    parameters, and what was computed for the matrices before the finite check."""

    group: dict[str, Any]
    low_rank: list[torch.Tensor]
    adamw: list[torch.Tensor]
    prepared: _Prepared = field(default_factory=_Prepared)


# Keys of the per-parameter state that live on the CPU whatever the parameter's device:
# host scalars, like torch.optim.Adam's "step", so that the step never syncs with the GPU.
_HOST_STATE_KEYS = ("step", "seed")
# Keys whose saved dtype survives load_state_dict (see APOLLO.load_state_dict).
# (torch casts every state tensor but "step" to a floating parameter's dtype, even 8-bit moments.)
_EXACT_STATE_KEYS = ("step", "seed", "prev_update_norm", "state1", "state2", "absmax1", "absmax2")
# adamw_8bit: tensors smaller than this keep 32-bit moments (bitsandbytes' min_8bit_size); the
# moments are quantised in blocks of kernels.BLOCK_8BIT elements (its blockwise kernel's block).
MIN_8BIT_SIZE = 4096
# The low-rank matrices of a group are stepped in chunks whose projected gradients R hold at
# most this many elements (or one matrix, if larger): R and N of a chunk live in reused
# workspace buffers (see .workspace), so the step's scratch memory is bounded (2 x 8 MiB in
# float32) whatever the model's size. APOLLO-Mini's R (rank 1) fits in one chunk.
_CHUNK_ELEMENTS = 1 << 21
_STATE_LAYOUT_MISMATCH = (
    "APOLLO: this optimizer state holds {saved} AdamW moments, but the optimizer has {now}; resume with "
    "the adamw_8bit setting the state was saved with."
)
# Group keys of torch's optimizers that change what a step computes. APOLLO implements none of
# them, so a truthy value is refused rather than silently ignored (a falsy one asks for nothing).
_REFUSED_GROUP_KEYS = {
    "maximize": "it always minimizes; negate the loss instead",
    "amsgrad": "it keeps no max_exp_avg_sq",
    "capturable": "its step is not CUDA-graph capturable",
    "differentiable": "its step is not differentiable",
    "foreach": "it picks its own kernels",
    "fused": "it picks its own kernels",
}
# The keys of each kind of per-parameter state this optimizer writes.
_LOW_RANK_KEYS = frozenset({"step", "seed", "exp_avg", "exp_avg_sq", "prev_update_norm"})
_ADAMW_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})
_ADAMW_8BIT_KEYS = frozenset({"step", "state1", "state2", "absmax1", "absmax2"})
# Scalar state entries that older checkpoints may hold as plain numbers, and their dtypes.
_SCALAR_STATE_DTYPES = {"step": torch.float32, "seed": torch.int64, "prev_update_norm": torch.float32}
# Warnings of a skipped update (step, step_parameters).
_SKIPPED_STEP = (
    "APOLLO: skipped a step because a gradient holds NaN or inf; weights and optimizer state are unchanged. "
    "Lower the learning rate or enable gradient clipping."
)
_SKIPPED_PARAMETERS = (
    "APOLLO: skipped the update of a parameter whose gradient holds NaN or inf; its weights and optimizer state "
    "are unchanged. Lower the learning rate or enable gradient clipping."
)
# What a refused state dict can do instead.
_LOAD_FIX = (
    "Load a state dict saved by an optimizer built the same way (same parameters in the same order, "
    "same low-rank groups, ranks and adamw_8bit), or skip load_state_dict to start the optimizer state afresh."
)
# Attributes rebuilt on demand, never copied or pickled (see APOLLO.__getstate__).
_TRANSIENT_ATTRIBUTES = ("_workspace", "_projection_cache", "_quantization_maps", "_param_indices")
# What ``projection_dtype`` accepts, by name (YAML and option strings give names).
PROJECTION_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


def resolve_projection_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """``projection_dtype`` as a ``torch.dtype`` (``None``: each parameter's own dtype).

    Raises:
        ValueError: for a name or dtype that is not a floating-point type listed in
            :data:`PROJECTION_DTYPES`.

    Example:
        >>> resolve_projection_dtype("bf16")
        torch.bfloat16
    """
    if value is None or (isinstance(value, torch.dtype) and value in PROJECTION_DTYPES.values()):
        return value
    if isinstance(value, str) and value.strip().lower().removeprefix("torch.") in PROJECTION_DTYPES:
        return PROJECTION_DTYPES[value.strip().lower().removeprefix("torch.")]
    raise ValueError(
        f"APOLLO: invalid projection_dtype={value!r}; use None (the parameter's dtype) or one of "
        f"{', '.join(repr(k) for k in PROJECTION_DTYPES)}."
    )


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _chunks(keys: list[Any], sizes: list[int], budget: int) -> list[list[int]]:
    """Indices ``0..len(sizes)-1`` in consecutive runs of equal ``keys`` whose ``sizes`` add up to
    at most ``budget`` (a larger single size makes a run of its own)."""
    runs: list[list[int]] = []
    total, run_key = budget, None
    for i, (key, size) in enumerate(zip(keys, sizes)):
        if total + size > budget or key != run_key:
            runs.append([])
            total, run_key = 0, key
        runs[-1].append(i)
        total += size
    return runs


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
        adamw_8bit: keep the AdamW moments of the full-rank parameters (embeddings, LM head:
            what a low-rank group leaves out) in 8 bits, with bitsandbytes' blockwise
            quantisation (the kernel of its ``AdamW8bit``): 2 bytes per weight instead of 8.
            Tensors under 4096 elements (norms, biases) keep 32-bit moments, as in
            bitsandbytes. The state stays tensors only (``state1``/``state2`` uint8,
            ``absmax1``/``absmax2`` float32 per block of 256). Needs ``bitsandbytes``; not
            for FSDP2-sharded parameters.
        projection_dtype: the dtype of the projection ``R = G Pᵀ`` (``P`` and a copy of
            ``G`` are cast to it; ``R`` and the moments keep the parameter's dtype). ``None``:
            the parameter's dtype. ``"bfloat16"`` makes the projection, the costliest part of
            a high-rank step, several times faster on GPUs and on CPUs with bf16 matrix units
            (AMX, AVX512-BF16), and halves the projection cache; ``R`` only feeds the norm
            ratios of the scaling factors, where bf16's relative error (about 0.4%) is far
            below the random projection's own distortion (about ``1/sqrt(rank)``). Mixed-
            precision training (bf16 weights and gradients) projects in bf16 anyway.

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
        adamw_8bit: bool = False,
        projection_dtype: str | torch.dtype | None = None,
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
        self.projection_dtype = resolve_projection_dtype(projection_dtype)
        self.adamw_8bit = bool(adamw_8bit)
        if self.adamw_8bit and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("APOLLO: adamw_8bit=True needs bitsandbytes; pip install bitsandbytes, or set it False.")
        # bitsandbytes' quantisation maps (signed for exp_avg, unsigned for exp_avg_sq), per device.
        self._quantization_maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._projection_cache: dict[torch.Tensor, tuple[tuple[int, int], torch.Tensor]] = {}
        # Step temporaries reused between steps on the CPU (not part of the state dict).
        self._workspace = Workspace()
        # Each parameter's index in the whole optimizer (its projection seed), built on demand.
        self._param_indices: dict[torch.Tensor, int] | None = None
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        """Everything but the caches (workspace, projections, quantisation maps), which a copy
        rebuilds on demand: ``copy.deepcopy`` and ``pickle`` keep every option.

        As for any torch optimizer, hooks are not copied.
        """
        state = {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT_ATTRIBUTES}
        for key in list(state):
            if key.startswith("_optimizer_") and key.endswith("_hooks"):
                del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        differentiable = "differentiable" in state.get("defaults", {})
        super().__setstate__(state)
        if not differentiable:  # torch adds it to every copy; a copy keeps the original's defaults
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("projection_dtype", None)
        self.__dict__.setdefault("adamw_8bit", False)
        self.__dict__.setdefault("cache_projection", True)
        self.__dict__.setdefault("check_finite", True)
        self.__dict__.setdefault("seed", 0)
        self._workspace = Workspace()
        self._projection_cache = {}
        self._quantization_maps = {}
        self._param_indices = None

    # ------------------------------------------------------------------ loading
    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a state dict, after checking every parameter's state against the parameter.

        Beyond :meth:`torch.optim.Optimizer.load_state_dict`: each state tensor must fit its
        parameter (a low-rank matrix's moments ``m x r`` or ``r x n`` for the group's rank and the
        matrix's orientation, an AdamW parameter's moments its own shape, in the ``adamw_8bit``
        layout this optimizer uses); otherwise a ``ValueError`` names the parameter, the saved and
        the expected shapes, and nothing is changed. Group keys a state dict lacks (saved before
        they existed) keep this optimizer's values; a plain-number ``step`` (older torch) becomes a
        tensor. A ``torch.optim.AdamW``/``Adam`` state dict loads too: its moments go to the AdamW
        parameters, and the low-rank matrices, whose full-size moments APOLLO cannot use, start
        afresh (with a warning). Step counters, seeds and the limiter's norms keep their saved
        dtype (torch would cast them to a bf16 parameter's dtype).

        Example:
            >>> w = torch.nn.Parameter(torch.randn(8, 4))
            >>> opt = APOLLO([w], lr=1e-2, rank=2)
            >>> w.grad = torch.randn(8, 4); opt.step()
            >>> APOLLO([torch.nn.Parameter(torch.randn(4, 8))], lr=1e-2, rank=2).load_state_dict(opt.state_dict())
            Traceback (most recent call last):
            ...
            ValueError: APOLLO: cannot load this state dict: parameter 0 (shape (4, 8), low-rank, rank 2) ...
        """
        state_dict = state_dict.copy()
        # The user's pre-hooks first (they may adapt the dict), then the checks, on what will load.
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        checked, exact = self._checked_state_dict(state_dict)
        pre_hooks, post_hooks = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}
        try:
            super().load_state_dict(checked)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        # Copies, so that two optimizers loaded from one state dict never share a counter; step
        # counters and seeds on the CPU (host scalars), the limiter's norm beside the moments.
        for param, values in exact.items():
            state = self.state[param]
            for key, value in values.items():
                device = torch.device("cpu") if key in _HOST_STATE_KEYS else _local(param).device
                state[key] = value.detach().to(device=device, copy=True)
        self._projection_cache.clear()
        self._param_indices = None
        for post_hook in post_hooks.values():
            post_hook(self)

    def _checked_state_dict(
        self, state_dict: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[torch.Tensor, dict[str, torch.Tensor]]]:
        """The state dict to hand to torch's loader (a new dict; ``state_dict`` is not changed),
        and the values that must keep their saved dtype, per parameter; ``ValueError`` when it
        does not fit this optimizer."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(
                "APOLLO: load_state_dict takes an optimizer state dict (a dict with 'state' and 'param_groups', as "
                f"optimizer.state_dict() returns), got {type(state_dict).__name__}"
                + (f" with keys {sorted(map(str, state_dict))}" if isinstance(state_dict, dict) else "")
                + "."
            )
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"APOLLO: cannot load this state dict: it has {len(saved_groups)} param groups, the optimizer "
                f"{len(self.param_groups)}. {_LOAD_FIX}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"APOLLO: cannot load this state dict: its param group {i} has {len(saved['params'])} "
                    f"parameters, the optimizer's {len(group['params'])}. {_LOAD_FIX}"
                )
        # A torch Adam/AdamW state dict: its groups have Adam's betas but none of APOLLO's keys.
        foreign = all("low_rank" not in g and "rank" not in g and "betas" in g for g in saved_groups)
        groups, first_index = [], 0
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            # Keys the saved group lacks (saved before they existed, or by AdamW) keep the values this
            # optimizer was built with: its constructor's defaults unless the group set them.
            # (param_names too, as torch keeps the optimizer's names when the saved groups have none.)
            merged = {**{k: v for k, v in group.items() if k != "params"}, **saved}
            if isinstance(merged.get("betas"), list):
                merged["betas"] = tuple(merged["betas"])
            where = f"param group {i} of the state dict"
            self._validate_group(merged, where)
            self._validate_params({**merged, "params": group["params"]}, where, first_index)
            first_index += len(group["params"])
            groups.append(merged)

        state: dict[Any, Any] = {k: v for k, v in saved_state.items()}
        exact: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        dropped = []
        index = 0
        for merged, group in zip(groups, self.param_groups):
            names = merged.get("param_names") or group.get("param_names")
            for j, (saved_id, param) in enumerate(zip(merged["params"], group["params"])):
                label = _param_label(index, names[j] if names else None)
                index += 1
                entry = saved_state.get(saved_id)
                if entry is None:
                    continue
                if not isinstance(entry, dict):
                    raise ValueError(
                        f"APOLLO: cannot load this state dict: the state of {label} is a "
                        f"{type(entry).__name__}, not a dict of tensors. {_LOAD_FIX}"
                    )
                entry = {k: _as_state_tensor(k, v, label) for k, v in entry.items()}
                low_rank = self.is_low_rank(merged, param)
                if foreign and low_rank and set(entry) == _ADAMW_KEYS:
                    # AdamW's moments of a matrix are m x n; APOLLO's are m x r: start it afresh.
                    dropped.append(label)
                    state.pop(saved_id)
                    continue
                if entry:
                    self._check_param_state(merged, param, entry, label, low_rank, foreign)
                if low_rank:
                    # The fused Adam kernel needs contiguous moments (see _adamw_step).
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in entry and not entry[key].is_contiguous():
                            entry[key] = entry[key].contiguous()
                state[saved_id] = entry
                exact[param] = {k: v for k, v in entry.items() if k in _EXACT_STATE_KEYS and _is_plain_tensor(v)}
        if dropped:
            warnings.warn(
                f"APOLLO: this is a torch.optim.Adam/AdamW state dict: its moments of the AdamW parameters were "
                f"loaded, but those of the {len(dropped)} low-rank matrices ({', '.join(dropped[:4])}"
                f"{', ...' if len(dropped) > 4 else ''}) are full-size, which APOLLO cannot use: their APOLLO state "
                "starts afresh.",
                UserWarning,
                stacklevel=3,
            )
        checked = {k: v for k, v in state_dict.items() if k not in ("state", "param_groups")}
        checked["state"], checked["param_groups"] = state, groups
        return checked, exact

    def _check_param_state(
        self,
        group: dict[str, Any],
        param: torch.Tensor,
        entry: dict[str, torch.Tensor],
        label: str,
        low_rank: bool,
        foreign: bool,
    ) -> None:
        """``ValueError`` unless ``entry`` is a state this optimizer could have written for ``param``."""
        shape = tuple(param.shape)
        origin = "torch.optim.Adam/AdamW state dict" if foreign else "state dict"
        if low_rank:
            m, n = shape
            rank = self.effective_rank(group, shape)
            kind = f"shape {shape}, low-rank, rank {rank}"
            wanted, layout = _LOW_RANK_KEYS, {"exp_avg": (m, rank) if m >= n else (rank, n)}
        elif self.uses_8bit_state(param):
            kind = f"shape {shape}, AdamW with 8-bit moments"
            wanted, blocks = _ADAMW_8BIT_KEYS, (math.ceil(param.numel() / BLOCK_8BIT),)
            layout = {"state1": shape, "state2": shape, "absmax1": blocks, "absmax2": blocks}
        else:
            kind = f"shape {shape}, AdamW"
            wanted, layout = _ADAMW_KEYS, {"exp_avg": shape}
        eight_bit_saved = "state1" in entry
        if (
            not low_rank
            and set(entry) in (_ADAMW_KEYS, _ADAMW_8BIT_KEYS)
            and eight_bit_saved != self.uses_8bit_state(param)
        ):
            saved, now = ("8-bit", "adamw_8bit=False") if eight_bit_saved else ("32-bit", "adamw_8bit=True")
            raise ValueError(_STATE_LAYOUT_MISMATCH.format(saved=saved, now=now))
        if set(entry) != wanted:
            hint = ""
            if "max_exp_avg_sq" in entry:
                hint = " (max_exp_avg_sq is amsgrad's, which APOLLO does not implement)"
            elif low_rank and set(entry) == _ADAMW_KEYS:
                hint = " (an AdamW parameter's state: the low-rank groups differ from those it was saved with)"
            elif not low_rank and set(entry) == _LOW_RANK_KEYS:
                hint = " (a low-rank matrix's state: the low-rank groups differ from those it was saved with)"
            raise ValueError(
                f"APOLLO: cannot load this {origin}: {label} ({kind}) needs the state keys {sorted(wanted)}, "
                f"the state dict holds {sorted(entry)}{hint}. {_LOAD_FIX}"
            )
        for key, value in entry.items():
            expected = layout.get("exp_avg" if key == "exp_avg_sq" else key, ())
            if key in ("step", "seed", "prev_update_norm"):
                if value.numel() != 1:
                    raise ValueError(
                        f"APOLLO: cannot load this {origin}: {label} ({kind}) needs a single number as {key!r}, "
                        f"the state dict holds a tensor of shape {tuple(value.shape)}. {_LOAD_FIX}"
                    )
            elif tuple(value.shape) != tuple(expected):
                turned = " (the transposed layout: a tall matrix where a wide one is now, or the other way round)"
                raise ValueError(
                    f"APOLLO: cannot load this {origin}: {label} ({kind}) needs {key} of shape {tuple(expected)}, "
                    f"the state dict holds {tuple(value.shape)}"
                    f"{turned if tuple(value.shape) == tuple(expected)[::-1] else ''}. {_LOAD_FIX}"
                )

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate_group(group: dict[str, Any], where: str) -> None:
        for key, reason in _REFUSED_GROUP_KEYS.items():
            if group.get(key):
                raise ValueError(
                    f"APOLLO: {where} sets {key}={group[key]!r}, which APOLLO does not implement ({reason}); "
                    f"remove the key{' or set it False' if key != 'maximize' else ''}."
                )
        if group.get("decoupled_weight_decay") is False and group.get("weight_decay"):
            raise ValueError(
                f"APOLLO: {where} sets decoupled_weight_decay=False (Adam's L2 penalty), but APOLLO's weight "
                "decay is decoupled (AdamW's); remove the key, or set weight_decay=0."
            )
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            # torch.optim's own check and message.
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
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
        # Read from the rules themselves: a rule added to SCALING_RULES is accepted at once.
        if not isinstance(group["scale_type"], str) or group["scale_type"] not in apollo_math.SCALING_RULES:
            raise ValueError(
                f"APOLLO: unknown scale_type={group['scale_type']!r} in {where}; "
                f"choose one of {', '.join(repr(s) for s in apollo_math.SCALING_RULES)}."
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
        """Add a group, as :meth:`torch.optim.Optimizer.add_param_group` does, after checking it:
        a group that is refused (``ValueError``) leaves the optimizer unchanged.

        Example:
            >>> opt = APOLLO([torch.nn.Parameter(torch.zeros(4, 4))], lr=1e-3)
            >>> opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-2})
            >>> len(opt.param_groups)
            2
        """
        first_index = sum(len(g["params"]) for g in self.param_groups)
        where = f"param group {len(self.param_groups)}"
        # torch's checks (tensors, leaves, no parameter in two groups) and defaults, then ours,
        # and only then does the group count.
        super().add_param_group(param_group)
        group = self.param_groups.pop()
        self._validate_group(group, where)
        self._validate_params(group, where, first_index)
        self.param_groups.append(group)
        self._param_indices = None

    @staticmethod
    def _validate_params(group: dict[str, Any], where: str, first_index: int) -> None:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            label = _param_label(first_index + i, names[i] if names else None)
            if p.layout != torch.strided:
                raise ValueError(
                    f"APOLLO: {label} in {where} is a sparse tensor ({p.layout}); APOLLO takes dense parameters "
                    "only (torch.optim.SparseAdam handles sparse ones)."
                )
            if p.is_complex():
                raise ValueError(
                    f"APOLLO: {label} in {where} is complex ({p.dtype}); APOLLO takes real floating-point "
                    "parameters only. Optimize torch.view_as_real(param) instead, or use torch.optim.AdamW for it."
                )
            if group["low_rank"] and p.dim() != 2:
                raise ValueError(
                    f"APOLLO: {where} has low_rank=True but holds a tensor of shape {tuple(p.shape)} ({label}); "
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
        """``seed`` + ``param``'s index in the whole optimizer (group order).

        The indices are built once (not a scan of every parameter per call, which made the first
        step quadratic in the number of parameters) and again after ``add_param_group``,
        ``load_state_dict``, or when a parameter is missing (groups edited by hand).
        """
        indices = self._param_indices
        if indices is None or param not in indices:
            params = (p for group in self.param_groups for p in group["params"])
            indices = self._param_indices = {p: i for i, p in enumerate(params)}
        if param not in indices:
            raise KeyError("parameter is not managed by this optimizer")
        return self.seed + indices[param]

    @staticmethod
    def effective_rank(group: dict[str, Any], shape: torch.Size | tuple[int, ...]) -> int:
        """The rank used for a matrix of ``shape``: ``min(rank, min(shape))``."""
        return min(group["rank"], min(shape))

    def _projection(self, param: torch.Tensor, state: dict[str, torch.Tensor], window: int, rank: int) -> torch.Tensor:
        m, n = param.shape
        # Before its first step a parameter has no state yet: its seed is the one it will get.
        seed = int(state["seed"]) if "seed" in state else self._param_seed(param)
        key = (seed, window)
        if self.cache_projection:
            cached = self._projection_cache.get(param)
            if cached is not None and cached[0] == key:
                return cached[1]
        local = _local(param)
        dtype = self.projection_dtype or local.dtype
        proj = apollo_math.random_projection(seed, window, (m, n), rank, device=local.device, dtype=dtype)
        # Stored column-major: the product takes Pᵀ (see kernels.project_into), then a contiguous
        # operand, which makes a wide matrix's bf16 projection faster on the CPU.
        proj = proj.T.contiguous().T
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
        moment_shape = low_rank_shape((m, n), rank)
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["seed"] = torch.tensor(self._param_seed(param), dtype=torch.int64)
        # A DTensor parameter (FSDP2) gets DTensor moments, split like R (see .sharding).
        state["exp_avg"] = zeros_like_layout(param, moment_shape, 0 if m >= n else 1, param.dtype)
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        # +inf: the first step has no previous norm, so the limiter lets it through.
        state["prev_update_norm"] = torch.full((), math.inf, dtype=torch.float32, device=_local(param).device)
        return state

    def _init_adamw_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[param]
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _grads_are_finite(self, plan: list[_GroupPlan]) -> bool:
        grads, checked, low_rank_checked = [], [], []
        for part in plan:
            grads += [p.grad for p in part.low_rank + part.adamw]
            checked += [_local(p.grad) for p in part.adamw]
            # The norms of G (one per channel or per matrix) are NaN or inf exactly when G is
            # (or when they would overflow), and far smaller than G: check them instead.
            grad_norms = part.prepared.grad_norms
            low_rank_checked += grad_norms if grad_norms is not None else [_local(p.grad) for p in part.low_rank]
        # The AdamW gradients last: the AdamW update, which comes next, may find them in the cache.
        checked = low_rank_checked + checked
        # A rank's shard of a small matrix may be empty (FSDP2); it holds no NaN.
        local = [t for t in checked if t.numel()]
        finite = True
        if local:
            finite = all_finite(local)
        # Sharded gradients: every rank must take the same decision.
        return all_ranks_finite(finite, grads)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss, as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Frames to the caller: this method, step, torch's no_grad and step-hook wrappers.
        self._step_groups([(group, group["params"]) for group in self.param_groups], _SKIPPED_STEP, stacklevel=5)
        return loss

    @torch.no_grad()
    def step_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Update only ``params`` (those holding a gradient), exactly as :meth:`step` would.

        The entry point of :class:`~lightning_memopt.optim.LayerwiseOptimizer`, which updates
        each parameter during backward as soon as its gradient is ready. Each parameter keeps
        its group's hyper-parameters and its projection seed (``seed`` + its index in the whole
        optimizer), so layer-wise training draws the same projections as :meth:`step`. With
        ``check_finite``, a NaN/inf gradient skips these parameters only, with a warning.

        Example:
            >>> model = torch.nn.Linear(16, 32)
            >>> opt = APOLLO([{"params": [model.weight], "low_rank": True},
            ...               {"params": [model.bias], "low_rank": False}], lr=1e-3, rank=4)
            >>> model(torch.randn(8, 16)).sum().backward()
            >>> opt.step_parameters([model.weight])   # the bias keeps its gradient for later
            >>> int(opt.state[model.weight]["step"]), model.bias in opt.state
            (1, False)
        """
        wanted = {id(p) for p in params}
        self._step_groups(
            [(group, [p for p in group["params"] if id(p) in wanted]) for group in self.param_groups],
            _SKIPPED_PARAMETERS,
            stacklevel=4,  # this method, step_parameters, torch's no_grad wrapper, the caller
        )

    def _step_groups(
        self, subsets: list[tuple[dict[str, Any], list[torch.Tensor]]], skipped: str, stacklevel: int
    ) -> None:
        """The one path of :meth:`step` and :meth:`step_parameters`: update the parameters of each
        ``(group, params)`` that hold a gradient; with ``check_finite``, none of them (warning
        ``skipped``, attributed ``stacklevel`` frames up: the caller's line) when a gradient holds
        NaN or inf."""
        plan: list[_GroupPlan] = []
        for group, params in subsets:
            low_rank, adamw = [], []
            for p in params:
                if p.grad is None or p.numel() == 0:  # an empty tensor has nothing to update
                    continue
                if p.grad.is_sparse:  # before any update, so that a refusal changes nothing
                    raise RuntimeError("APOLLO does not support sparse gradients.")
                (low_rank if self.is_low_rank(group, p) else adamw).append(p)
            plan.append(_GroupPlan(group, low_rank, adamw))
        early = self._early_projections([(part.group, part.low_rank) for part in plan])
        for part, projected in zip(plan, early):
            # The limiter's norms of G, taken before any state changes: the finite check reads
            # them instead of G. (Sharded matrices take theirs inside their own step.)
            if part.low_rank and not any(is_dtensor(p) for p in part.low_rank):
                part.prepared = self._prepare_low_rank(part.group, part.low_rank, projected)
        if self.check_finite and not self._grads_are_finite(plan):
            warnings.warn(skipped, RuntimeWarning, stacklevel=stacklevel)
            return
        for part in plan:
            if part.adamw:
                self._adamw_step(part.group, part.adamw)
        for part in plan:
            if part.low_rank:
                self._apollo_step(part.group, part.low_rank, part.prepared)

    def uses_8bit_state(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s AdamW moments are kept in 8 bits (``adamw_8bit`` and large enough).

        Example:
            >>> opt = APOLLO([{"params": [torch.nn.Parameter(torch.zeros(8192))], "low_rank": False}], adamw_8bit=True)
            >>> opt.uses_8bit_state(opt.param_groups[0]["params"][0])
            True
        """
        return self.adamw_8bit and param.numel() >= MIN_8BIT_SIZE

    def _adamw_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        if self.adamw_8bit:
            eight_bit = [p for p in params if self.uses_8bit_state(p)]
            if eight_bit:
                self._adamw_8bit_step(group, eight_bit)
                params = [p for p in params if not self.uses_8bit_state(p)]
                if not params:
                    return
        states = [self.state[p] or self._init_adamw_state(p) for p in params]
        for p, state in zip(params, states):
            # torch's fused kernel writes past the end of a moment smaller than its parameter
            # (heap corruption, not an error): a state that does not fit is refused here.
            if state["exp_avg"].shape != p.shape or state["exp_avg_sq"].shape != p.shape:
                raise ValueError(_misfit_message(self, p, "exp_avg", tuple(state["exp_avg"].shape), tuple(p.shape)))
        on_cpu = all(_local(p).device.type == "cpu" for p in params)
        tensors = (params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
        strided = on_cpu and not all(t.is_contiguous() for group_ in tensors for t in group_)
        if strided:
            # torch's fused CPU kernel reads strided tensors as if they were contiguous (wrong
            # numbers): step contiguous copies of those, then write them back, so that a strided
            # parameter gets exactly the update of a contiguous one.
            tensors = tuple([t.contiguous() for t in group_] for group_ in tensors)
        beta1, beta2 = group["betas"]
        functional_adamw(
            *tensors,
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
        if strided:
            originals = (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
            for targets, results in zip(originals, (tensors[0], tensors[2], tensors[3])):
                for target, result in zip(targets, results):
                    if target.data_ptr() != result.data_ptr():
                        target.copy_(result)

    def _adamw_8bit_step(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """AdamW with 8-bit blockwise moments, one parameter at a time (bitsandbytes' kernel)."""
        from bitsandbytes.functional import create_dynamic_map, optimizer_update_8bit_blockwise

        beta1, beta2 = group["betas"]
        lr = group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"]
        for p in params:
            if is_dtensor(p):
                raise ValueError(
                    "APOLLO: adamw_8bit=True does not support FSDP2-sharded parameters (its per-rank "
                    "quantisation blocks cannot be re-sharded); use adamw_8bit=False with apollo_fsdp."
                )
            device = p.device
            if device not in self._quantization_maps:
                self._quantization_maps[device] = (
                    create_dynamic_map(signed=True).to(device),
                    create_dynamic_map(signed=False).to(device),
                )
            signed_map, unsigned_map = self._quantization_maps[device]
            state = self.state[p]
            if not state:
                blocks = math.ceil(p.numel() / BLOCK_8BIT)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["state1"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.preserve_format)
                state["state2"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.preserve_format)
                state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=device)
                state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=device)
            state["step"] += 1
            step = int(state["step"])
            tensors = (p.grad, p, state["state1"], state["state2"], state["absmax1"], state["absmax2"])
            for grad, weight, state1, state2, absmax1, absmax2 in blockwise_chunks(*tensors):
                optimizer_update_8bit_blockwise(
                    "adam",
                    grad,
                    weight,
                    state1,
                    state2,
                    beta1,
                    beta2,
                    0.0,
                    0.0,
                    group["eps"],
                    step,
                    lr,
                    signed_map,
                    unsigned_map,
                    absmax1,
                    absmax2,
                    weight_decay=group["weight_decay"],
                )

    def _moment_shape(self, group: dict[str, Any], param: torch.Tensor) -> tuple[int, int]:
        """The shape of ``param``'s projected gradient ``R`` and of its Adam moments: the shape of
        the workspace views the step writes ``R`` and ``N`` into.

        A state's moments must fit ``param`` (``m x r`` for a tall matrix, ``r x n`` for a wide
        one, ``1 <= r <= min(m, n)``): the projection is written into these views with
        ``out=``, and the Adam kernel reads and writes them beside the moments, so a state of
        another shape would write out of bounds. ``load_state_dict`` refuses such a state; this
        check catches one set by hand.
        """
        m, n = param.shape
        state = self.state[param]
        if not state:
            return low_rank_shape((m, n), self.effective_rank(group, param.shape))
        shape = state["exp_avg"].shape
        if m >= n:  # m x r, 1 <= r <= n
            fits = len(shape) == 2 and shape[0] == m and 0 < shape[1] <= n
        else:  # r x n, 1 <= r <= m
            fits = len(shape) == 2 and shape[1] == n and 0 < shape[0] <= m
        if not fits or state["exp_avg_sq"].shape != shape:
            expected = low_rank_shape((m, n), self.effective_rank(group, (m, n)))
            raise ValueError(_misfit_message(self, param, "exp_avg", tuple(shape), expected))
        return tuple(shape)  # type: ignore[return-value]

    def _low_rank_chunks(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[list[int]]:
        """``params`` (indices) in chunks whose projected gradients fit one workspace buffer."""
        keys = [(p.grad.device, p.grad.dtype) for p in params]
        sizes = [math.prod(self._moment_shape(group, p)) for p in params]
        return _chunks(keys, sizes, _CHUNK_ELEMENTS)

    def _project(self, group: dict[str, Any], param: torch.Tensor, out: torch.Tensor) -> None:
        """``out = R`` for ``param``'s coming step; changes no state."""
        state = self.state[param]
        rank = out.shape[1] if param.shape[0] >= param.shape[1] else out.shape[0]
        # The Adam kernel advances the step counter; the coming step is the next one.
        window = (int(state["step"]) if state else 0) // group["update_proj_gap"]
        project_into(param.grad, self._projection(param, state, window, rank), out, self._workspace)

    def _early_projections(
        self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]
    ) -> list[list[torch.Tensor] | None]:
        """Room for the projected gradients that :meth:`step` takes before its finite check, per
        group (``None``: projected later, chunk by chunk): those of whole groups of unsharded
        matrices, as long as all of them together fit one chunk (APOLLO-Mini's always do) and
        share one device and dtype, in one workspace buffer."""
        chosen, shapes = [], []
        total, key = 0, None
        for group, params in groups:
            group_keys = {(p.grad.device, p.grad.dtype) for p in params}
            group_shapes = [self._moment_shape(group, p) for p in params]
            size = sum(math.prod(shape) for shape in group_shapes)
            fits = (
                len(group_keys) == 1
                and (key is None or group_keys == {key})
                and total + size <= _CHUNK_ELEMENTS
                and not any(is_dtensor(p) for p in params)
            )
            chosen.append(fits)
            if fits:
                key, total = next(iter(group_keys)), total + size
                shapes += group_shapes
        if key is None:
            return [None] * len(groups)
        views = iter(self._workspace.take("early_projected", shapes, key[1], key[0]))
        return [[next(views) for _ in params] if fits else None for fits, (_, params) in zip(chosen, groups)]

    def _prepare_low_rank(
        self, group: dict[str, Any], params: list[torch.Tensor], projected: list[torch.Tensor] | None
    ) -> _Prepared:
        """What the step of unsharded ``params`` needs before it may change any state: the
        gradients' norms for the limiter (``None`` when it is off), and, when :meth:`step` has
        room for them (``projected``; see :meth:`_early_projections`), their projections ``R``,
        each taken in the same sweep over ``G`` as its norms, while ``G`` is in the cache.
        (Other ``R`` are projected chunk by chunk in the step.)"""
        limiter = group["norm_growth_limit"] is not None
        grad_norms = []
        for i, p in enumerate(params):
            if projected is not None:
                self._project(group, p, projected[i])
            if limiter:
                grad_norms.append(apollo_math.gradient_norms(p.grad, group["scale_type"], self._workspace))
        return _Prepared(grad_norms if limiter else None, projected)

    def _apollo_step(self, group: dict[str, Any], params: list[torch.Tensor], prepared: _Prepared) -> None:
        """One APOLLO step of the matrices ``params`` of ``group``, with what
        :meth:`_prepare_low_rank` computed for them, if it did (unsharded matrices only)."""
        hyper = ApolloHyperparameters.from_group(group)
        sharded = [p for p in params if is_dtensor(p)]
        if sharded:  # FSDP2 shards: the same math plus collectives (see .sharding)
            states = [self.state[p] if self.state[p] else self._init_low_rank_state(group, p) for p in sharded]
            projections = []
            for p, state in zip(sharded, states):
                m, n = p.shape
                rank = state["exp_avg"].shape[1] if m >= n else state["exp_avg"].shape[0]
                # The Adam kernel advances the step counter; the coming step is the next one.
                window = int(state["step"]) // group["update_proj_gap"]
                projections.append(self._projection(p, state, window, rank))
            apollo_step_sharded(sharded, states, projections, hyper)
            params = [p for p in params if not is_dtensor(p)]
            prepared = _Prepared()
            if not params:
                return
        grad_norms, projected = prepared.grad_norms, prepared.projected
        if grad_norms is None and hyper.norm_growth_limit is not None:
            grad_norms = [apollo_math.gradient_norms(p.grad, hyper.scale_type, self._workspace) for p in params]
        # A chunk at a time: R and R̃ of a chunk fit in reused workspace buffers.
        runs = [list(range(len(params)))] if projected is not None else self._low_rank_chunks(group, params)
        for run in runs:
            members = [params[i] for i in run]
            states = [self.state[p] if self.state[p] else self._init_low_rank_state(group, p) for p in members]
            if projected is None:
                shapes = [self._moment_shape(group, p) for p in members]
                grad = members[0].grad
                chunk_projected = self._workspace.take("projected", shapes, grad.dtype, grad.device)
                for p, out in zip(members, chunk_projected):
                    self._project(group, p, out)
            else:
                chunk_projected = projected
            chunk_norms = None if grad_norms is None else [grad_norms[i] for i in run]
            self._apollo_step_chunk(hyper, members, states, chunk_projected, chunk_norms)

    def _apollo_step_chunk(
        self,
        hyper: ApolloHyperparameters,
        params: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        projected: list[torch.Tensor],
        grad_norms: list[torch.Tensor] | None,
    ) -> None:
        """Steps 2-4 of Algorithm 1 (see :mod:`.apollo_math`) for unsharded matrices of one device
        and dtype, from their projected gradients ``R``."""
        workspace = self._workspace
        normalized = apollo_math.adam_normalized(
            projected,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
            betas=hyper.betas,
            eps=hyper.eps,
            out=workspace.take("normalized", [r.shape for r in projected], projected[0].dtype, projected[0].device),
        )
        channel_dims = [apollo_math.channel_dim(p.shape) for p in params]
        factors = apollo_math.SCALING_RULES[hyper.scale_type].factors(normalized, projected, channel_dims, workspace)
        if hyper.norm_growth_limit is not None:
            assert grad_norms is not None  # _apollo_step takes them when the limiter is on
            apollo_math.limit_norm_growth_(
                factors,
                apollo_math.update_norms(factors, grad_norms),
                [s["prev_update_norm"] for s in states],
                hyper.norm_growth_limit,
            )
        apollo_math.apply_update_(
            list(params),
            [p.grad for p in params],
            factors,
            lr=hyper.lr,
            weight_decay=hyper.weight_decay,
            scale=hyper.scale,
        )

    # ------------------------------------------------------------------ memory
    def projection_cache_bytes(self) -> int:
        """Bytes held by the cached projection matrices (not part of the state dict)."""
        return sum(proj.numel() * proj.element_size() for _, proj in self._projection_cache.values())

    def workspace_bytes(self) -> int:
        """Bytes of the step's scratch buffers kept between steps (on the CPU only; not part of
        the state dict): the projected gradients of one chunk of matrices and their Adam
        normalisation, and with a ``projection_dtype`` that differs from the parameters', a
        copy of the largest gradient in it."""
        return self._workspace.nbytes()


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
        adamw_8bit: bool = False,
        projection_dtype: str | torch.dtype | None = None,
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
            adamw_8bit=adamw_8bit,
            projection_dtype=projection_dtype,
        )


def _param_label(index: int, name: str | None = None) -> str:
    return f"parameter {index}" + (f" ({name!r})" if name else "")


def _param_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[int, str | None]:
    """``param``'s index in the whole optimizer (group order) and its name, if the group has names."""
    index = 0
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is param:
                names = group.get("param_names")
                return index, (names[i] if names else None)
            index += 1
    return -1, None


def _misfit_message(optimizer: torch.optim.Optimizer, param: torch.Tensor, key: str, saved: Any, expected: Any) -> str:
    label = _param_label(*_param_index(optimizer, param))
    return (
        f"APOLLO: the optimizer state of {label} (shape {tuple(param.shape)}) holds {key} of shape {saved}, "
        f"but the parameter needs {expected}: the state belongs to another parameter or configuration. {_LOAD_FIX}"
    )


def _as_state_tensor(key: str, value: Any, label: str) -> torch.Tensor:
    """A saved state value as a tensor: plain numbers (``step`` as older torch saved it) are
    converted, anything else that is not a tensor is refused."""
    if isinstance(value, torch.Tensor):
        return value
    if key in _SCALAR_STATE_DTYPES and isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(value, dtype=_SCALAR_STATE_DTYPES[key])
    raise ValueError(
        f"APOLLO: cannot load this state dict: {label} has {key}={value!r} ({type(value).__name__}); the "
        f"state of APOLLO holds tensors only. {_LOAD_FIX}"
    )


def _is_plain_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not callable(getattr(value, "to_local", None))
