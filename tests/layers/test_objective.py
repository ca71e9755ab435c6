"""The training objective in the model's forward: main loss, loss terms, install / uninstall."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_memopt.layers import LossTerm, ObjectiveStep, add_loss_term, get_objective, remove_loss_term
from lightning_memopt.layers.objective import last_loss_parts, set_main_loss


class Regression(nn.Module):
    """A minimal model with an HF-style forward: ``labels`` in, ``{"loss", "logits"}`` out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.linear(x)
        loss = None if labels is None else (out - labels).square().mean()
        return {"loss": loss, "logits": out}


class Captures(LossTerm):
    """Captures the linear layer's output during the forward; adds its mean as a penalty."""

    def around_forward(self, step: ObjectiveStep, name: str):
        import contextlib

        @contextlib.contextmanager
        def capture():
            seen: list[torch.Tensor] = []
            handle = step.model.linear.register_forward_hook(lambda m, a, o: seen.append(o))
            try:
                yield seen
            finally:
                handle.remove()

        return capture()

    def __call__(self, step: ObjectiveStep) -> None:
        (out,) = step.state["captures"]
        step.parts["penalty"] = out.mean().detach()
        step.loss = step.loss + 0.1 * out.mean()


def test_terms_apply_in_training_with_labels_only() -> None:
    model = Regression()
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    plain = model(x, y)["loss"]
    add_loss_term(model, "captures", Captures())
    out = model(x, labels=y)
    expected = plain + 0.1 * model.linear(x).mean()
    torch.testing.assert_close(out["loss"], expected)
    assert set(last_loss_parts(model)) == {"penalty"}
    model.eval()
    torch.testing.assert_close(model(x, y)["loss"], plain)  # eval: the model's own loss
    assert last_loss_parts(model) == {}
    model.train()
    assert model(x)["loss"] is None  # no labels: untouched

    twin = copy.deepcopy(model)  # the wrapper follows the copy
    torch.testing.assert_close(twin(x, labels=y)["loss"], expected)
    remove_loss_term(model, "captures")
    assert get_objective(model) is None and "forward" not in model.__dict__
    torch.testing.assert_close(model(x, labels=y)["loss"], plain)


def test_one_main_loss_and_typed_terms() -> None:
    model = Regression()
    set_main_loss(model, lambda m, forward, kw: {"loss": torch.zeros(()), "logits": None}, "zero")
    assert float(model(torch.randn(2, 3), labels=torch.randn(2, 1))["loss"]) == 0.0
    with pytest.raises(ValueError, match="already computes its training loss with 'zero'"):
        set_main_loss(model, lambda m, forward, kw: {}, "other")
    with pytest.raises(TypeError, match="is not a LossTerm"):
        add_loss_term(model, "bad", lambda step: None)  # type: ignore[arg-type]
    set_main_loss(model, None)
    assert get_objective(model) is None
