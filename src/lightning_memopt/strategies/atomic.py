"""Crash-safe checkpoint writes: a checkpoint path is either the previous complete checkpoint or the new one.

A run killed while it saves (preempted, out of memory, a node lost) must not leave a
half-written file or folder under the checkpoint's name: ``ckpt_path="last"`` and
``ModelCheckpoint``'s top-k bookkeeping would pick it and the resume would fail (or, worse,
load a folder with some shards missing). Everything here writes the checkpoint under its
own name inside a hidden staging folder beside it (``.tmp-<pid>/name``: the same directory's
file system, so the final rename is atomic), flushes it to disk (``fsync``), and only then
renames it into place. The staging folder's name holds neither the checkpoint's name nor
``.ckpt``, so nothing Lightning lists mistakes a leftover for a checkpoint: not
``ckpt_path="last"`` (names ``last*.ckpt``), nor ModelCheckpoint's versions, nor the SLURM
requeue resume (which takes the highest number in any name containing ``hpc_ckpt_``: a
``hpc_ckpt_3.ckpt.tmp-1234`` beside it would read as checkpoint 31234). Leftovers of a killed
save are removed by the next save of the same name.

- :func:`atomic_replace` swaps a finished file or folder into place. Replacing an existing
  folder (``last.ckpt/`` saved again) needs an atomic *exchange* of two names, which Linux
  offers (``renameat2(RENAME_EXCHANGE)``); elsewhere the old folder is first moved aside
  (``.tmp-<pid>/name.old``) and :func:`recover_interrupted_replace` restores it if the process died
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

STAGING_PREFIX = ".tmp-"  # the staging folder: .tmp-<pid>
OLD_SUFFIX = ".old"  # .tmp-<pid>/name.old: the previous checkpoint, moved aside (no renameat2)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_path(path: str | Path, pid: int | None = None) -> Path:
    """Where a save of ``path`` is written before it is renamed into place: ``.tmp-<pid>/name``
    in ``path``'s directory (the caller creates the ``.tmp-<pid>`` folder).

    Example:
        >>> staging_path("ckpts/last.ckpt", pid=42).as_posix()
        'ckpts/.tmp-42/last.ckpt'
    """
    path = Path(path)
    return path.parent / f"{STAGING_PREFIX}{os.getpid() if pid is None else pid}" / path.name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _staging_folders(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f"{STAGING_PREFIX}*") if p.is_dir())


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove what killed saves of ``path`` left behind (``.tmp-*/name``, and the staging folders
    they leave empty); returns the removed paths.

    Call it only where no other process is saving the same name at the same time (one
    Lightning run saves each name from global rank 0 alone).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / ".tmp-123").mkdir(); (folder / ".tmp-123" / "last.ckpt").write_bytes(b"half")
        4
        >>> [p.relative_to(folder).as_posix() for p in remove_stale_temporaries(folder / "last.ckpt")]
        ['.tmp-123/last.ckpt']
        >>> list(folder.iterdir())
        []
    """
    path = Path(path)
    stale = []
    for folder in _staging_folders(path):
        leftover = folder / path.name
        if leftover.exists() or leftover.is_symlink():
            _remove(leftover)
            stale.append(leftover)
        _remove_if_empty(folder)
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

    ``target`` is, at every instant, either its previous content or ``source``'s (which must
    be in the same file system, e.g. :func:`staging_path`). For a file, or a folder over
    nothing, that is ``os.replace``. A folder (or a file) over an existing folder, or a folder
    over a file, is exchanged (``renameat2(RENAME_EXCHANGE)``) and the old one removed; where
    exchange is unsupported the old one is first moved to ``.tmp-<pid>/name.old`` (see
    :func:`recover_interrupted_replace`). The parent directory is synced.

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
        aside = staging_path(target).with_name(target.name + OLD_SUFFIX)
        aside.parent.mkdir(exist_ok=True)
        os.replace(target, aside)
        os.replace(source, target)
        _remove(aside)
    fsync_directory(target.parent)


def recover_interrupted_replace(target: str | Path) -> Path | None:
    """Undo a replace that died between its two renames (only where exchange is unsupported):
    if ``target`` is missing and ``.tmp-*/name.old`` exists, move it back; returns it, or ``None``.

    Example:
        >>> recover_interrupted_replace("no/such/checkpoint.ckpt") is None
        True
    """
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return None
    olds = [f / (target.name + OLD_SUFFIX) for f in _staging_folders(target)]
    olds = sorted((p for p in olds if p.exists()), key=lambda p: p.stat().st_mtime)
    if not olds:
        return None
    os.replace(olds[-1], target)
    for extra in olds[:-1]:
        _remove(extra)
    return target


def _torch_save(checkpoint: dict[str, Any], file: BinaryIO) -> None:
    torch.save(checkpoint, file)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(file)`` into ``.tmp-<pid>/name``, ``fsync`` it, then rename it to ``path``.

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
    tmp = staging_path(path)
    tmp.parent.mkdir(exist_ok=True)
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        atomic_replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _remove_if_empty(tmp.parent)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are crash-safe: a temporary sibling, ``fsync``, one atomic rename.

    A run killed during a save leaves the previous checkpoint in place (and a ``.tmp-<pid>/name``
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
