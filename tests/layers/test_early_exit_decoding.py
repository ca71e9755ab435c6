"""Decoding with early exits: self-speculative decoding is the full model's greedy output token for
token (against ``model.generate``) on random, trained and exit-equals-final models; confidence exit
through the public cache API; statistics; bad input."""

from __future__ import annotations

import copy
import pydoc_data.topics
import warnings

import pytest
import torch
from torch import nn

from lightning_memopt.layers import (
    add_early_exits,
    early_exit_forward,
    early_exit_generate,
    early_exit_loss,
    self_speculative_generate,
)
from lightning_memopt.models import build_llama

VOCAB = 257

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(seed: int = 0, layers: int = 4, exits: tuple[int, ...] = (0, 1, 2), **overrides) -> nn.Module:
    torch.manual_seed(seed)
    model = build_llama("tiny", vocab_size=VOCAB, num_hidden_layers=layers, **overrides).eval()
    add_early_exits(model, list(exits))
    return model


def prompts(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, 3 + 2 * i), generator=generator) for i in range(count)]


def greedy(model: nn.Module, prompt: torch.Tensor, new: int, eos: int | None = None) -> torch.Tensor:
    """Hugging Face's own greedy decoding, with its KV cache: the reference."""
    return model.generate(prompt, max_new_tokens=new, do_sample=False, use_cache=True, eos_token_id=eos, pad_token_id=0)


def silence_after(model: nn.Module, layer: int, scale: float) -> nn.Module:
    """Scale the residual branches of the blocks after ``layer``: at 0 they are identities, so the
    exit at ``layer`` equals the final layer exactly; small values make them agree mostly."""
    model = copy.deepcopy(model)
    for block in model.model.layers[layer + 1 :]:
        block.self_attn.o_proj.weight.data.mul_(scale)
        block.mlp.down_proj.weight.data.mul_(scale)
    return model


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A small LLaMA trained for a few dozen steps on the CPython docs' bytes, exits included."""
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny(hidden_size=64, intermediate_size=176, num_attention_heads=4, exits=(0, 1)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        starts = torch.randint(0, data.numel() - 65, (8,), generator=generator).tolist()
        early_exit_loss(model, torch.stack([data[s : s + 64] for s in starts])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.set_num_threads(threads)
    return model.eval()


def text_prompts(count: int = 3) -> list[torch.Tensor]:
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)).encode("utf-8")
    return [torch.tensor([list(text[1000 * (i + 1) : 1000 * (i + 1) + 12])]) for i in range(count)]


# -- lossless: the full model's greedy output --------------------------------------------------------


@pytest.mark.parametrize(("exit_layer", "draft"), [(0, 1), (1, 3), (2, 5)])
def test_self_speculative_equals_greedy_on_a_random_model(exit_layer: int, draft: int) -> None:
    model = tiny()
    for prompt in prompts():
        out = self_speculative_generate(model, prompt, 12, exit_layer, num_draft_tokens=draft)
        assert torch.equal(out.sequences, greedy(model, prompt, 12))
        assert out.new_tokens == 12 and 0 <= out.accepted_tokens <= out.drafted_tokens


@pytest.mark.parametrize(("exit_layer", "draft"), [(0, 2), (1, 4), (1, 1)])
def test_self_speculative_equals_greedy_on_a_trained_model(trained: nn.Module, exit_layer: int, draft: int) -> None:
    accepted = 0
    for prompt in text_prompts():
        out = self_speculative_generate(trained, prompt, 24, exit_layer, num_draft_tokens=draft)
        assert torch.equal(out.sequences, greedy(trained, prompt, 24))
        accepted += out.accepted_tokens
    assert accepted > 0  # trained exits agree with the final layer some of the time: rounds keep drafts


def test_draft_confidence_ends_drafts_early_and_stays_lossless(trained: nn.Module) -> None:
    drafted = {}
    for confidence in (0.0, 0.5):
        drafted[confidence] = 0
        for prompt in text_prompts():
            out = self_speculative_generate(trained, prompt, 24, 1, num_draft_tokens=6, draft_confidence=confidence)
            assert torch.equal(out.sequences, greedy(trained, prompt, 24))
            drafted[confidence] += out.drafted_tokens
    assert drafted[0.5] < drafted[0.0]


