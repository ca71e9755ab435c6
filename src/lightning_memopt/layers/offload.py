"""Activation offloading: keep the tensors saved for backward in pinned CPU memory, not on the GPU.

Inside :class:`OffloadActivations`, every CUDA tensor that autograd saves for backward (and
that is not a parameter, nor smaller than ``min_bytes``) is copied to pinned host memory on a
side CUDA stream, so the copy overlaps the forward computation, and its GPU memory is released
as soon as the copy is done. Backward brings each tensor back when it needs it. Peak GPU
memory falls by the activations, at the cost of PCIe traffic.

On a machine without CUDA activations already live in host memory: the context does nothing
and says so once per process.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(8, 8)
    >>> with OffloadActivations():        # without CUDA: a no-op (it warns once)
    ...     loss = layer(torch.randn(4, 8)).relu().sum()
    >>> loss.backward()
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

__all__ = ["OffloadActivations"]

_warned_no_cuda = False


def _warn_once_no_cuda() -> None:
    global _warned_no_cuda
    if not _warned_no_cuda:
        _warned_no_cuda = True
        warnings.warn(
            "OffloadActivations: CUDA is not available, so activations already live in CPU memory; "
            "activation offloading does nothing here.",
            stacklevel=3,
        )


def _is_parameter_like(tensor: torch.Tensor) -> bool:
    # Weights (and views of them, e.g. W.t() saved by a matmul) stay on the GPU anyway:
    # offloading them would only add copies.
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, torch.nn.Parameter) or (base.is_leaf and base.requires_grad)


class OffloadActivations:
    """Context manager that offloads the activations saved for backward to pinned CPU memory.

    Args:
        min_bytes: tensors smaller than this stay on the GPU (the copy would cost more than
            it saves).
        use_side_stream: copy to the host on a separate CUDA stream so that the copies overlap
            the forward computation; ``False`` copies on the current stream.
        pin_memory: use pinned (page-locked) host buffers, needed for asynchronous copies.

    Without CUDA the context is a no-op that warns once per process.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU())
        >>> if torch.cuda.is_available():
        ...     model = model.cuda()
        ...     with OffloadActivations(min_bytes=0):
        ...         loss = model(torch.randn(8, 64, device="cuda")).sum()
        ...     loss.backward()
    """

    def __init__(self, min_bytes: int = 1 << 20, use_side_stream: bool = True, pin_memory: bool = True) -> None:
        self.min_bytes = min_bytes
        self.use_side_stream = use_side_stream
        self.pin_memory = pin_memory
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._stream: Any = None
        #: Bytes moved to the host since the context was entered (for reports and tests).
        self.offloaded_bytes = 0

    def __enter__(self) -> OffloadActivations:
        if not torch.cuda.is_available():
            _warn_once_no_cuda()
            return self
        if self.use_side_stream and self._stream is None:
            self._stream = torch.cuda.Stream()
        self.offloaded_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> Any:
        if (
            tensor.device.type != "cuda"
            or tensor.numel() * tensor.element_size() < self.min_bytes
            or _is_parameter_like(tensor)
        ):
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=self.pin_memory)
        if self._stream is None:
            host.copy_(tensor, non_blocking=self.pin_memory)
            event = torch.cuda.Event()
            event.record()
        else:
            # The side stream must see the tensor fully computed, and the allocator must not
            # reuse its memory before the copy on the side stream has read it.
            self._stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(self._stream):
                host.copy_(tensor, non_blocking=self.pin_memory)
                event = torch.cuda.Event()
                event.record(self._stream)
            tensor.record_stream(self._stream)
        self.offloaded_bytes += host.numel() * host.element_size()
        return (tensor.device, host, event)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, event = packed
        stream = torch.cuda.current_stream(device)
        stream.wait_event(event)  # the device-to-host copy has finished writing `host`
        return host.to(device, non_blocking=True)
