"""Crash-safe checkpoint writes: a checkpoint path is either the previous complete checkpoint or the new one.

A run killed while it saves (preempted, out of memory, a node lost) must not leave a
half-written file or folder under the checkpoint's name: ``ckpt_path="last"`` and
``ModelCheckpoint``'s top-k bookkeeping would pick it and the resume would fail (or, worse,
load a folder with some shards missing). Everything here writes to a temporary sibling
(``name.tmp-<pid>``, in the same directory, so that the final rename stays on one file
system), flushes it to disk (``fsync``), and only then puts it in place with one atomic
rename. A temporary name never ends in ``.ckpt``, so Lightning never mistakes it for a
checkpoint; leftovers of a killed save are removed by the next save of the same name.

- :func:`atomic_replace` swaps a finished file or folder into place. Replacing an existing
  folder (``last.ckpt/`` saved again) needs an atomic *exchange* of two names, which Linux
  offers (``renameat2(RENAME_EXCHANGE)``); elsewhere the old folder is first renamed aside
  (``name.old-<pid>``) and :func:`recover_interrupted_replace` restores it if the process died
  between the two renames.
- :class:`AtomicCheckpointIO` is Lightning's ``TorchCheckpointIO`` with these writes, for
  single-file checkpoints (it streams ``torch.save`` into the temporary file instead of first
  building the whole checkpoint in memory as Lightning's ``_atomic_save`` does, and it never
  copies across file systems). ``apollo_fsdp`` uses it by default, and any strategy takes it
  as a plugin: ``Trainer(plugins=[AtomicCheckpointIO()])``.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, folder / "last.ckpt")
    >>> sorted(p.name for p in folder.iterdir())
    ['last.ckpt']
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

TMP_MARKER = ".tmp-"
OLD_MARKER = ".old-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def temporary_sibling(path: str | Path, pid: int | None = None) -> Path:
    """Where a save of ``path`` is written before it is renamed into place: ``name.tmp-<pid>``.

    Example:
        >>> temporary_sibling("ckpts/last.ckpt", pid=42).as_posix()
        'ckpts/last.ckpt.tmp-42'
    """
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARKER}{os.getpid() if pid is None else pid}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what killed saves of ``path`` left behind (``name.tmp-*``); returns the removed paths.

    Call it only where no other process is saving the same name at the same time (one
    Lightning run saves each name from global rank 0 alone).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "last.ckpt.tmp-123").write_bytes(b"half")
        4
        >>> [p.name for p in remove_stale_temporaries(folder / "last.ckpt")]
        ['last.ckpt.tmp-123']
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(path.parent.glob(f"{glob.escape(path.name)}{TMP_MARKER}*"))
    for leftover in stale:
        _remove(leftover)
    return stale


def fsync_directory(folder: str | Path) -> None:
    """Flush ``folder``'s entries (a rename is durable only once its directory is synced).

    Example:
        >>> fsync_directory(".")
    """
    with contextlib.suppress(OSError):  # not every platform/file system lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """``fsync`` every file in ``folder`` (recursively) and the folders themselves.

    Example:
        >>> import tempfile
        >>> fsync_tree(tempfile.mkdtemp())
    """
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_directory(root)


def _exchange(source: Path, target: Path) -> bool:
    """Atomically swap the names ``source`` and ``target`` (Linux ``renameat2``); ``False`` where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE)
    if result == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system or kernel cannot exchange
        return False
    raise OSError(errno, f"renameat2({str(source)!r}, {str(target)!r}, RENAME_EXCHANGE) failed: {os.strerror(errno)}")


def atomic_replace(source: str | Path, target: str | Path) -> None:
    """Put the finished file or folder ``source`` in place of ``target`` in one atomic step.

    ``target`` is, at every instant, either its previous content or ``source``'s. For a file,
    or a folder over nothing, that is ``os.replace``. A folder (or a file) over an existing
    folder, or a folder over a file, is exchanged (``renameat2(RENAME_EXCHANGE)``) and the old
    one removed; where exchange is unsupported the old one is renamed to ``name.old-<pid>``
    first (see :func:`recover_interrupted_replace`). The parent directory is synced.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "new").write_text("2"); (folder / "ckpt").write_text("1")
        1
        1
        >>> atomic_replace(folder / "new", folder / "ckpt"); (folder / "ckpt").read_text()
        '2'
    """
    source, target = Path(source), Path(target)
    if not (target.is_dir() or (source.is_dir() and target.exists())):
        os.replace(source, target)
    elif _exchange(source, target):
        _remove(source)  # now the old checkpoint
    else:
        aside = target.with_name(f"{target.name}{OLD_MARKER}{os.getpid()}")
        os.replace(target, aside)
        os.replace(source, target)
        _remove(aside)
    fsync_directory(target.parent)


def recover_interrupted_replace(target: str | Path) -> Path | None:
    """Undo a replace that died between its two renames (only where exchange is unsupported):
    if ``target`` is missing and ``name.old-*`` exists, rename it back; returns it, or ``None``.

    Example:
        >>> recover_interrupted_replace("no/such/checkpoint.ckpt") is None
        True
    """
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return None
    olds = sorted(target.parent.glob(f"{glob.escape(target.name)}{OLD_MARKER}*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return None
    os.replace(olds[-1], target)
    for extra in olds[:-1]:
        _remove(extra)
    return target


def _torch_save(checkpoint: dict[str, Any], file: BinaryIO) -> None:
    torch.save(checkpoint, file)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(file)`` into ``name.tmp-<pid>``, ``fsync`` it, then rename it to ``path``.

    Leftovers of earlier killed saves of ``path`` are removed first; on an error the
    temporary file is removed and ``path`` keeps its previous content. Returns ``path``.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "blob.bin"
        >>> atomic_write(target, lambda f: f.write(b"abc")).read_bytes()
        b'abc'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_replace(path)
    remove_stale_temporaries(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        atomic_replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are crash-safe: a temporary sibling, ``fsync``, one atomic rename.

    A run killed during a save leaves the previous checkpoint in place (and a ``name.tmp-<pid>``
    that the next save removes), so ``ckpt_path="last"`` resumes from a complete one.
    Remote paths (``s3://`` ...) keep Lightning's own transaction-based save.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(plugins=[AtomicCheckpointIO()], logger=False)  # any single-file strategy
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint(..., storage_options=...) is not supported: it writes local "
                f"files (got storage_options={storage_options!r}). Drop the argument, or use TorchCheckpointIO."
            )
        if not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_write(path, lambda file: _torch_save(checkpoint, file))

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        if _is_local_file_protocol(path):
            recover_interrupted_replace(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
