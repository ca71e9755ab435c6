"""Decoding with early exits: confidence exit (:func:`early_exit_generate`) and the decode loop
both it and self-speculative decoding (:mod:`.speculative`) run on.

The loop drives a LLaMA-style decoder's blocks one by one (so that a token can stop after any of
them) through transformers' public cache API: each block gets ``cache=`` a
:class:`transformers.DynamicCache` built from the model's config, whose layers each hold their
own length (a skipped block's keys and values are filled in later). It is lean on purpose, since
on a CPU a small model's decoding time is mostly per-call overhead: the rotary table is computed
once for every position the call can reach, the attention mask is only built for multi-token
chunks, the exit heads run on the last position only, and there is one host sync per exit tried.

Example:
    >>> import torch
    >>> from lightning_memopt.layers import add_early_exits
    >>> from lightning_memopt.models import build_llama
    >>> model = build_llama("tiny", vocab_size=257)
    >>> _ = add_early_exits(model, [1])
    >>> out = early_exit_generate(model, torch.zeros(1, 4, dtype=torch.long), max_new_tokens=3, threshold=0.0)
    >>> out.exit_layers.tolist(), out.tokens_per_s > 0
    ([[1, 1, 1]], True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .early_exit import EarlyExits, _never_exits, _require_exits, _tried_exits
from .exit_gates import ExitGates

__all__ = ["EarlyExitGenerateOutput", "early_exit_generate"]


class _Decoder:
    """The parts of a LLaMA-style decoder that a decode loop drives: the embedding, the blocks,
    a rotary table for positions ``0 .. max_positions - 1`` and the exits' heads."""

    def __init__(self, model: nn.Module, exits: EarlyExits, caller: str, max_positions: int) -> None:
        base = getattr(model, "model", None)
        parts = [getattr(base, name, None) for name in ("embed_tokens", "rotary_emb", "layers")]
        if any(part is None for part in parts):
            raise ValueError(
                f"{caller} drives LLaMA-style decoders (model.model.embed_tokens, .rotary_emb, .layers: Llama, "
                f"Mistral, Qwen2, ...); {type(model).__name__} is not one. Use early_exit_forward, which works with "
                "any model add_early_exits accepts."
            )
        embed, rotary, layers = parts
        if list(layers) != list(exits.blocks):
            raise ValueError(f"{caller}: the exits' blocks are not model.model.layers; it cannot drive them.")
        self.config = model.config
        self.blocks = list(layers)
        self.num_layers = len(self.blocks)
        weight = embed.weight
        # The embedding, the exits' heads and the blocks as plain ops where they are the stock
        # modules (results to the bit, tested): module calls are a large part of a token's time.
        plain_embedding = type(embed) is nn.Embedding and embed.max_norm is None
        self.embed = (lambda ids: F.embedding(ids, weight)) if plain_embedding else embed
        self.heads = {layer: _LeanHead.wrap(head) for layer, head in exits.heads.items()}
        self.final_head = _LeanHead.wrap(exits.final_head)
        # One rotary table for the whole call: slicing it is far cheaper than a rotary call per block.
        positions = torch.arange(max_positions, device=weight.device)[None]
        self.cos, self.sin = rotary(torch.zeros((), dtype=weight.dtype, device=weight.device), position_ids=positions)
        lean = getattr(self.config, "_attn_implementation", None) == "sdpa"
        self.lean = [_LeanLlamaBlock.wrap(block) if lean else None for block in self.blocks]
        # Multi-token chunks (prompts, deferred keys and values, verification) repeat their shapes
        # across blocks and steps: each mask is built once per call.
        self._masks: dict[tuple[int, int], torch.Tensor] = {}

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def block(self, layer: int, hidden: torch.Tensor, first: int, cache) -> torch.Tensor:
        """Run block ``layer`` on ``hidden`` (positions ``first ..``), appending to its cache."""
        length = hidden.shape[1]
        mask = None
        if length > 1:
            mask = self._masks.get((length, first))
            if mask is None:
                mask = self._masks[length, first] = _causal_mask(length, first, hidden.dtype, hidden.device)
        rotary = (self.cos[:, first : first + length], self.sin[:, first : first + length])
        lean = self.lean[layer]
        if lean is not None:
            return lean(hidden, mask, cache, rotary)
        out = self.blocks[layer](hidden, attention_mask=mask, cache=cache, position_embeddings=rotary)
        return out[0] if isinstance(out, (tuple, list)) else out


