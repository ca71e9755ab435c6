"""The embedded text corpus: documents that ship with every Python, so nothing is downloaded.

``"pydoc"`` is the CPython documentation's topic pages (``pydoc_data.topics``: English prose
with code samples, about 0.5 MB); ``"stdlib"`` is the standard library's own top-level ``.py``
sources (code, a few MB). A user's own text comes in as a path: a text file, a folder of text
files, or a ``datasets`` dataset saved with ``save_to_disk``.

Example:
    >>> from lightning_memopt.data import load_corpus
    >>> docs = load_corpus("pydoc", max_chars=20_000)
    >>> sum(len(d) for d in docs) <= 20_000
    True
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

# Suffixes read from a folder of the user's text files.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl")
BUILTIN_SOURCES = ("pydoc", "stdlib")


def pydoc_documents() -> list[str]:
    """The CPython documentation's topic pages, one document each, in a fixed order.

    Example:
        >>> docs = pydoc_documents()
        >>> len(docs) > 50 and all(isinstance(d, str) for d in docs)
        True
    """
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def stdlib_documents() -> list[str]:
    """The standard library's top-level ``.py`` sources, one document per file, sorted by name.

    Example:
        >>> any("def " in d for d in stdlib_documents()[:5])
        True
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def path_documents(path: str | Path, text_column: str = "text") -> list[str]:
    """Documents from a user path: a text file (one document), a folder of text files
    (one document per file, recursively), or a ``datasets`` dataset saved with ``save_to_disk``
    (the ``text_column`` of its rows; the ``train`` split of a ``DatasetDict``).

    Raises:
        FileNotFoundError: when the path does not exist or holds no text.
        ValueError: when a saved dataset has no ``text_column``.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.txt").write_text("hello world")
        >>> path_documents(folder)
        ['hello world']
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data source {str(path)!r} does not exist; give 'pydoc', 'stdlib', a text file, a folder of text "
            "files, or a dataset saved with datasets' save_to_disk."
        )
    if _is_saved_dataset(path):
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(path))
        if isinstance(dataset, DatasetDict):
            dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
        if text_column not in dataset.column_names:
            raise ValueError(
                f"dataset at {str(path)!r} has no column {text_column!r}; its columns are {dataset.column_names}. "
                "Set the data module's text_column."
            )
        return [t for t in dataset[text_column] if t]
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"folder {str(path)!r} holds no text files (looked for {', '.join(TEXT_SUFFIXES)}).")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def load_corpus(
    sources: str | Sequence[str] = "pydoc", max_chars: int | None = None, text_column: str = "text"
) -> list[str]:
    """The documents of ``sources`` in order, cut to ``max_chars`` characters in all.

    ``sources``: ``"pydoc"``, ``"stdlib"``, a path (see :func:`path_documents`), or a list of these.

    Example:
        >>> docs = load_corpus(["pydoc", "stdlib"], max_chars=1000)
        >>> sum(map(len, docs))
        1000
    """
    names = [sources] if isinstance(sources, str) else list(sources)
    if not names:
        raise ValueError("data sources are empty; give at least one of 'pydoc', 'stdlib' or a path.")
    documents: list[str] = []
    for name in names:
        if name == "pydoc":
            documents += pydoc_documents()
        elif name == "stdlib":
            documents += stdlib_documents()
        else:
            documents += path_documents(name, text_column)
    return _truncate(documents, max_chars)


def _truncate(documents: Iterable[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return list(documents)
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}.")
    kept: list[str] = []
    left = max_chars
    for doc in documents:
        if left <= 0:
            break
        kept.append(doc[:left])
        left -= len(kept[-1])
    return kept
