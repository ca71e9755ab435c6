"""Self-speculative decoding (LayerSkip, arXiv 2404.16710): lossless, faster greedy decoding with
a model's own early exit as the draft model.

Each round drafts ``num_draft_tokens`` tokens greedily with blocks ``0 .. exit_layer`` and that
exit's head, then verifies them with blocks ``exit_layer + 1 ..`` and the final head in **one**
pass. The verification starts from the draft's hidden states at ``exit_layer`` and the draft's
keys and values of blocks ``0 .. exit_layer`` are kept (LayerSkip's cache reuse): the shared
blocks run once per token, as in plain decoding. The agreed prefix of the draft is kept, plus the
full model's next token (a correction, or a bonus token when every draft token was right), and
the rejected tokens' keys and values are cropped from the cache. Every kept token is the full
model's greedy choice: the output is the full model's greedy output, only faster when the exit
agrees with the final layer often enough.

Example:
    >>> import torch
    >>> from lightning_memopt.layers import add_early_exits
    >>> from lightning_memopt.models import build_llama
    >>> model = build_llama("tiny", vocab_size=257, num_hidden_layers=4)
    >>> _ = add_early_exits(model, [1])
    >>> prompt = torch.randint(0, 257, (1, 5))
    >>> out = self_speculative_generate(model, prompt, max_new_tokens=6, exit_layer=1)
    >>> out.sequences.shape, 0.0 <= out.acceptance_rate <= 1.0
    (torch.Size([1, 11]), True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .early_exit import _require_exits
from .early_exit_decoding import _check_decode_inputs, _Decoder, _row_results_to_batch

__all__ = ["SelfSpeculativeOutput", "self_speculative_generate"]


@dataclass
class SelfSpeculativeOutput:
    """What :func:`self_speculative_generate` returns.

    Attributes:
        sequences: ``batch x (prompt + new)`` token ids: the full model's greedy output (rows that
            stopped at ``eos`` are padded with it).
        exit_layer: the exit that drafted.
        num_draft_tokens: the draft length asked for.
        drafted_tokens: draft tokens proposed, all rows together.
        accepted_tokens: draft tokens the full model agreed with.
        new_tokens: tokens generated.
        verify_passes: verification passes (rounds); ``new_tokens / verify_passes`` tokens per pass.
        seconds: wall-clock time of the call (prompt processing included).

    Example:
        >>> out = SelfSpeculativeOutput(torch.zeros(1, 9), 1, 4, drafted_tokens=8, accepted_tokens=6,
        ...                             new_tokens=8, verify_passes=2, seconds=0.5)
        >>> out.acceptance_rate, out.tokens_per_pass, out.tokens_per_s
        (0.75, 4.0, 16.0)
    """

    sequences: torch.Tensor
    exit_layer: int
    num_draft_tokens: int
    drafted_tokens: int
    accepted_tokens: int
    new_tokens: int
    verify_passes: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        """The fraction of draft tokens the full model accepted."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per verification pass of the deep blocks (1.0 for plain decoding)."""
        return self.new_tokens / self.verify_passes if self.verify_passes else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per wall-clock second."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def self_speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    exit_layer: int,
    num_draft_tokens: int = 4,
    eos_token_id: int | None = None,
    *,
    draft_confidence: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> SelfSpeculativeOutput:
    """Greedy decoding, drafted by the exit at ``exit_layer`` and verified by the full model.

    The output equals the full model's greedy decoding (``model.generate(do_sample=False)``)
    token for token, up to float rounding: verification runs the deep blocks on several tokens
    at once, whose matrix products may round differently from one token at a time, which can
    only matter where the top two logits tie to the last bits.

    Args:
        model: a LLaMA-style causal LM with exits (:func:`add_early_exits`).
        input_ids: ``batch x length`` prompts without padding; rows are decoded one after another.
        max_new_tokens: tokens to generate per row (fewer if ``eos_token_id`` comes first).
        exit_layer: the exit that drafts: one of the model's exit layers.
        num_draft_tokens: tokens drafted per round (>= 1).
        eos_token_id: stop a row after this token.
        draft_confidence: end a round's draft early after a token whose top exit probability is
            below this (0: always draft ``num_draft_tokens``). A draft token the exit is unsure of
            is likely rejected, and every token drafted after it is wasted work.
        attention_mask: optional; padding (zeros) is refused with a ``ValueError``.

    Raises:
        ValueError: for an ``exit_layer`` that is out of range or not an exit, ``num_draft_tokens
            < 1``, a padded batch, or a model that is not a LLaMA-style decoder.

    Example:
        >>> from lightning_memopt.layers import add_early_exits
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257, num_hidden_layers=4).eval()
        >>> _ = add_early_exits(model, [1, 2])
        >>> prompt = torch.randint(0, 257, (1, 5))
        >>> out = self_speculative_generate(model, prompt, max_new_tokens=8, exit_layer=2, num_draft_tokens=3)
        >>> reference = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, eos_token_id=None)
        >>> torch.equal(out.sequences, reference)
        True
    """
    start_time = time.perf_counter()
    caller = "self_speculative_generate"
    exits = _require_exits(model, caller)
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
        raise ValueError(f"{caller}: exit_layer={exit_layer!r} is not an int; use one of {list(exits.exit_layers)}.")
    if not 0 <= exit_layer < exits.num_layers - 1:
        raise ValueError(
            f"{caller}: exit_layer={exit_layer} is out of range; the model has {exits.num_layers} blocks and exits "
            f"at {list(exits.exit_layers)}: use one of those."
        )
    if exit_layer not in exits.exit_layers:
        raise ValueError(
            f"{caller}: exit_layer={exit_layer} is not an exit of the model; its exits are "
            f"{list(exits.exit_layers)} (or add one with add_early_exits)."
        )
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"{caller}: num_draft_tokens={num_draft_tokens!r}; use an int >= 1 (4 is a good start).")
    if not 0.0 <= draft_confidence <= 1.0:
        raise ValueError(f"{caller}: draft_confidence={draft_confidence!r}; use a probability in [0, 1] (0: off).")
    _check_decode_inputs(caller, input_ids, max_new_tokens, attention_mask)
    decoder = _Decoder(model, exits, caller, input_ids.shape[1] + max_new_tokens + num_draft_tokens + 1)
    was_training = model.training
    model.eval()
    totals = [0, 0, 0, 0]  # drafted, accepted, new, passes
    rows: list[list[int]] = []
    try:
        for row in input_ids:
            tokens, *stats = _speculate_row(
                decoder, row[None], max_new_tokens, exit_layer, num_draft_tokens, eos_token_id, draft_confidence
            )
            rows.append(tokens)
            totals = [a + b for a, b in zip(totals, stats)]
    finally:
        model.train(was_training)
    sequences = _row_results_to_batch(rows, input_ids, max_new_tokens, eos_token_id)
    seconds = time.perf_counter() - start_time
    return SelfSpeculativeOutput(sequences, exit_layer, num_draft_tokens, *totals, seconds)


