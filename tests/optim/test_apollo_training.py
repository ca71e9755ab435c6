"""Training a small LLaMA on real text: APOLLO and APOLLO-Mini reach AdamW's loss.

The model: 2 decoder layers, hidden 64, vocabulary 256 (bytes of the CPython documentation
from ``pydoc_data.topics``), 200 steps of 8 x 64 tokens, untied head, weight decay 0. The
held-out loss is measured on 8 x 16 x 64 bytes from the last tenth of the text, never trained
on. Each optimizer uses its best learning rate from a sweep over {1e-3, 3e-3, 1e-2, 3e-2}
(AdamW 3e-3, APOLLO 1e-2 as in the paper, APOLLO-Mini 3e-3). APOLLO's rank is 32, half the
hidden size, the ratio of the paper's 60M model (256 of 512).

Measured (CPU, torch 2.13) held-out loss, for model/data seeds 0 / 1 / 2:

    AdamW        2.127 / 2.109 / 2.145
    APOLLO       1.874 / 1.914 / --      (0.20 to 0.25 below AdamW)
    APOLLO-Mini  2.213 / 2.250 / 2.123   (-0.02 to +0.14 from AdamW)

from a start at ln(256) = 5.55. The test runs seed 0 and allows APOLLO 0.05 above AdamW and
APOLLO-Mini 0.2 above (rank 1 on 64-wide matrices is the crudest setting; the margin covers
the spread over seeds and the float-rounding differences between CPUs).
"""

from __future__ import annotations

import pytest
import torch

from lightning_memopt.optim import APOLLO, APOLLOMini, apollo_param_groups

# Tiny tensors: one thread is as fast, and robust on a shared machine (see conftest).
pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, BATCH, SEQ_LEN, HIDDEN = 200, 8, 64, 64

OPTIMIZERS = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0),
    "apollo": lambda model: APOLLO(apollo_param_groups(model, rank=HIDDEN // 2), lr=1e-2, weight_decay=0.0),
    "apollo_mini": lambda model: APOLLOMini(apollo_param_groups(model), lr=3e-3, weight_decay=0.0),
}


@pytest.mark.slow
def test_apollo_and_mini_reach_adamw_loss(make_llama, make_batches, docs, train_step):
    cut = int(docs.numel() * 0.9)
    train = make_batches(STEPS, BATCH, SEQ_LEN, seed=0, data=docs[:cut])
    held_out = make_batches(8, 16, SEQ_LEN, seed=1, data=docs[cut:])
    losses = {}
    for name, build in OPTIMIZERS.items():
        model = make_llama(hidden=HIDDEN, layers=2, intermediate=168, heads=4, seed=0)
        optimizer = build(model)
        for tokens in train:
            train_step(model, optimizer, tokens)
        with torch.no_grad():
            losses[name] = sum(model(input_ids=t, labels=t).loss.item() for t in held_out) / len(held_out)
    assert losses["adamw"] < 2.5, losses  # it learned something: from 5.55
    assert losses["apollo"] <= losses["adamw"] + 0.05, losses
    assert losses["apollo_mini"] <= losses["adamw"] + 0.2, losses
