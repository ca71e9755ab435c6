"""Early-exit heads: exit logits and losses against hand-computed references, gradients, the
confidence-threshold extremes, generation with a KV cache, training on real text, bad input."""

from __future__ import annotations

import copy
import pydoc_data.topics

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_memopt.layers import (
    add_early_exits,
    early_exit_forward,
    early_exit_generate,
    early_exit_loss,
    get_early_exits,
    layerskip_weights,
    remove_early_exits,
)
from lightning_memopt.models import build_llama

VOCAB, LAYERS = 257, 4


# Tiny tensors: one thread is as fast, and far faster on a shared, loaded machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    overrides.setdefault("num_hidden_layers", LAYERS)
    return build_llama("tiny", vocab_size=VOCAB, **overrides).eval()


def tokens(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def truncated(model: nn.Module, blocks: int) -> nn.Module:
    """The model cut after ``blocks`` blocks: the reference an exit must equal."""
    cut = copy.deepcopy(model)
    remove_early_exits(cut)
    cut.model.layers = cut.model.layers[:blocks]
    cut.config.num_hidden_layers = blocks
    return cut


def by_hand(model: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Embed, run blocks 0..layer, final norm, LM head: written out."""
    base = model.model
    hidden = base.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    cos_sin = base.rotary_emb(hidden, position_ids=positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    for block in base.layers[: layer + 1]:
        hidden = block(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
    return model.lm_head(base.norm(hidden))


# -- exit logits and losses --------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_exit_logits_equal_blocks_norm_head_by_hand(layer: int) -> None:
    model = tiny()
    exits = add_early_exits(model, [layer])
    ids = tokens()
    with torch.no_grad(), exits.capture() as hidden:
        model(ids)
        exit_logits = exits.heads[layer](hidden[layer])
        reference = truncated(model, layer + 1)(ids).logits
    assert torch.equal(exit_logits, reference)
    torch.testing.assert_close(exit_logits, by_hand(model, ids, layer), rtol=1e-5, atol=1e-5)


def test_loss_is_the_hand_computed_weighted_sum() -> None:
    model = tiny()
    add_early_exits(model, [0, 2])
    ids = tokens()
    out = early_exit_loss(model, ids)

    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    with torch.no_grad():
        losses = [ce(truncated(model, layer + 1)(ids).logits) for layer in (0, 2)] + [ce(model(ids).logits)]
    weights = layerskip_weights([0, 2], LAYERS)
    assert weights == pytest.approx([1 / 17, 6 / 17, 10 / 17])  # 1, 1+2+3 and 4 + (1+2+3), normalised
    torch.testing.assert_close(out.exit_losses[0], losses[0])
    torch.testing.assert_close(out.exit_losses[2], losses[1])
    torch.testing.assert_close(out.final_loss, losses[2])
    torch.testing.assert_close(out.final_loss, model(ids, labels=ids).loss)  # HF's own loss
    torch.testing.assert_close(out.loss, sum(w * loss for w, loss in zip(weights, losses)))


def test_fixed_weights_and_ignored_labels() -> None:
    model = tiny()
    add_early_exits(model, [1], loss_weights=[0.3, 0.7])
    ids = tokens()
    labels = ids.clone()
    labels[:, :5] = -100
    out = early_exit_loss(model, ids, labels)
    assert out.weights == {1: 0.3, "final": 0.7}
    torch.testing.assert_close(out.loss, 0.3 * out.exit_losses[1] + 0.7 * out.final_loss)
    torch.testing.assert_close(out.final_loss, model(ids, labels=labels).loss)


def test_exit_loss_trains_early_layers_only_and_checkpointing_changes_nothing() -> None:
    grads = []
    for checkpoint_heads in (True, False):
        model = tiny().train()
        add_early_exits(model, [1], checkpoint_heads=checkpoint_heads)
        early_exit_loss(model, tokens()).exit_losses[1].backward()
        blocks = model.model.layers
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks[0].parameters())
        assert all(p.grad is None for p in blocks[2].parameters())  # after the exit: untouched
        assert model.lm_head.weight.grad.abs().sum() > 0  # the shared head learns from the exit
        grads.append(blocks[0].mlp.down_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_checkpointed_heads_keep_no_logits_for_backward() -> None:
    """The exits' logits are rebuilt in backward: the memory autograd keeps grows by far less
    than one batch x seq x vocab logits tensor, against one or more per exit without it."""

    def saved_bytes(**kwargs) -> int:
        model = tiny().train()
        if kwargs:
            add_early_exits(model, [0, 1, 2], **kwargs)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:  # count each block of memory once
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if kwargs:
                early_exit_loss(model, ids)
            else:
                model(ids, labels=ids)
        return sum(storages.values())

    ids = tokens(batch=4, length=64)
    logits_bytes = ids.numel() * VOCAB * 4
    base = saved_bytes()
    checkpointed = saved_bytes(checkpoint_heads=True)
    kept = saved_bytes(checkpoint_heads=False)
    assert checkpointed - base < logits_bytes / 4, (base, checkpointed)
    assert kept - base > 3 * logits_bytes, (base, kept)


# -- own heads, curriculum, removal ------------------------------------------------------------------


def test_own_heads_are_copies_that_train_and_save() -> None:
    model = tiny(tie_word_embeddings=True)
    exits = add_early_exits(model, [1], share_head=False)
    head = model.early_exit_heads["1"]
    assert exits.heads[1] is head
    assert torch.equal(head.head.weight, model.lm_head.weight)
    assert head.head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied copy
    assert any(key.startswith("early_exit_heads.1.") for key in model.state_dict())
    early_exit_loss(model, tokens()).loss.backward()
    assert head.head.weight.grad is not None
    remove_early_exits(model)
    assert not any(key.startswith("early_exit_heads") for key in model.state_dict())


def test_remove_early_exits_restores_the_model() -> None:
    model = tiny()
    ids = tokens()
    before = model(ids).logits
    exits = add_early_exits(model, [1, 2])
    remove_early_exits(model)
    assert get_early_exits(model) is None
    assert all(not block._forward_hooks for block in exits.blocks)
    assert torch.equal(model(ids).logits, before)
    add_early_exits(model, [0])  # can be added again


def test_curricula() -> None:
    model = tiny(num_hidden_layers=6)
    rotational = add_early_exits(model, [1, 2, 3], curriculum="rotational", curriculum_steps=3)
    assert [rotational.active_exits(step) for step in range(4)] == [[1], [2], [3], [1]]
    out = early_exit_loss(model, tokens(), step=1)
    assert list(out.exit_losses) == [2]
    assert sum(out.weights.values()) == pytest.approx(1.0)


# -- inference ---------------------------------------------------------------------------------------


def test_threshold_extremes() -> None:
    model = tiny()
    add_early_exits(model, [1, 2])
    ids = tokens()
    never = early_exit_forward(model, ids, threshold=1.0, labels=ids)
    assert torch.equal(never.logits, model(ids).logits)
    assert (never.exit_layers == LAYERS - 1).all() and never.fraction_skipped == 0.0
    torch.testing.assert_close(never.loss, model(ids, labels=ids).loss)
    always = early_exit_forward(model, ids, threshold=0.0)
    assert (always.exit_layers == 1).all() and always.fraction_skipped == pytest.approx(0.5)
    torch.testing.assert_close(always.logits, truncated(model, 2)(ids).logits, rtol=0, atol=1e-6)


def test_generation_matches_full_model_and_teacher_forced_exits() -> None:
    model = tiny()
    add_early_exits(model, [0, 2])
    prompt = tokens(batch=2, length=6)
    full = early_exit_generate(model, prompt, max_new_tokens=8, threshold=1.0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(8):
            sequence = torch.cat([sequence, model(sequence).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(full.sequences, sequence)
    assert full.fraction_skipped == 0.0 and full.compute_saved == 0.0

    first = early_exit_generate(model, prompt, max_new_tokens=8, threshold=0.0)
    assert (first.exit_layers == 0).all() and first.fraction_skipped == pytest.approx(0.75)
    assert first.compute_saved == pytest.approx(0.75)  # no token ever went deeper

    # A threshold between the confidences: a mix of exits, and KV recomputation keeps it exact.
    with torch.no_grad(), get_early_exits(model).capture() as hidden:
        model(full.sequences)
        confidence = get_early_exits(model).heads[0](hidden[0]).softmax(-1).amax(-1)
    threshold = float(confidence[:, 5:].median())
    mixed = early_exit_generate(model, prompt, max_new_tokens=8, threshold=threshold)
    assert set(mixed.exit_layers.unique().tolist()) > {0}
    forced = early_exit_forward(model, mixed.sequences, threshold=threshold)
    assert torch.equal(forced.logits[:, 5:-1].argmax(-1), mixed.sequences[:, 6:])
    assert torch.equal(forced.exit_layers[:, 5:-1], mixed.exit_layers)
    assert 0 < mixed.block_evaluations <= mixed.full_block_evaluations


def test_generation_stops_at_eos() -> None:
    model = tiny()
    add_early_exits(model, [1])
    prompt = tokens(batch=1, length=4)
    first = int(early_exit_generate(model, prompt, max_new_tokens=1, threshold=0.0).sequences[0, -1])
    out = early_exit_generate(model, prompt, max_new_tokens=5, threshold=0.0, eos_token_id=first)
    assert out.sequences[0, 4:].tolist() == [first] * 5
    assert out.exit_layers[0].tolist() == [1, -1, -1, -1, -1]


# -- training on real text ---------------------------------------------------------------------------


def test_training_with_exits_lowers_the_early_exit_loss() -> None:
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, data.numel() - 65, (25, 8), generator=generator)
    batches = [torch.stack([data[s : s + 64] for s in row.tolist()]) for row in starts]
    model = tiny(hidden_size=64, intermediate_size=176, num_attention_heads=4).train()
    add_early_exits(model, [0, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    held_out = batches.pop()
    with torch.no_grad():
        before = early_exit_loss(model, held_out)
    for batch in batches:
        early_exit_loss(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = early_exit_loss(model, held_out)
    assert after.exit_losses[0] < before.exit_losses[0] - 1.0, (before.exit_losses, after.exit_losses)
    assert after.final_loss < before.final_loss - 1.0


# -- other decoders and bad input --------------------------------------------------------------------


def test_gpt2_style_decoder_is_found() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, n_positions=64)).eval()
    exits = add_early_exits(model, [0])
    assert exits.final_head.norm is model.transformer.ln_f
    ids = tokens()
    out = early_exit_loss(model, ids)
    torch.testing.assert_close(out.final_loss, model(ids, labels=ids).loss)
    never = early_exit_forward(model, ids, threshold=1.0)
    assert torch.equal(never.logits, model(ids).logits)
    with pytest.raises(ValueError, match="LLaMA-style"):
        early_exit_generate(model, ids, max_new_tokens=2, threshold=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit_layers": [4]}, r"exit layer 4 is out of range.*between 0 and 2"),
        ({"exit_layers": [-1]}, r"exit layer -1 is out of range"),
        ({"exit_layers": [3]}, r"exit layer 3 is the last block"),
        ({"exit_layers": [1, 1]}, r"lists \[1\] more than once.*\[1\]"),
        ({"exit_layers": [2, 1]}, r"increasing order; write \[1, 2\]"),
        ({"exit_layers": []}, r"exit_layers is empty"),
        ({"exit_layers": [1.0]}, r"not an int"),
        ({"exit_layers": [1, 2], "loss_weights": [0.5]}, r"has 1 values for 2 exits.*give 2.*or 3"),
        ({"exit_layers": [1], "loss_weights": [-1.0]}, r"finite and >= 0"),
        ({"exit_layers": [1], "loss_weights": "uniform"}, r"'uniform' is not known"),
        ({"exit_layers": [1], "curriculum": "random"}, r"curriculum='random'"),
    ],
)
def test_bad_input_raises_with_the_value_and_the_fix(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        add_early_exits(tiny(), **kwargs)


def test_bad_models_and_states_raise() -> None:
    model = tiny()
    add_early_exits(model, [1])
    with pytest.raises(ValueError, match=r"already has exits at \[1\].*remove_early_exits"):
        add_early_exits(model, [2])
    with pytest.raises(ValueError, match="no early exits"):
        early_exit_loss(tiny(), tokens())
    with pytest.raises(ValueError, match="transformer block"):
        add_early_exits(nn.Sequential(nn.Linear(2, 2)), [0])
    headless = nn.Sequential(nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    with pytest.raises(ValueError, match=r"no final norm found.*norm="):
        add_early_exits(headless, [0])


@pytest.mark.parametrize("checkpoint_heads", [True, False])
def test_the_models_training_loss_is_the_early_exit_objective_with_its_gradients(checkpoint_heads: bool) -> None:
    from lightning_memopt.layers import get_objective, last_loss_parts, last_model_loss

    model, reference = tiny().train(), tiny().train()
    for m in (model, reference):
        add_early_exits(m, [0, 2], loss_weights=[0.3, 0.5, 0.9], checkpoint_heads=checkpoint_heads)
    ids = tokens()
    loss = model(input_ids=ids, labels=ids).loss
    expected = early_exit_loss(reference, ids)
    torch.testing.assert_close(loss, expected.loss)
    torch.testing.assert_close(last_model_loss(model), expected.final_loss.detach())
    assert sorted(last_loss_parts(model)) == ["exit_0_loss", "exit_2_loss"]
    loss.backward()
    expected.loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)

    # transformers' shift_labels (already aligned): the same objective.
    shifted = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    torch.testing.assert_close(model(input_ids=ids, shift_labels=shifted, labels=ids).loss, loss.detach())
    remove_early_exits(model)
    assert get_objective(model) is None
