"""Scratch buffers that an optimizer step reuses from one step to the next.

An APOLLO step needs temporaries the size of a matrix's projected gradient (``R``, ``N``),
and, with a low-precision projection, a low-precision copy of a gradient. Allocating them
afresh every step costs little on a GPU (PyTorch's caching allocator hands the same blocks
back), but on the CPU a large allocation comes from the operating system as fresh pages,
and the first touch of each page faults, which on a small CPU costs an APOLLO step more than
its arithmetic (figures: ``benchmarks/results/optimizer_step_history.md``). So on the
CPU a :class:`Workspace` keeps one flat buffer per role, grown to the largest request and
handed out again as views; on other devices it simply allocates, and the caching allocator
does the reuse (a persistent buffer would only hold memory during forward and backward).

Every view starts on a 64-byte boundary, as a freshly allocated tensor does: some BLAS kernels
round differently when their output is not aligned (MKL's ``gemm`` on an AMD Zen 4 CPU, seen
here), and a result's bits must not depend on where a view happens to fall in its buffer.

Example:
    >>> ws = Workspace()
    >>> a, b = ws.take("R", [(4, 2), (3, 2)], torch.float32, torch.device("cpu"))
    >>> a.shape, b.shape, ws.nbytes()  # each view in whole 64-byte lines: 2 x 16 floats
    (torch.Size([4, 2]), torch.Size([3, 2]), 128)
    >>> c, = ws.take("R", [(2, 2)], torch.float32, torch.device("cpu"))  # the same memory again
    >>> c.data_ptr() == a.data_ptr()
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# A buffer: its name, device and dtype.
_Key = tuple[str, torch.device, torch.dtype]
# Views start at multiples of this many bytes (PyTorch's CPU allocator aligns to 64 too).
_ALIGNMENT_BYTES = 64


class Workspace:
    """Named, reusable scratch buffers (kept on the CPU, allocated per call elsewhere).

    Buffers are not part of any state dict; their contents are undefined when handed out.
    Views from one :meth:`take` are valid until the next ``take`` of the same name, dtype
    and device.

    Example:
        >>> ws = Workspace()
        >>> (acc,) = ws.take("norms", [(64, 10)], torch.float32, torch.device("cpu"))
        >>> acc.shape
        torch.Size([64, 10])
    """

    def __init__(self) -> None:
        self._buffers: dict[_Key, torch.Tensor] = {}
        # The views of the last take of each buffer: a step asks for the same ones every time.
        self._views: dict[_Key, tuple[tuple[tuple[int, ...], ...], list[torch.Tensor]]] = {}

    def take(
        self, name: str, shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """Contiguous, non-overlapping tensors of ``shapes``, carved from the buffer ``name``,
        each starting on a 64-byte boundary.

        Each view holds exactly its shape's elements. A caller must write into it only results
        of that shape: an ``out=`` of another shape would be resized *inside* the buffer, over
        the neighbouring views (or past the buffer's end, by an in-place kernel that does not
        check). APOLLO checks each shape against its parameter before asking for a view.

        Raises:
            ValueError: for a shape with a negative or non-integer size.
        """
        shapes = tuple(tuple(shape) for shape in shapes)
        key = (name, device, dtype)
        cached = self._views.get(key) if device.type == "cpu" else None
        if cached is not None and cached[0] == shapes:  # checked when first handed out
            return list(cached[1])
        for shape in shapes:
            if not all(isinstance(size, int) and size >= 0 for size in shape):
                raise ValueError(f"Workspace.take({name!r}): invalid shape {shape}; sizes must be integers >= 0.")
        sizes = [math.prod(shape) for shape in shapes]
        align = max(1, _ALIGNMENT_BYTES // dtype.itemsize)
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // align) * align
        if device.type != "cpu":
            flat = torch.empty(total, dtype=dtype, device=device)
        else:
            flat = self._buffers.get(key)
            if flat is None or flat.numel() < total:
                flat = torch.empty(total, dtype=dtype, device=device)
                self._buffers[key] = flat
        views = [flat[offset : offset + size].view(shape) for shape, size, offset in zip(shapes, sizes, offsets)]
        if device.type == "cpu":
            self._views[key] = (shapes, views)
        return list(views)

    def nbytes(self) -> int:
        """Bytes held between steps (CPU buffers only)."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def clear(self) -> None:
        """Release every buffer (they are re-created on demand)."""
        self._buffers.clear()
        self._views.clear()