class _LeanLlamaBlock:
    """A ``LlamaDecoderLayer``'s inference forward, op for op as transformers 5 computes it with
    SDPA attention (so the results are the same to the bit), without the module machinery: no
    ``nn.Module`` calls, hooks, keyword plumbing or kernel-hub wrappers. On a CPU, that machinery
    is about a third of a small model's decoding time. The keys and values still go through the
    public cache API (``cache.update``).

    :meth:`wrap` returns ``None`` for anything else (another block class, a replaced linear or
    norm such as INT8 weights, grouped-query attention, biased projections of another family):
    those blocks run as modules.
    """

    def __init__(self, block: nn.Module) -> None:
        attn, mlp = block.self_attn, block.mlp
        self.layer_idx = attn.layer_idx
        self.heads, self.head_dim, self.scaling = attn.config.num_attention_heads, attn.head_dim, attn.scaling
        # Transposed views of the weights (no copies): F.linear without a bias is this matrix product
        # on the flattened input, and calling it directly skips linear's and matmul's dispatch layers.
        self.q, self.k, self.v, self.o = (m.weight.t() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
        self.gate, self.up, self.down = (m.weight.t() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.act = mlp.act_fn
        self.norm1, self.norm2 = block.input_layernorm, block.post_attention_layernorm

    @classmethod
    def wrap(cls, block: nn.Module) -> _LeanLlamaBlock | None:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm

        if type(block) is not LlamaDecoderLayer or type(block.mlp) is not LlamaMLP:
            return None
        attn = block.self_attn
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj)
        linears += (block.mlp.down_proj,)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            return None
        norms = (block.input_layernorm, block.post_attention_layernorm)
        if any(type(m) is not LlamaRMSNorm for m in norms) or attn.num_key_value_groups != 1:
            return None
        return cls(block)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache, rotary) -> torch.Tensor:
        batch, length, width = hidden.shape
        shape = (batch, length, -1, self.head_dim)
        # The residual stream as tokens x hidden: every projection is then one torch.mm.
        residual = hidden = hidden.reshape(batch * length, width)
        normed = _rms_norm(self.norm1, hidden)
        query = torch.mm(normed, self.q).view(shape).transpose(1, 2)
        key = torch.mm(normed, self.k).view(shape).transpose(1, 2)
        value = torch.mm(normed, self.v).view(shape).transpose(1, 2)
        cos, sin = rotary[0].unsqueeze(1), rotary[1].unsqueeze(1)
        # The rotary embedding of queries and keys in one pass (the same elementwise ops: same bits).
        both = torch.cat((query, key), dim=1)
        both = (both * cos) + (_rotate_half(both) * sin)
        query, key = both[:, : self.heads], both[:, self.heads :]
        key, value = cache.update(key, value, self.layer_idx)
        attn = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=self.scaling)
        attn = attn.transpose(1, 2).contiguous().view(batch * length, -1)
        hidden = residual + torch.mm(attn, self.o)
        residual = hidden
        normed = _rms_norm(self.norm2, hidden)
        mlp = torch.mm(self.act(torch.mm(normed, self.gate)) * torch.mm(normed, self.up), self.down)
        return (residual + mlp).view(batch, length, width)


class _LeanHead:
    """An exit (a LLaMA RMS norm, then a bias-free LM head) as ops, to the bit; :meth:`wrap`
    returns the module itself for anything else."""

    def __init__(self, head: nn.Module) -> None:
        self.norm, self.weight_t = head.norm, head.head.weight.t()

    @classmethod
    def wrap(cls, head: nn.Module) -> _LeanHead | nn.Module:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        linear = getattr(head, "head", None)
        if type(getattr(head, "norm", None)) is not LlamaRMSNorm or type(linear) is not nn.Linear:
            return head
        return cls(head) if linear.bias is None else head

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        flat = hidden.reshape(batch * length, width)
        return torch.mm(_rms_norm(self.norm, flat), self.weight_t).view(batch, length, -1)


