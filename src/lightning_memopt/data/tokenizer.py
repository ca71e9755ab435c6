"""Tokenizers built offline: a byte-level BPE trained on the corpus (cached), plain bytes, or a
local Hugging Face tokenizer folder.

All three come back as a ``transformers.PreTrainedTokenizerFast``, so the rest of the pipeline
(and the user) sees one interface: ``tokenizer(texts)``, ``len(tokenizer)``, ``decode``.

Example:
    >>> from lightning_memopt.data import build_tokenizer
    >>> tok = build_tokenizer("byte")
    >>> len(tok), tok.decode(tok("héllo")["input_ids"])
    (257, 'héllo')
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
# Bumped when the way a BPE is trained changes, so stale cache files are not reused.
_BPE_FORMAT = "bpe-v1"


def default_cache_dir() -> Path:
    """Where tokenizers and tokenised datasets are cached: ``$LIGHTNING_MEMOPT_CACHE``, else
    ``~/.cache/lightning_memopt``.

    Example:
        >>> default_cache_dir().name in ("lightning_memopt",) or "LIGHTNING_MEMOPT_CACHE" in os.environ
        True
    """
    env = os.environ.get("LIGHTNING_MEMOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_memopt"


def corpus_fingerprint(documents: Sequence[str]) -> str:
    """A short stable hash of the documents, used in cache file names.

    Example:
        >>> corpus_fingerprint(["a", "b"]) == corpus_fingerprint(["a", "b"]) != corpus_fingerprint(["ab"])
        True
    """
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(len(doc).to_bytes(8, "little"))
        digest.update(doc.encode("utf-8", errors="replace"))
    return digest.hexdigest()[:16]


def _wrap(tokenizer_object) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer over the 256 byte values plus an end-of-text token (vocabulary 257).

    It needs no training, so the tiniest runs start at once; text round-trips exactly.

    Example:
        >>> byte_tokenizer()("ab")["input_ids"]
        [64, 65]
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TOKEN])
    return _wrap(tokenizer)


def train_bpe_tokenizer(
    documents: Sequence[str], vocab_size: int = 4096, cache_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab_size`` entries trained on ``documents``, cached on disk.

    The cache file is named by the corpus fingerprint and the vocabulary size, so a second
    call with the same corpus loads it instead of training (training the pydoc corpus takes
    about a second). Writes are atomic, so ranks that race on a cold cache do not see half a file.

    Example:
        >>> import tempfile
        >>> tok = train_bpe_tokenizer(["the cat sat on the mat"] * 50, 300, cache_dir=tempfile.mkdtemp())
        >>> tok.decode(tok("the cat")["input_ids"])
        'the cat'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (at least 257); use 'byte'.")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"tokenizer-{_BPE_FORMAT}-{vocab_size}-{corpus_fingerprint(documents)}.json"
    if path.exists():
        return _wrap(Tokenizer.from_file(str(path)))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache, suffix=".tmp", delete=False) as tmp:
        tmp.write(tokenizer.to_str())
    os.replace(tmp.name, path)
    return _wrap(tokenizer)


def build_tokenizer(
    kind: str = "bpe",
    documents: Sequence[str] | None = None,
    vocab_size: int = 4096,
    cache_dir: str | Path | None = None,
) -> PreTrainedTokenizerBase:
    """``"bpe"`` (trained on ``documents``, see :func:`train_bpe_tokenizer`), ``"byte"``, or a
    local folder with a Hugging Face tokenizer (e.g. the MiniLM checkpoint's), loaded offline.

    Example:
        >>> import tempfile
        >>> tok = build_tokenizer("bpe", ["some text to learn merges from"] * 20, 280, tempfile.mkdtemp())
        >>> len(tok) <= 280, len(build_tokenizer("byte"))
        (True, 257)
    """
    if kind == "byte":
        return byte_tokenizer()
    if kind == "bpe":
        if not documents:
            raise ValueError("tokenizer='bpe' is trained on the corpus, but the corpus is empty.")
        return train_bpe_tokenizer(documents, vocab_size, cache_dir)
    path = Path(kind).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"tokenizer={kind!r} is neither 'bpe', 'byte' nor a folder holding a Hugging Face tokenizer "
            "(tokenizer.json / tokenizer_config.json)."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # The corpus is tokenised whole and then cut into blocks: silence the "longer than the
    # model's maximum length" warning, the blocks respect the model's length.
    tokenizer.model_max_length = int(1e30)
    if tokenizer.eos_token_id is None:
        # BERT-style tokenizers have no end-of-text token; their separator plays that role.
        tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