def test_exit_equal_to_final_accepts_every_draft_and_crops_rejections() -> None:
    base = tiny()
    same = silence_after(base, 1, 0.0)
    prompt = prompts(1)[0]
    out = self_speculative_generate(same, prompt, 13, exit_layer=1, num_draft_tokens=4)
    assert torch.equal(out.sequences, greedy(same, prompt, 13))
    assert out.acceptance_rate == 1.0
    # 1 token from the prompt's pass, then rounds of 4 drafts + the bonus token: 1 + 5 + 5 + (1 + 1).
    assert (out.verify_passes, out.drafted_tokens, out.tokens_per_pass) == (4, 9, 13 / 4)
    # Mostly agreeing: some drafts rejected (their keys and values cropped), output still exact.
    close = silence_after(base, 1, 0.3)
    rates = []
    for prompt in prompts(4, seed=3):
        out = self_speculative_generate(close, prompt, 20, exit_layer=1, num_draft_tokens=3)
        assert torch.equal(out.sequences, greedy(close, prompt, 20))
        rates.append(out.acceptance_rate)
    assert min(rates) > 0 and max(rates) <= 1 and min(rates) < 1, rates


def test_batches_are_decoded_row_by_row_and_eos_stops_a_row() -> None:
    model = silence_after(tiny(), 1, 0.3)
    batch = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(5))
    out = self_speculative_generate(model, batch, 10, exit_layer=1, num_draft_tokens=2)
    rows = torch.cat([greedy(model, row[None], 10) for row in batch])
    assert torch.equal(out.sequences, rows)
    assert out.new_tokens == 30
    eos = int(rows[0, 7])  # the third new token of row 0
    stopped = self_speculative_generate(model, batch[:1], 10, exit_layer=1, num_draft_tokens=4, eos_token_id=eos)
    reference = greedy(model, batch[:1], 10, eos=eos)
    first = (reference[0, 5:] == eos).nonzero()[0, 0] + 6
    assert torch.equal(stopped.sequences[0, :first], reference[0, :first])
    assert (stopped.sequences[0, first:] == eos).all() and stopped.new_tokens == first - 5