def _speculate_row(
    decoder: _Decoder,
    prompt: torch.Tensor,
    max_new_tokens: int,
    exit_layer: int,
    num_draft: int,
    eos_token_id: int | None,
    draft_confidence: float = 0.0,
) -> tuple[list[int], int, int, int, int]:
    num_layers = decoder.num_layers
    draft_head, final_head = decoder.heads[exit_layer], decoder.final_head
    cache = decoder.new_cache()
    # The prompt through the full model: its last position gives the first new token.
    hidden = decoder.embed(prompt)
    for layer in range(num_layers):
        hidden = decoder.block(layer, hidden, 0, cache)
    pending = final_head(hidden[:, -1:]).argmax(-1)  # 1 x 1: the next token, not yet run
    tokens = prompt[0].tolist()
    tokens.append(int(pending))
    new, drafted, accepted, passes = 1, 0, 0, 1
    done = eos_token_id is not None and tokens[-1] == eos_token_id
    while not done and new < max_new_tokens:
        # Invariant: every block caches positions 0 .. n - 2; token n - 1 (`pending`) is next.
        n = len(tokens)
        k = min(num_draft, max_new_tokens - new - 1)  # a round makes at most k + 1 tokens
        draft: list[torch.Tensor] = []
        states: list[torch.Tensor] = []
        current = pending
        i = 0
        while True:
            # Draft blocks for `current` (the pending token, then each draft token). The last
            # draft token runs them too, without the head, so that verification yields the bonus.
            hidden = decoder.embed(current)
            for layer in range(exit_layer + 1):
                hidden = decoder.block(layer, hidden, n - 1 + i, cache)
            states.append(hidden)
            if i == k:
                break
            logits = draft_head(hidden)
            current = logits.argmax(-1)
            draft.append(current)
            i += 1
            if draft_confidence > 0 and float(logits[0, -1].float().softmax(-1).max()) < draft_confidence:
                k = i  # unsure: verify what we have rather than draft on a likely-wrong token
        # Verify: the deep blocks on all k + 1 positions at once, from the draft's hidden states.
        hidden = torch.cat(states, dim=1)
        for layer in range(exit_layer + 1, num_layers):
            hidden = decoder.block(layer, hidden, n - 1, cache)
        full = final_head(hidden)[0].argmax(-1).tolist()  # the full model's token after each position
        proposed = torch.cat(draft, dim=1)[0].tolist() if draft else []  # one host sync for the round
        agreed = 0
        while agreed < k and proposed[agreed] == full[agreed]:
            agreed += 1
        drafted, accepted, passes = drafted + k, accepted + agreed, passes + 1
        # Keep positions 0 .. n - 1 + agreed: the pending token and the agreed drafts. Rejected
        # drafts' keys and values go (the final token of the round is the next pending one).
        if k > agreed:
            cache.crop(-(k - agreed))
        for token in [*proposed[:agreed], full[agreed]]:
            tokens.append(token)
            new += 1
            if eos_token_id is not None and token == eos_token_id:
                done = True
                break
        pending = torch.tensor([[full[agreed]]], dtype=prompt.dtype, device=prompt.device)
    return tokens, drafted, accepted, new, passes