def _rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    # LlamaRMSNorm.forward, written out (its casts are no-ops in float32: skipped, not called).
    dtype = hidden.dtype
    if dtype != torch.float32:
        hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * (hidden if dtype == torch.float32 else hidden.to(dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _causal_mask(chunk: int, prefix: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Explicit even for an empty prefix: SDPA's own is_causal aligns top-left, and eager attention
    # has none. Additive (0 / dtype min) so every attention implementation reads it alike.
    query = torch.arange(prefix, prefix + chunk, device=device)[:, None]
    key = torch.arange(prefix + chunk, device=device)[None, :]
    mask = torch.zeros(chunk, prefix + chunk, dtype=dtype, device=device)
    return mask.masked_fill(key > query, torch.finfo(dtype).min)[None, None]


def _check_decode_inputs(
    caller: str, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None
) -> None:
    """The checks every decode entry point makes (shape, length, padding)."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"{caller}: input_ids must be batch x length (length >= 1), got {tuple(input_ids.shape)}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{caller}: max_new_tokens={max_new_tokens!r}; use an int >= 1.")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"{caller}: attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; they must match."
            )
        if not bool(attention_mask.bool().all()):
            raise ValueError(
                f"{caller}: padded batches are not supported (attention_mask has zeros in rows "
                f"{(~attention_mask.bool()).any(1).nonzero().flatten().tolist()}); decode prompts of different "
                "lengths one at a time, unpadded (rows of one batch are decoded one after another anyway)."
            )


def _exit_rule(
    decoder: _Decoder, gates: ExitGates | None, layer: int, threshold: float
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """Exit ``layer``'s decision for one token: hidden state there (1 x 1 x hidden) -> the exit's
    logits if the token stops, else ``None``. With gates, the head runs only for a token that stops."""
    head = decoder.heads[layer]
    if gates is not None:
        fires = gates.decision(layer, threshold)
        return lambda last: head(last) if fires(last) else None

    def softmax_rule(last: torch.Tensor) -> torch.Tensor | None:
        logits = head(last)
        return logits if bool(logits.float().softmax(-1).amax() >= threshold) else None

    return softmax_rule


def _row_results_to_batch(
    rows: list[list[int]], input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None
) -> torch.Tensor:
    fill = eos_token_id if eos_token_id is not None else 0
    width = input_ids.shape[1] + max_new_tokens
    sequences = torch.full((len(rows), width), fill, dtype=input_ids.dtype, device=input_ids.device)
    for i, tokens in enumerate(rows):
        sequences[i, : len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    return sequences


@dataclass
class EarlyExitGenerateOutput:
    """What :func:`early_exit_generate` returns.

    Attributes:
        sequences: ``batch x (prompt + new)`` token ids (rows that stopped at ``eos`` are padded
            with it).
        exit_layers: ``batch x new``: the block index each new token exited at (``num_layers -
            1``: the final layer; ``-1``: not generated, after ``eos``).
        num_layers: the model's number of blocks.
        block_evaluations: (token, block) pairs computed after the prompt, recomputed keys and
            values of exited tokens included.
        full_block_evaluations: what the full model computes for the same tokens.
        new_tokens: tokens generated, all rows together.
        seconds: wall-clock time of the call (prompt processing included).

    Example:
        >>> out = EarlyExitGenerateOutput(torch.zeros(1, 3), torch.tensor([[1, 3]]), 4, 6, 8, 2, 0.5)
        >>> out.mean_layers_run, out.fraction_skipped, out.compute_saved, out.tokens_per_s
        (3.0, 0.25, 0.25, 4.0)
    """

    sequences: torch.Tensor
    exit_layers: torch.Tensor
    num_layers: int
    block_evaluations: int
    full_block_evaluations: int
    new_tokens: int = 0
    seconds: float = 0.0

    @property
    def mean_layers_run(self) -> float:
        """Blocks run per new token before its prediction, on average (the sequential depth)."""
        made = self.exit_layers[self.exit_layers >= 0]
        return float((made + 1).float().mean()) if made.numel() else 0.0

    @property
    def fraction_skipped(self) -> float:
        """The fraction of blocks a new token skips before its prediction, on average."""
        return 1.0 - self.mean_layers_run / self.num_layers if self.mean_layers_run else 0.0

    @property
    def compute_saved(self) -> float:
        """The fraction of block evaluations saved against the full model, after the deferred
        keys and values were recomputed (smaller than ``fraction_skipped``: a skipped layer is
        computed later, in one batch with the next token that goes deeper, unless no later token
        does)."""
        return 1.0 - self.block_evaluations / self.full_block_evaluations if self.full_block_evaluations else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per wall-clock second."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def early_exit_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    threshold: float,
    eos_token_id: int | None = None,
    *,
    exit_layers: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    gates: ExitGates | None = None,
) -> EarlyExitGenerateOutput:
    """Greedy decoding that stops each new token at the first confident exit, with a KV cache.

    Per sequence (rows are decoded one after another). A token whose exit at block ``e`` is
    confident (top softmax probability ``>= threshold``) skips blocks ``e + 1 ..``; their keys
    and values for it are computed when a later token first runs those blocks, in one batch
    with it (EE-LLM's KV recomputation). Every cached state is then the full model's, and the
    tokens are exactly those :func:`early_exit_forward` predicts on the output (up to float
    rounding). ``threshold >= 1`` is plain greedy decoding with the full model.

    Args:
        exit_layers: the exits to try (a subset of the model's; default all). With the softmax
            rule each exit tried costs a head evaluation, so fewer exits can be faster.
        attention_mask: optional; padding (zeros) is refused with a ``ValueError``.
        gates: learned exit decisions (:func:`~lightning_memopt.layers.fit_exit_gates`): a token
            exits where its gate's probability of agreeing with the final layer is at least
            ``threshold``, and an exit head runs only for tokens that exit (a gate costs two
            small matrix products), so trying every exit is cheap.

    LLaMA-style decoders only (``model.model.embed_tokens``, ``.rotary_emb``, ``.layers``:
    Llama, Mistral, Qwen2, ...), without padding in ``input_ids``.

    Example:
        >>> from lightning_memopt.layers import add_early_exits
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257)
        >>> _ = add_early_exits(model, [1])
        >>> out = early_exit_generate(model, torch.zeros(1, 4, dtype=torch.long), max_new_tokens=3, threshold=0.0)
        >>> out.sequences.shape, out.exit_layers.tolist()
        (torch.Size([1, 7]), [[1, 1, 1]])
    """
    start_time = time.perf_counter()
    caller = "early_exit_generate"
    exits = _require_exits(model, caller)
    _check_decode_inputs(caller, input_ids, max_new_tokens, attention_mask)
    tried = _tried_exits(exits, exit_layers, gates, caller)
    decoder = _Decoder(model, exits, caller, input_ids.shape[1] + max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        rows = [
            _generate_row(decoder, row[None], max_new_tokens, threshold, eos_token_id, sorted(tried), gates)
            for row in input_ids
        ]
    finally:
        model.train(was_training)
    sequences = _row_results_to_batch([tokens for tokens, _, _ in rows], input_ids, max_new_tokens, eos_token_id)
    layers_run = torch.full((len(rows), max_new_tokens), -1, dtype=torch.long)
    evaluations = made = 0
    for i, (_, row_exits, row_evals) in enumerate(rows):
        layers_run[i, : len(row_exits)] = torch.tensor(row_exits, dtype=torch.long)
        evaluations += row_evals
        made += len(row_exits)
    seconds = time.perf_counter() - start_time
    return EarlyExitGenerateOutput(
        sequences, layers_run, exits.num_layers, evaluations, made * exits.num_layers, made, seconds
    )


def _generate_row(
    decoder: _Decoder,
    prompt: torch.Tensor,
    max_new_tokens: int,
    threshold: float,
    eos_token_id: int | None,
    tried: list[int],
    gates: ExitGates | None,
) -> tuple[list[int], list[int], int]:
    num_layers = decoder.num_layers
    cache = decoder.new_cache()
    rules = {} if _never_exits(threshold) else {layer: _exit_rule(decoder, gates, layer, threshold) for layer in tried}
    tokens = prompt[0].tolist()
    # Positions start .. current (inclusive) whose deepest computed state is in `states`, each at
    # its own depth; every block l holds keys/values for positions 0 .. lengths[l] - 1.
    lengths = [0] * num_layers
    states: torch.Tensor | None = None
    start = 0

    # The prompt but its last token runs through every block: its keys and values are needed.
    if len(tokens) > 1:
        hidden = decoder.embed(prompt[:, :-1])
        for layer in range(num_layers):
            hidden = decoder.block(layer, hidden, 0, cache)
        start = len(tokens) - 1
        lengths = [start] * num_layers
    exit_layers: list[int] = []
    evaluations = 0
    current = prompt[:, -1:]
    for _ in range(max_new_tokens):
        position = len(tokens) - 1
        new = decoder.embed(current)
        states = new if states is None else torch.cat([states, new], dim=1)
        logits, exited_at = None, num_layers - 1
        for layer in range(num_layers):
            first = lengths[layer]  # positions first .. current still need this block
            offset = first - start
            out = decoder.block(layer, states[:, offset:], first, cache)
            lengths[layer] = position + 1
            evaluations += out.shape[1]
            states = out if offset == 0 else torch.cat([states[:, :offset], out], dim=1)
            if layer in rules:
                logits = rules[layer](out[:, -1:])
                if logits is not None:
                    exited_at = layer
                    break
        if logits is None:
            logits = decoder.final_head(states[:, -1:])
            start, states = position + 1, None  # every position is at full depth now
        exit_layers.append(exited_at)
        current = logits[:, -1].argmax(-1, keepdim=True)
        token = int(current)
        tokens.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
    return tokens, exit_layers, evaluations
