"""Which parameters get the low-rank update: apollo_param_groups and select_low_rank_modules."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_memopt.optim import APOLLO, apollo_param_groups, select_low_rank_modules

# Tiny tensors: one thread is as fast, and robust on a shared machine (see conftest).
pytestmark = pytest.mark.usefixtures("single_thread")

LLAMA_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def low_rank_names(model: nn.Module, groups) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in groups if g["low_rank"] for p in g["params"]}


def test_default_picks_attention_and_mlp_of_a_llama(make_llama):
    model = make_llama(layers=2)
    groups = apollo_param_groups(model)
    expected = {
        f"model.layers.{i}.{kind}.{name}.weight"
        for i in range(2)
        for kind, names in (("self_attn", LLAMA_BLOCK_LINEARS[:4]), ("mlp", LLAMA_BLOCK_LINEARS[4:]))
        for name in names
    }
    assert low_rank_names(model, groups) == expected
    rest = {n for n, p in model.named_parameters() if all(p is not q for q in groups[0]["params"])}
    assert rest == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{norm}.weight" for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")
    }
    assert [g["low_rank"] for g in groups] == [True, False]
    # every trainable parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_low_rank_options_go_to_the_low_rank_group_only():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    low, rest = apollo_param_groups(model, "all-linear", rank=4, scale_type="tensor")
    assert (low["rank"], low["scale_type"]) == (4, "tensor")
    assert "rank" not in rest
    optimizer = APOLLO([low, rest], rank=2)
    assert optimizer.param_groups[0]["rank"] == 4 and optimizer.param_groups[1]["rank"] == 2


def test_model_without_blocks_falls_back_to_linears_but_the_head():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 10)

    model = Net()
    assert select_low_rank_modules(model) == ["hidden"]
    assert low_rank_names(model, apollo_param_groups(model)) == {"hidden.weight"}


def test_all_linear_leaves_embeddings_and_output_heads(make_llama):
    model = make_llama(layers=1)
    selected = select_low_rank_modules(model, "all-linear")
    assert "lm_head" not in selected and "model.embed_tokens" not in selected
    assert len(selected) == 7
    classifier = nn.Sequential()
    classifier.add_module("body", nn.Linear(4, 4))
    classifier.add_module("classifier", nn.Linear(4, 2))
    assert select_low_rank_modules(classifier, "all-linear") == ["body"]


def test_regex_and_list_targets(make_llama):
    model = make_llama(layers=2)
    assert select_low_rank_modules(model, r"layers\.1\..*proj") == [
        f"model.layers.1.{kind}.{name}"
        for kind, names in (("self_attn", LLAMA_BLOCK_LINEARS[:4]), ("mlp", LLAMA_BLOCK_LINEARS[4:]))
        for name in names
    ]
    assert select_low_rank_modules(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")
    ]
    # a full name, and a regex that picks the head on purpose
    assert select_low_rank_modules(model, ["model.layers.0.mlp.down_proj"]) == ["model.layers.0.mlp.down_proj"]
    assert select_low_rank_modules(model, "lm_head") == ["lm_head"]
    # list entries match whole name components only ("proj" is no suffix of "q_proj" at a dot)
    with pytest.raises(ValueError, match="matched no module"):
        select_low_rank_modules(model, ["proj"])


def test_no_match_is_a_clear_error(make_llama):
    model = make_llama(layers=1)
    with pytest.raises(ValueError, match=r"target_modules='nothing' matched no module.*model\.layers\.0"):
        apollo_param_groups(model, "nothing")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apollo_param_groups(model, "(unclosed")
    with pytest.raises(ValueError, match="string or a list of strings"):
        apollo_param_groups(model, [nn.Linear])
    with pytest.raises(ValueError, match="no 2-D weights"):
        apollo_param_groups(nn.LayerNorm(4), "all-linear")


def test_frozen_parameters_are_left_out(make_llama):
    model = make_llama(layers=2)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    model.model.embed_tokens.weight.requires_grad_(False)
    groups = apollo_param_groups(model)
    names = low_rank_names(model, groups)
    assert names and not any(n.startswith("model.layers.0.") for n in names)
    listed = [p for g in groups for p in g["params"]]
    assert all(p.requires_grad for p in listed)
    assert len(listed) == sum(p.requires_grad for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        apollo_param_groups(model)


def test_tied_weights_are_listed_once(make_llama):
    model = make_llama(layers=1)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as tie_word_embeddings does
    groups = apollo_param_groups(model)
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    assert any(p is model.model.embed_tokens.weight for p in groups[1]["params"])  # AdamW, not low-rank
    # a shared module reached under two names is one module
    shared = nn.Linear(4, 4)
    blocks = nn.ModuleList([nn.Sequential(shared), nn.Sequential(shared)])
    groups = apollo_param_groups(nn.Sequential(blocks))
    assert [len(g["params"]) for g in groups] == [1, 1]


def test_only_matrices_of_selected_modules_are_low_rank():
    model = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.Conv1d(2, 2, 3), nn.Embedding(5, 6))])
    groups = apollo_param_groups(model, r".*")  # conv (3-D) and embedding are never candidates
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(6, 6)]
    optimizer = APOLLO(groups, rank=2)  # a low_rank=True group of matrices only: accepted
    assert len(optimizer.param_groups) == 2
