"""The meta-device estimator against the APOLLO paper's formulas and against real steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_memopt.memory import breakdown, estimate
from lightning_memopt.optim import OptimizerSpec, create_optimizer, register_optimizer

# The APOLLO paper's LLaMA sizes, with the shapes written once in models/llama.py (LLAMA_SIZES;
# tests/models/test_llama_causal_lm.py checks them against the paper's table).
PAPER_SIZES = ("60m", "130m", "350m", "1b", "7b")


def meta_llama(size: str) -> nn.Module:
    pytest.importorskip("transformers")
    from lightning_memopt.models.llama import build_llama

    with torch.device("meta"):
        return build_llama(size)  # vocabulary 32000, untied head, one key/value head per query head


def shape(size: str) -> tuple[int, int, int]:
    """hidden, intermediate, layers of a paper size."""
    from lightning_memopt.models.llama import LLAMA_SIZES

    fields = LLAMA_SIZES[size]
    return fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"]


def llama_numel(size: str) -> int:
    from lightning_memopt.models.llama import PAPER_VOCAB_SIZE

    h, i, n_layers = shape(size)
    # embed + lm_head, per layer q/k/v/o + gate/up/down + 2 norms, final norm
    return 2 * PAPER_VOCAB_SIZE * h + n_layers * (4 * h * h + 3 * h * i + 2 * h) + h


@pytest.fixture(scope="module", params=PAPER_SIZES)
def paper_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, meta_llama(request.param)


def test_weights_match_the_shapes(paper_model: tuple[str, nn.Module]) -> None:
    size, model = paper_model
    est = estimate(model, "adamw")
    assert est.numel == llama_numel(size)
    assert est.params_bytes == 4 * llama_numel(size)
    assert est.grads_bytes == 4 * llama_numel(size)
    assert est.baseline.total_bytes == 16 * llama_numel(size)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was allocated


def test_adamw_is_2mn_per_matrix(paper_model: tuple[str, nn.Module]) -> None:
    _, model = paper_model
    est = estimate(model, "adamw")
    for p in est.parameters:
        numel = 1
        for d in p.shape:
            numel *= d
        assert p.state_elements == 2 * numel, p.name
    # in bytes: fp32 moments plus one 4-byte step per tensor, which is the whole baseline state
    assert est.optimizer_state_bytes == est.baseline.optimizer_state_bytes + 4 * len(est.parameters)


@pytest.mark.parametrize(("name", "rank"), [("apollo", 256), ("apollo_mini", 1)])
def test_apollo_is_2nr_plus_2_per_matrix(paper_model: tuple[str, nn.Module], name: str, rank: int) -> None:
    size, model = paper_model
    layers = shape(size)[2]
    est = estimate(model, name)
    low_rank = [p for p in est.parameters if p.update == "low_rank"]
    assert len(low_rank) == 7 * layers  # q, k, v, o, gate, up, down of every block
    assert {p.name.split(".")[-2] for p in est.parameters if p.update == "adamw" and len(p.shape) == 2} == {
        "embed_tokens",
        "lm_head",
    }
    moments = 0
    for p in low_rank:
        m, n = sorted(p.shape)  # the paper's m <= n
        assert p.rank == min(rank, m)
        # APOLLO: 2nr + 2; APOLLO-Mini (r = 1): 2n + 2. The "+ 2": seed and prev_update_norm.
        assert p.state_elements == 2 * n * p.rank + 2, p.name
        moments += 2 * n * p.rank
    rest = [p for p in est.parameters if p.update == "adamw"]
    for p in rest:
        assert p.state_elements == 2 * torch.Size(p.shape).numel()
    adamw_moments = sum(p.state_elements for p in rest)
    # bytes: fp32 moments, int64 seed + fp32 prev_update_norm per matrix, fp32 step per tensor
    assert est.optimizer_state_bytes == 4 * (moments + adamw_moments) + 12 * len(low_rank) + 4 * len(est.parameters)
    assert est.projection_cache_bytes == sum(4 * p.rank * min(p.shape) for p in low_rank)
    assert est.optimizer_state_bytes < est.baseline.optimizer_state_bytes


def test_7b_savings_are_what_the_paper_advertises() -> None:
    model = meta_llama("7b")
    adamw = estimate(model, "adamw").optimizer_state_bytes
    mini = estimate(model, "apollo_mini").optimizer_state_bytes
    # APOLLO-Mini keeps AdamW state only for embeddings, norms and the head (~0.26B elements)
    assert mini / adamw < 0.05


def test_rank_is_clamped_and_options_are_parsed() -> None:
    model = meta_llama("60m")
    est = estimate(model, "apollo", "rank=1024,cache_projection=false")
    assert {p.rank for p in est.parameters if p.update == "low_rank"} == {512}
    assert est.projection_cache_bytes == 0
    with pytest.raises(ValueError, match="no option 'rnak'"):
        estimate(model, "apollo", "rnak=4")


def test_state_dtype_and_layerwise_grads() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 32))
    fp32 = estimate(model, "adamw")
    bf16 = estimate(model, "adamw", state_dtype=torch.bfloat16)
    moments = 2 * (64 * 256 + 256 + 256 * 32 + 32)
    assert fp32.optimizer_state_bytes - bf16.optimizer_state_bytes == 2 * moments
    layerwise = estimate(model, "apollo_layerwise", "rank=8", target_modules="all-linear")
    assert layerwise.grads_bytes == 4 * 64 * 256  # one gradient at a time: the largest
    assert estimate(model, "apollo", "rank=8", target_modules="all-linear").grads_bytes == 4 * (moments // 2)


def test_unknown_state_layout_is_refused() -> None:
    register_optimizer(OptimizerSpec("adagrad_memory_test", lambda: torch.optim.Adagrad), overwrite=True)
    with torch.device("meta"):
        model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"state_layout=.*breakdown\(model, optimizer\) after one step"):
        estimate(model, "adagrad_memory_test")
    with pytest.raises(ValueError, match="state_layout='adagrad' is not one the memory estimator knows"):
        OptimizerSpec("adagrad_memory_test", lambda: torch.optim.Adagrad, state_layout="adagrad")


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 48)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(48, 112), nn.GELU(), nn.Linear(112, 48, bias=False)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, 300, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(self.norm(h))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("apollo", "rank=8"),
        ("apollo_mini", None),
        ("apollo_mini", "adamw_8bit=true"),
        ("adamw", None),
        ("adamw8bit", None),
        ("apollo", "rank=64"),
    ],
)
def test_estimate_equals_a_real_step(name: str, options: str | None) -> None:
    torch.manual_seed(0)
    model = Blocks()
    with torch.device("meta"):
        meta_model = Blocks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank=64 is clamped on 48-wide matrices, with a warning
        opt = create_optimizer(name, model, options, lr=1e-3)
        model(torch.randint(0, 300, (2, 6))).sum().backward()
        opt.step()
    real = breakdown(model, opt)
    est = estimate(meta_model, name, options)
    assert est.source == "estimate"
    assert (est.params_bytes, est.grads_bytes, est.buffers_bytes) == (real.params_bytes, real.grads_bytes, 0)
    assert est.optimizer_state_bytes == real.optimizer_state_bytes
    assert est.projection_cache_bytes == real.projection_cache_bytes
    assert est.baseline == real.baseline