def test_no_deprecation_warnings_from_the_cache_api() -> None:
    model = silence_after(tiny(), 1, 0.3)
    prompt = prompts(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' past_key_values deprecation is a FutureWarning
        self_speculative_generate(model, prompt, 6, exit_layer=1, num_draft_tokens=2)
        early_exit_generate(model, prompt, 6, threshold=0.5)


# -- confidence exit -----------------------------------------------------------------------------


def test_confidence_exit_full_depth_is_greedy_and_reports_speed() -> None:
    model = tiny()
    prompt = prompts(1)[0]
    out = early_exit_generate(model, prompt, 10, threshold=1.0)
    assert torch.equal(out.sequences, greedy(model, prompt, 10))
    assert out.new_tokens == 10 and out.seconds > 0 and out.tokens_per_s == pytest.approx(10 / out.seconds)
    # Equal exit and final: the first exit is always confident at threshold 0 and gives the same tokens.
    same = silence_after(model, 0, 0.0)
    first = early_exit_generate(same, prompt, 10, threshold=0.0, exit_layers=[0])
    assert torch.equal(first.sequences, greedy(same, prompt, 10)) and (first.exit_layers == 0).all()
    second = early_exit_generate(model, prompt, 10, threshold=0.0, exit_layers=[1])
    assert (second.exit_layers == 1).all()
    # Teacher forced, the same subset of exits: exactly the generated tokens.
    forced = early_exit_forward(model, second.sequences, threshold=0.0, exit_layers=[1])
    assert (forced.exit_layers == 1).all()
    assert torch.equal(forced.logits[:, prompt.shape[1] - 1 : -1].argmax(-1), second.sequences[:, prompt.shape[1] :])


def test_old_import_path_still_works() -> None:
    from lightning_memopt.layers import early_exit as module

    assert module.early_exit_generate is early_exit_generate


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit_layer": 3}, r"exit_layer=3 is out of range; the model has 4 blocks and exits at \[0, 2\]"),
        ({"exit_layer": -1}, r"exit_layer=-1 is out of range"),
        ({"exit_layer": 1}, r"exit_layer=1 is not an exit of the model; its exits are \[0, 2\]"),
        ({"exit_layer": 0.0}, r"exit_layer=0.0 is not an int"),
        ({"exit_layer": 0, "num_draft_tokens": 0}, r"num_draft_tokens=0; use an int >= 1"),
        ({"exit_layer": 0, "draft_confidence": 1.5}, r"draft_confidence=1.5; use a probability in \[0, 1\]"),
        ({"exit_layer": 0, "max_new_tokens": 0}, r"max_new_tokens=0; use an int >= 1"),
        ({"exit_layer": 0, "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}, r"padded batches.*\[0\]"),
    ],
)
def test_bad_input_raises_with_the_value_and_the_fix(kwargs, message) -> None:
    model = tiny(exits=(0, 2))
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(ValueError, match=message):
        self_speculative_generate(model, torch.zeros(2, 4, dtype=torch.long), **kwargs)


def test_bad_confidence_exit_input_raises() -> None:
    model = tiny(exits=(0, 2))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"exit_layers=\[1\] names \[1\], which are not exits.*\[0, 2\]"):
        early_exit_generate(model, ids, 4, threshold=0.5, exit_layers=[1])
    with pytest.raises(ValueError, match=r"early_exit_forward: exit_layers=\[3\] names \[3\]"):
        early_exit_forward(model, ids, threshold=0.5, exit_layers=[3])
    with pytest.raises(ValueError, match="padded batches"):
        early_exit_generate(model, ids, 4, threshold=0.5, attention_mask=torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="no early exits"):
        self_speculative_generate(build_llama("tiny", vocab_size=VOCAB), ids, 4, exit_layer=0)


def test_lean_block_is_the_llama_block_to_the_bit() -> None:
    from transformers import DynamicCache

    from lightning_memopt.layers.early_exit_decoding import _Decoder, _LeanHead, _LeanLlamaBlock

    model = tiny()
    decoder = _Decoder(model, model._memopt_early_exits, "test", 16)
    assert all(isinstance(lean, _LeanLlamaBlock) for lean in decoder.lean)
    hidden = torch.randn(1, 5, 256, generator=torch.Generator().manual_seed(0))
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    outputs = []
    for cache, lean in zip(caches, (decoder.lean, [None] * decoder.num_layers)):
        decoder.lean = lean
        with torch.no_grad():
            first = decoder.block(0, hidden, 0, cache)  # a chunk from position 0 (causal mask)
            second = decoder.block(0, hidden[:, :1], 5, cache)  # one more token against the cache
        outputs.append((first, second, cache.layers[0].keys))
    for lean_out, module_out in zip(*outputs):
        assert torch.equal(lean_out, module_out)
    # The exits' heads, the final head and the embedding as plain ops: the modules' results, to the bit.
    exits = model._memopt_early_exits
    assert all(isinstance(decoder.heads[layer], _LeanHead) for layer in exits.exit_layers)
    assert isinstance(decoder.final_head, _LeanHead)
    with torch.no_grad():
        for layer in exits.exit_layers:
            assert torch.equal(decoder.heads[layer](hidden), exits.heads[layer](hidden))
            assert torch.equal(decoder.heads[layer](hidden[:, -1:]), exits.heads[layer](hidden[:, -1:]))
        assert torch.equal(decoder.final_head(hidden), exits.final_head(hidden))
        ids = torch.tensor([[3, 1, 4, 1, 5]])
        assert torch.equal(decoder.embed(ids), model.model.embed_tokens(ids))
    # Anything but a plain LLaMA block (here an INT8-style replaced linear) runs as a module.
    model.model.layers[1].mlp.up_proj = nn.Sequential(model.model.layers[1].mlp.up_proj)
    assert _LeanLlamaBlock.wrap(model.model.layers[1]) is None
