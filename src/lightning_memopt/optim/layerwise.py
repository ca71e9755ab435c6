"""Layer-wise (in-backward) optimizer steps: update each weight as soon as its gradient is ready.

:class:`LayerwiseOptimizer` wraps an optimizer (ours or any ``torch.optim`` one) and registers
a ``Tensor.register_post_accumulate_grad_hook`` on every parameter it manages. During the
backward pass that ends an accumulation window, each hook updates its parameter with the
inner optimizer and frees the gradient at once, so a full set of gradients never exists:
peak gradient memory falls from the size of the model to that of its largest parameter.

The wrapper is itself a :class:`torch.optim.Optimizer` whose ``param_groups``, ``state`` and
``state_dict()`` are the inner optimizer's, so torch LR schedulers wrap it directly, trainers
that call ``optimizer.step()`` / ``zero_grad()`` keep working, and checkpoints are
interchangeable with those of the unwrapped optimizer.

Example:
    >>> import torch
    >>> from lightning_memopt.optim import APOLLO, LayerwiseOptimizer, apollo_param_groups
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> opt = LayerwiseOptimizer(APOLLO(apollo_param_groups(model, "all-linear", rank=4), lr=1e-2))
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    >>> model(torch.randn(8, 16)).pow(2).mean().backward()   # the weights are updated in here
    >>> all(p.grad is None for p in model.parameters())
    True
    >>> opt.step(); sched.step(); opt.zero_grad()           # the usual loop still works
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

__all__ = ["LayerwiseOptimizer"]

# Guards the clipping coefficient against a zero norm (same constant as torch's clip_grad_norm_).
_CLIP_EPS = 1e-6


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Step each parameter inside backward, as soon as its gradient is accumulated, then free it.

    Args:
        optimizer: the inner optimizer; its param groups, hyper-parameters and state are used
            as they are. Any optimizer whose update of one parameter depends only on that
            parameter's gradient and state works (AdamW, SGD, APOLLO, bitsandbytes' 8-bit
            optimizers, ...); optimizers that need all gradients at once (LBFGS, global-norm
            methods) do not. An optimizer that defines ``step_parameters(params)`` (as
            :class:`~lightning_memopt.optim.APOLLO` does, keeping its per-parameter projection
            seeds) is asked to step the subset itself; for any other one the param groups are
            narrowed to the subset for the duration of one ``step()`` call.
        accumulation_steps: backward passes per optimizer step. On the other backward passes
            gradients accumulate in ``.grad`` as usual (a full gradient exists then); the
            parameters are updated during the last one. Ignored when ``boundary`` is given.
        boundary: decides, when the first gradient of a backward pass arrives, whether that
            backward ends an accumulation window (the parameters are updated in it) or not.
            ``None``: every ``accumulation_steps``-th backward pass. A callable returning a
            bool: asked once per backward pass (e.g. ``lambda: accelerator.sync_gradients`` in
            the HF Trainer). ``"closure"``: exactly the backward passes run by
            ``step(closure)`` (Lightning's automatic optimization calls ``step(closure)`` on
            the last micro-batch and runs the others outside ``step``).
        max_grad_norm: per-parameter gradient clipping: each parameter's gradient is scaled
            to an L2 norm of at most ``max_grad_norm``, independently of the others (the global
            norm of all gradients never exists at once in layer-wise mode, so global clipping
            as in ``clip_grad_norm_`` cannot be done; :meth:`clip_grad_norm_` refuses it with
            an explanation). With clipping on, :attr:`last_grad_norm` holds the global norm of
            the last step's gradients (before clipping), for logging.
        ddp: the model is wrapped in ``DistributedDataParallel``. DDP all-reduces gradients
            in buckets that complete only at the end of backward, after the per-parameter hooks
            ran, so in this mode the parameters are updated in a callback that runs after DDP's
            reducer has written the averaged gradients (still inside ``backward()``). The
            update is exact; there is no gradient memory to save, since DDP keeps full-size
            gradient buckets anyway. ``None`` (default): on when ``torch.distributed`` is
            initialized with more than one process at the first backward pass.

    After a backward pass that ends an accumulation window, every parameter has been updated
    and its ``.grad`` is ``None``. :meth:`step` then only runs the closure, if any, and updates
    parameters that still hold a gradient (normally none); :meth:`zero_grad`,
    :meth:`state_dict` and :meth:`load_state_dict` act on the inner optimizer.

    Example:
        >>> model = torch.nn.Linear(8, 8)
        >>> opt = LayerwiseOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), accumulation_steps=2)
        >>> for micro_batch in torch.randn(4, 2, 8):
        ...     model(micro_batch).sum().backward()     # updates on the 2nd and 4th pass
        >>> opt.optimizer.state[model.weight]["step"]
        tensor(2.)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        accumulation_steps: int = 1,
        boundary: Callable[[], bool] | str | None = None,
        max_grad_norm: float | None = None,
        ddp: bool | None = None,
    ) -> None:
        if isinstance(optimizer, LayerwiseOptimizer):
            raise TypeError("LayerwiseOptimizer: the optimizer is already layer-wise; wrap the inner optimizer once.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"LayerwiseOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"LayerwiseOptimizer: accumulation_steps={accumulation_steps!r}; use an integer >= 1.")
        if not (boundary is None or boundary == "closure" or callable(boundary)):
            raise ValueError(
                f"LayerwiseOptimizer: boundary={boundary!r}; use None (every accumulation_steps-th backward), "
                "'closure' (the backward run by step(closure)) or a callable returning a bool."
            )
        if max_grad_norm is not None and not (max_grad_norm > 0):
            raise ValueError(f"LayerwiseOptimizer: max_grad_norm={max_grad_norm!r}; use a number > 0 or None.")
        self.optimizer = optimizer
        self.accumulation_steps = accumulation_steps
        self.boundary = boundary
        self.max_grad_norm = max_grad_norm
        self.ddp = ddp
        #: Global L2 norm of the last step's gradients before clipping (only with ``max_grad_norm``).
        self.last_grad_norm: torch.Tensor | None = None
        self._backward_passes = 0
        self._in_backward = False
        self._task: int | None = None  # the autograd graph task of the backward in progress
        self._last_task: int | None = None
        self._stepping_now = False
        self._running_closure = False
        self._grad_norms: list[torch.Tensor] = []
        self._update_open = False
        self._hooks: dict[int, tuple[torch.Tensor, RemovableHandle]] = {}
        # register_step_pre_hook / register_step_post_hook (torch.optim.Optimizer's) fill these;
        # they run before the first and after the last parameter update of each optimizer step.
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._register_hooks()

    # ------------------------------------------------------------------ the inner optimizer's view
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __repr__(self) -> str:
        return f"LayerwiseOptimizer({self.optimizer!r})"

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy`` and ``pickle`` keep: the inner optimizer (with its parameters and
        state) and every option, without the gradient hooks and the step hooks.

        A copy is a layer-wise optimizer of the *copied* parameters: :meth:`__setstate__` hooks
        those, never the original's. Copy the model and the optimizer together
        (``copy.deepcopy((model, opt))``, or one ``pickle.dumps`` of both) and the copied model
        trains layer-wise with the copied optimizer; copy the optimizer alone and it hooks its own
        detached copies of the parameters, leaving the original model and optimizer untouched.
        As for any torch optimizer, step hooks (:meth:`register_step_pre_hook` ...) are not
        copied. A ``boundary`` callable must itself be picklable to pickle the optimizer.
        """
        state = {k: v for k, v in self.__dict__.items() if k != "_hooks"}
        state["_optimizer_step_pre_hooks"] = OrderedDict()
        state["_optimizer_step_post_hooks"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._hooks = {}
        # A copy taken inside a backward pass starts outside one.
        self._in_backward = False
        self._stepping_now = False
        self._update_open = False
        self._register_hooks()

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The inner optimizer's state dict (interchangeable with that of the unwrapped optimizer)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load into the inner optimizer (a state dict of the unwrapped optimizer loads too)."""
        self.optimizer.load_state_dict(state_dict)

    # State-dict hooks belong to the optimizer whose state_dict() runs: the inner one.
    def register_state_dict_pre_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        return self.optimizer.register_state_dict_pre_hook(*args, **kwargs)

    def register_state_dict_post_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        return self.optimizer.register_state_dict_post_hook(*args, **kwargs)

    def register_load_state_dict_pre_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        return self.optimizer.register_load_state_dict_pre_hook(*args, **kwargs)

    def register_load_state_dict_post_hook(self, *args: Any, **kwargs: Any) -> RemovableHandle:
        return self.optimizer.register_load_state_dict_post_hook(*args, **kwargs)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer and hook its parameters."""
        self.optimizer.add_param_group(param_group)
        self._register_hooks()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients left by accumulation (after an update every ``.grad`` is already ``None``)."""
        self._in_backward = False  # a backward that raised never ran its end-of-backward callback
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def clip_grad_norm_(self, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Refused: no full gradient exists to clip by its global norm in layer-wise mode."""
        raise RuntimeError(
            f"LayerwiseOptimizer: global gradient clipping (max_norm={max_norm}) needs every gradient at once, "
            "but layer-wise updates free each gradient as soon as its parameter is updated. Use per-parameter "
            "clipping instead: LayerwiseOptimizer(optimizer, max_grad_norm=...), or turn layer-wise updates off."
        )

    def remove_hooks(self) -> None:
        """Remove the gradient hooks: afterwards backward leaves gradients in ``.grad`` as usual."""
        for _, handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------ stepping
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run ``closure`` (forward and backward: the parameters are updated inside its backward),
        then update any parameter that still holds a gradient, and return the closure's loss.

        With ``boundary="closure"`` the backward run by ``closure`` is always an update pass.
        """
        loss = None
        if closure is not None:
            self._running_closure = True
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self._running_closure = False
        if self._params_with_grad():
            self._finish_step()
        return loss

    def _register_hooks(self) -> None:
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad and id(param) not in self._hooks:
                    self._hooks[id(param)] = (param, param.register_post_accumulate_grad_hook(self._on_grad_ready))

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _is_boundary(self) -> bool:
        if self.boundary is None:
            return (self._backward_passes + 1) % self.accumulation_steps == 0
        if self.boundary == "closure":
            return self._running_closure
        return bool(self.boundary())

    def _on_grad_ready(self, param: torch.Tensor) -> None:
        # A backward nested in another (reentrant checkpointing) runs as its own autograd graph
        # task and ends before the enclosing one: its gradients arrive under another task than
        # the backward in progress, or from an older task than the backward that just ended.
        task = torch._C._current_graph_task_id()
        nested = (task != self._task) if self._in_backward else (self._last_task is not None and task < self._last_task)
        if nested:
            raise RuntimeError(
                "LayerwiseOptimizer: a gradient arrived from a nested (reentrant) backward pass, as "
                "torch.utils.checkpoint(..., use_reentrant=True) runs; layer-wise updates cannot tell where such "
                "a backward ends. Use non-reentrant checkpointing: lightning_memopt.layers."
                "apply_activation_checkpointing, checkpoint(..., use_reentrant=False), or HF "
                "gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        if not self._in_backward:
            self._in_backward = True
            self._task = task
            self._stepping_now = self._is_boundary()
            if self.ddp is None:
                self.ddp = _distributed_world_size() > 1
            Variable._execution_engine.queue_callback(self._end_of_backward)
        if self._stepping_now and not self.ddp:
            self._update([param])

    def _end_of_backward(self) -> None:
        self._in_backward = False
        self._last_task = self._task
        self._backward_passes += 1
        if not self._stepping_now:
            return
        self._stepping_now = False
        if self.ddp:
            # DDP's reducer queues its own end-of-backward callback (which waits for the
            # all-reduce and writes the averaged gradients) during this backward; a callback
            # queued now runs after it.
            Variable._execution_engine.queue_callback(self._finish_step)
        else:
            self._finish_step()

    def _finish_step(self) -> None:
        """Update the parameters that still hold a gradient, then close the optimizer step.

        Without DDP those are the parameters whose gradient came from earlier micro-batches
        only (no hook fired for them in this backward); with DDP, all of them.
        """
        remaining = self._params_with_grad()
        if remaining:
            self._update(remaining)
        self._update_open = False
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        if self._grad_norms:
            device = self._grad_norms[0].device
            norms = torch.stack([n.float().to(device) for n in self._grad_norms])
            self.last_grad_norm = torch.linalg.vector_norm(norms)
            self._grad_norms = []
        # An LR scheduler checks that optimizer.step() ran before its own step(); here the
        # update ran inside backward, so say so for this wrapper and for the inner optimizer.
        self._opt_called = True
        self.optimizer._opt_called = True  # type: ignore[attr-defined]

    @torch.no_grad()
    def _update(self, params: list[torch.Tensor]) -> None:
        if not self._update_open:
            self._update_open = True
            for hook in list(self._optimizer_step_pre_hooks.values()):
                hook(self, (), {})
        if self.max_grad_norm is not None:
            self._clip(params)
        step_parameters = getattr(self.optimizer, "step_parameters", None)
        if callable(step_parameters):
            step_parameters(params)
        else:
            self._step_narrowed(params)
        for param in params:
            param.grad = None

    def _step_narrowed(self, params: list[torch.Tensor]) -> None:
        """One inner ``step()`` that sees only ``params``: each group keeps its hyper-parameters."""
        wanted = {id(p) for p in params}
        groups = self.optimizer.param_groups
        saved = [group["params"] for group in groups]
        try:
            for group, members in zip(groups, saved):
                group["params"] = [p for p in members if id(p) in wanted]
            self.optimizer.step()
        finally:
            for group, members in zip(groups, saved):
                group["params"] = members

    def _clip(self, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        norms = torch._foreach_norm(grads)
        self._grad_norms.extend(norms)
        torch._foreach_mul_(grads, [torch.clamp(self.max_grad_norm / (n + _CLIP_EPS), max=1.0) for n in norms])
