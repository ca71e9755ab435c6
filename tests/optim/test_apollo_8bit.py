"""APOLLO(adamw_8bit=True): the full-rank parameters' AdamW moments in 8 bits.

The reference is bitsandbytes' own ``AdamW8bit`` (the same blockwise kernel): on the parameters
APOLLO leaves to AdamW, both must give identical weights. The state must stay tensors only,
load with ``weights_only=True`` and resume bit for bit.
"""

from __future__ import annotations

import io

import pytest
import torch

from lightning_memopt.optim import APOLLOMini, apollo_param_groups

bnb = pytest.importorskip("bitsandbytes", reason="adamw_8bit needs bitsandbytes (a dependency)")
pytestmark = pytest.mark.usefixtures("single_thread")


# None: each tensor in one kernel call; 1024, 1280 elements: the CPU update goes slice by slice
# (4 or 5 quantisation blocks, the last slice shorter) and must give the same bits.
@pytest.mark.parametrize("cpu_chunk", [None, 1024, 1280])
def test_8bit_params_match_bitsandbytes_adamw8bit(make_llama, make_batches, train_step, monkeypatch, cpu_chunk):
    if cpu_chunk is not None:
        monkeypatch.setattr("lightning_memopt.optim.kernels.CPU_8BIT_CHUNK", cpu_chunk)
    batches = make_batches(4, 2, 16)
    ours_model, ref_model = make_llama(seed=0), make_llama(seed=0)
    # Only the 8-bit parameters (embeddings, head) train, so that both optimizers see the same
    # gradients (bitsandbytes' 32-bit kernel for small tensors is not torch's fused AdamW).
    for model in (ours_model, ref_model):
        for p in model.parameters():
            p.requires_grad_(p.numel() >= 4096 and p.dim() == 2 and p.shape[0] == 256)
    options = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    trained = [[p for p in m.parameters() if p.requires_grad] for m in (ours_model, ref_model)]
    assert len(trained[0]) == 2  # embed_tokens and lm_head (vocab 256)
    ours = APOLLOMini([{"params": trained[0], "low_rank": False}], adamw_8bit=True, **options)
    reference = bnb.optim.AdamW8bit(trained[1], min_8bit_size=4096, **options)
    for tokens in batches:
        train_step(ours_model, ours, tokens)
        train_step(ref_model, reference, tokens)
    assert ours.state[trained[0][0]]["state1"].dtype == torch.uint8  # the 8-bit path ran
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name


def test_state_is_8bit_tensors_and_resumes_bit_identically(make_llama, make_batches, train_step):
    batches = make_batches(6, 2, 16)

    def fresh(seed=0):
        model = make_llama(seed=seed)
        return model, APOLLOMini(apollo_param_groups(model, update_proj_gap=2), lr=1e-2, adamw_8bit=True)

    model, optimizer = fresh()
    for tokens in batches:
        train_step(model, optimizer, tokens)
    straight = [p.detach().clone() for p in model.parameters()]
    embedding = model.get_input_embeddings().weight
    state = optimizer.state[embedding]
    assert set(state) == {"step", "state1", "state2", "absmax1", "absmax2"}
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    moments_bytes = sum(state[k].numel() * state[k].element_size() for k in ("state1", "state2"))
    assert moments_bytes == 2 * embedding.numel()  # 2 bytes per weight instead of AdamW's 8
    norm = model.model.norm.weight  # under 4096 elements: 32-bit moments
    assert optimizer.state[norm]["exp_avg"].dtype == torch.float32

    model, optimizer = fresh()
    for tokens in batches[:3]:
        train_step(model, optimizer, tokens)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    model, optimizer = fresh(seed=1)
    checkpoint = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for tokens in batches[3:]:
        train_step(model, optimizer, tokens)
    for (name, p), q in zip(model.named_parameters(), straight):
        assert torch.equal(p, q), name


def test_absmax_keeps_float32_on_bfloat16_weights(make_llama, make_batches, train_step):
    model = make_llama().to(torch.bfloat16)
    optimizer = APOLLOMini(apollo_param_groups(model), lr=1e-3, adamw_8bit=True)
    train_step(model, optimizer, make_batches(1, 2, 16)[0])
    fresh = APOLLOMini(apollo_param_groups(model), lr=1e-3, adamw_8bit=True)
    fresh.load_state_dict(optimizer.state_dict())
    state = fresh.state[model.get_input_embeddings().weight]
    assert state["absmax1"].dtype == state["absmax2"].dtype == torch.float32
    assert torch.equal(state["absmax1"], optimizer.state[model.get_input_embeddings().weight]["absmax1"])


def test_loading_state_of_the_other_layout_is_refused(make_llama, make_batches, train_step):
    model = make_llama()
    tokens = make_batches(1, 2, 16)[0]
    eight_bit = APOLLOMini(apollo_param_groups(model), lr=1e-3, adamw_8bit=True)
    train_step(model, eight_bit, tokens)
    plain = APOLLOMini(apollo_param_groups(model), lr=1e-3)
    with pytest.raises(ValueError, match="8-bit AdamW moments, but the optimizer has adamw_8bit=False"):
        plain.load_state_dict(eight_bit.state_dict())
    full_precision = APOLLOMini(apollo_param_groups(model), lr=1e-3)
    train_step(model, full_precision, tokens)
    now_8bit = APOLLOMini(apollo_param_groups(model), lr=1e-3, adamw_8bit=True)
    with pytest.raises(ValueError, match="32-bit AdamW moments, but the optimizer has adamw_8bit=True"):
        now_8bit.load_state_dict(full_precision.state_dict())
