"""``TextDataModule``: a local text corpus, tokenised once, cut into fixed-length blocks for
causal language modelling.

The pipeline (``datasets``): documents -> token ids (each document ends with the end-of-text
token) -> concatenated and cut into blocks of ``seq_len`` -> a seeded train/validation split ->
saved under the cache folder. A later run with the same corpus, tokenizer and block settings
loads the blocks from disk instead of tokenising again.

Example:
    >>> from lightning_memopt.data import TextDataModule
    >>> dm = TextDataModule(tokenizer="byte", seq_len=64, batch_size=4, max_chars=50_000)
    >>> dm.prepare_data(); dm.setup("fit")
    >>> next(iter(dm.train_dataloader()))["input_ids"].shape
    torch.Size([4, 64])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from .corpus import load_corpus
from .resumable import ResumableDataLoader
from .tokenizer import build_tokenizer, corpus_fingerprint, default_cache_dir

# Bumped when the block layout changes, so stale cached datasets are not reused.
_BLOCKS_FORMAT = "blocks-v1"


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide ``datasets``' per-map progress bars: Lightning's bar is the one users watch."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


class TextDataModule(LightningDataModule):
    """Causal-LM blocks from a local corpus, with a train/validation split.

    Args:
        sources: ``"pydoc"`` (the CPython documentation, the default), ``"stdlib"`` (the
            standard library's sources), a path to a text file, a folder of text files, or a
            ``datasets`` dataset saved with ``save_to_disk``; or a list of these.
        tokenizer: ``"bpe"`` (a byte-level BPE trained on the corpus and cached), ``"byte"``
            (257 symbols, no training), or a local Hugging Face tokenizer folder.
        bpe_vocab_size: the BPE's vocabulary size (``tokenizer="bpe"`` only).
        seq_len: tokens per block (the model's context length in training).
        batch_size: blocks per batch (per device).
        val_fraction: share of the blocks held out for validation (at least one block).
        max_chars: use only the first ``max_chars`` characters of the corpus (fast runs, tests).
        text_column: the text column of a saved ``datasets`` dataset.
        cache_dir: where tokenizers and tokenised blocks are cached (default
            ``$LIGHTNING_MEMOPT_CACHE`` or ``~/.cache/lightning_memopt``).
        num_workers: ``DataLoader`` worker processes.
        seed: seed of the train/validation split and of the training shuffle.
        prompts: what ``predict`` continues: a list of prompts, or a path to a text file
            with one prompt per line. ``None``: ``num_prompts`` held-out prompts, a line from
            the start of each of the first validation blocks.
        num_prompts: how many held-out prompts ``predict`` uses when ``prompts`` is ``None``.

    ``test`` uses the validation blocks. The training loader resumes mid-epoch: a checkpoint
    records the batches consumed, and ``fit(ckpt_path=...)`` continues with the next one
    (:class:`~lightning_memopt.data.resumable.ResumableDataLoader`).

    Example:
        >>> dm = TextDataModule(sources=["pydoc", "stdlib"], bpe_vocab_size=8192, seq_len=256)
        >>> dm.batch_size
        8
    """

    def __init__(
        self,
        sources: str | list[str] = "pydoc",
        tokenizer: str = "bpe",
        bpe_vocab_size: int = 4096,
        seq_len: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.05,
        max_chars: int | None = None,
        text_column: str = "text",
        cache_dir: str | None = None,
        num_workers: int = 0,
        seed: int = 1234,
        prompts: str | list[str] | None = None,
        num_prompts: int = 4,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {seq_len}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must lie strictly between 0 and 1, got {val_fraction}.")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}.")
        if num_prompts < 1:
            raise ValueError(f"data.num_prompts must be at least 1, got {num_prompts}.")
        if isinstance(prompts, str) and not Path(prompts).expanduser().is_file():
            raise ValueError(
                f"data.prompts={prompts!r} is not a file; give a text file with one prompt per line, "
                'or a list of prompts (--data.init_args.prompts=\'["def main(", "The for statement"]\').'
            )
        self.save_hyperparameters()
        self.sources = sources
        self.tokenizer_name = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_chars = max_chars
        self.text_column = text_column
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.num_workers = num_workers
        self.seed = seed
        self.prompts = prompts
        self.num_prompts = num_prompts
        self._train_loader: ResumableDataLoader | None = None
        self._documents: list[str] | None = None
        self._tokenizer = None
        self._splits = None

    # -- pieces, built lazily and shared ---------------------------------------------------------

    @property
    def documents(self) -> list[str]:
        """The corpus, read once."""
        if self._documents is None:
            self._documents = load_corpus(self.sources, self.max_chars, self.text_column)
        return self._documents

    @property
    def tokenizer(self):
        """The tokenizer (a ``PreTrainedTokenizerFast``), built or loaded from the cache once."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(
                self.tokenizer_name,
                self.documents if self.tokenizer_name == "bpe" else None,
                self.bpe_vocab_size,
                self.cache_dir,
            )
        return self._tokenizer

    @property
    def num_tokens(self) -> int:
        """The tokenizer's vocabulary size (what a model's embedding must hold)."""
        return len(self.tokenizer)

    def _blocks_path(self) -> Path:
        tokenizer = self.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        tokenizer_id = backend.to_str() if backend is not None else repr(self.tokenizer_name)
        key = corpus_fingerprint(
            [
                _BLOCKS_FORMAT,
                corpus_fingerprint(self.documents),
                corpus_fingerprint([tokenizer_id]),
                str(self.seq_len),
                repr(self.val_fraction),
                str(self.seed),
            ]
        )
        return self.cache_dir / f"{_BLOCKS_FORMAT}-{key}"

    def _build_blocks(self, path: Path) -> None:
        from datasets import Dataset

        tokenizer = self.tokenizer
        eos = tokenizer.eos_token_id
        seq_len = self.seq_len

        def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
            return {"input_ids": [[*row, eos] for row in ids]}

        def group(batch: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
            flat = [t for row in batch["input_ids"] for t in row]
            usable = len(flat) - len(flat) % seq_len
            return {"input_ids": [flat[i : i + seq_len] for i in range(0, usable, seq_len)]}

        with _quiet_datasets():
            docs = Dataset.from_dict({"text": self.documents})
            tokens = docs.map(tokenize, batched=True, remove_columns=["text"])
            # One batch for the whole corpus, so no tokens are lost at batch seams (the embedded
            # corpus is a few MB); large user corpora are grouped 2000 documents at a time.
            blocks = tokens.map(group, batched=True, batch_size=None if len(tokens) <= 20_000 else 2000)
            if len(blocks) < 2:
                raise ValueError(
                    f"the corpus gives {len(blocks)} block(s) of data.seq_len={seq_len} tokens; at least 2 are needed "
                    "(one for training, one for validation). Lower seq_len or raise max_chars."
                )
            n_val = max(1, round(len(blocks) * self.val_fraction))
            splits = blocks.train_test_split(test_size=n_val, seed=self.seed)
            splits["validation"] = splits.pop("test")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
            splits.save_to_disk(str(tmp))
        try:
            os.replace(tmp, path)
        except OSError:  # another rank won the race: its copy is the same
            shutil.rmtree(tmp, ignore_errors=True)

    # -- LightningDataModule hooks ---------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the tokenizer and the tokenised blocks into the cache (once, on local rank 0)."""
        path = self._blocks_path()
        if not path.exists():
            self._build_blocks(path)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached blocks (building them if ``prepare_data`` did not run)."""
        if self._splits is not None:
            return
        from datasets import load_from_disk

        path = self._blocks_path()
        if not path.exists():
            self._build_blocks(path)
        splits = load_from_disk(str(path))
        splits.set_format("torch", columns=["input_ids"])
        self._splits = splits

    def _split(self, name: str):
        if self._splits is None:
            self.setup()
        return self._splits[name]

    @property
    def train_dataset(self):
        """The training blocks (a ``datasets.Dataset`` of ``input_ids`` tensors)."""
        return self._split("train")

    @property
    def val_dataset(self):
        """The validation blocks."""
        return self._split("validation")

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training blocks (a seeded permutation per epoch), resumable mid-epoch."""
        self._train_loader = ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        return self._train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this once per batch as the training step takes it (it fetches one
        # batch ahead, so the loader's own count would run one ahead): what a checkpoint records.
        trainer = self.trainer
        if self._train_loader is not None and trainer is not None and trainer.training:
            self._train_loader.batch_consumed()
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def prompt_texts(self) -> list[str]:
        """The prompts ``predict`` continues (see ``prompts``).

        Example:
            >>> TextDataModule(tokenizer="byte", prompts=["def f(", "The"]).prompt_texts()
            ['def f(', 'The']
        """
        if isinstance(self.prompts, str):
            lines = Path(self.prompts).expanduser().read_text(encoding="utf-8").splitlines()
            texts = [line for line in lines if line.strip()]
        elif self.prompts is not None:
            texts = [str(p) for p in self.prompts if str(p)]
        else:
            texts = self._held_out_prompts()
        if not texts:
            raise ValueError(f"data.prompts={self.prompts!r} holds no prompt; give at least one non-empty line.")
        return texts

    def _held_out_prompts(self) -> list[str]:
        # A whole line from each validation block (blocks start mid-text; the first full line
        # reads as a prompt), cut at a word boundary: text the model never trained on. Blocks
        # too short to hold such a line give their own text instead.
        texts: list[str] = []
        fallback: list[str] = []
        blocks = self.val_dataset[: 50 * self.num_prompts]["input_ids"]
        for ids in blocks:
            text = self.tokenizer.decode(ids.tolist())
            line = next((ln.strip() for ln in text.splitlines()[1:] if len(ln.strip()) >= 24), "")
            if line:
                texts.append(line[:48].rsplit(" ", 1)[0] if len(line) > 48 else line)
            elif text.strip():
                fallback.append(" ".join(text.split())[:48])
            if len(texts) == self.num_prompts:
                return texts
        return (texts + fallback)[: self.num_prompts]

    def predict_dataloader(self) -> DataLoader:
        """One prompt per batch: ``{"prompt": str, "input_ids": 1 x length}`` (no padding)."""
        items = []
        for text in self.prompt_texts():
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"data.prompts: {text!r} tokenises to nothing; give a longer prompt.")
            items.append({"prompt": text, "input_ids": torch.tensor([ids], dtype=torch.long)})
        return DataLoader(items, batch_size=None)
