"""Learned exit decisions for confidence exit (CALM's early-exit classifier, arXiv 2207.07061).

The softmax rule (exit when the exit head's top probability reaches a threshold) evaluates the
exit head (hidden x vocab) for every token at every exit tried, whether the token exits or not.
An :class:`ExitGates` holds one small MLP per exit (hidden -> ``width`` -> 1) that reads the exit
block's hidden state and predicts the probability that the exit's token equals the final layer's:
two small matrix products per exit tried, so every exit can be tried. (On the benchmark's model
the gates judge agreement somewhat less sharply than the softmax does; their speed is the gain:
``docs/early-exit.md``.) :func:`fit_exit_gates` trains them on a trained early-exit model (the
model is not changed); :func:`~lightning_memopt.layers.early_exit_generate` and
:func:`~lightning_memopt.layers.early_exit_forward` take them with ``gates=`` and then exit where
the gate's probability reaches ``threshold``, evaluating an exit head only for tokens that exit.

Example:
    >>> import torch
    >>> from lightning_memopt.layers import add_early_exits, early_exit_generate, fit_exit_gates
    >>> from lightning_memopt.models import build_llama
    >>> model = build_llama("tiny", vocab_size=257).eval()
    >>> _ = add_early_exits(model, [1])
    >>> gates = fit_exit_gates(model, [torch.randint(0, 257, (2, 16))], steps=5)
    >>> out = early_exit_generate(model, torch.zeros(1, 4, dtype=torch.long), 3, threshold=0.0, gates=gates)
    >>> out.exit_layers.tolist()
    [[1, 1, 1]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .early_exit import _require_exits

__all__ = ["ExitGates", "exit_agreement", "fit_exit_gates"]


class ExitGates(nn.Module):
    """One small MLP per exit: the probability that the exit's token equals the final layer's.

    Tensors only in its state (``state_dict`` / ``load_state_dict`` like any module): to reload,
    build ``ExitGates(exit_layers, hidden_size, width)`` and load the saved state.

    Example:
        >>> gates = ExitGates([1, 3], hidden_size=8)
        >>> gates.exit_layers, gates(1, torch.zeros(2, 5, 8)).shape
        ((1, 3), torch.Size([2, 5]))
        >>> gates.fires(3, torch.zeros(1, 1, 8), threshold=0.0).item()
        True
    """

    def __init__(self, exit_layers: Sequence[int], hidden_size: int, width: int = 64) -> None:
        super().__init__()
        if not exit_layers:
            raise ValueError("ExitGates: exit_layers is empty; give the exits to gate (e.g. [1, 3]).")
        if width < 1 or hidden_size < 1:
            raise ValueError(f"ExitGates: hidden_size={hidden_size}, width={width}; both must be >= 1.")
        self.exit_layers = tuple(sorted(int(layer) for layer in exit_layers))
        self.hidden_size, self.width = hidden_size, width
        self.gates = nn.ModuleDict(
            {
                str(layer): nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, 1))
                for layer in self.exit_layers
            }
        )

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The gate's logit for each position of ``hidden`` (``... x hidden`` -> ``...``)."""
        gate = self.gates[str(layer)]
        return gate(hidden.to(gate[0].weight.dtype)).squeeze(-1)

    def fires(self, layer: int, hidden: torch.Tensor, threshold: float) -> torch.Tensor:
        """Where the gate's probability is at least ``threshold`` (compared as logits: no sigmoid)."""
        return self(layer, hidden) >= _logit(threshold)

    def decision(self, layer: int, threshold: float) -> Callable[[torch.Tensor], bool]:
        """:meth:`fires` for one token (``1 x 1 x hidden``) as a Python bool, with the gate's
        weights transposed once and its layers as plain ops (the decode loop's form: no module
        calls). The same numbers as :meth:`fires` on one row.

        Example:
            >>> ExitGates([1], hidden_size=8).decision(1, threshold=0.0)(torch.zeros(1, 1, 8))
            True
        """
        gate = self.gates[str(layer)]
        first, last = gate[0], gate[2]
        first_t, first_bias, last_t, last_bias = first.weight.t(), first.bias, last.weight.t(), last.bias
        bound, dtype = _logit(threshold), first.weight.dtype

        def fires(hidden: torch.Tensor) -> bool:
            row = hidden.reshape(1, -1)
            if row.dtype != dtype:
                row = row.to(dtype)
            # nn.Linear on a matrix with a bias is this addmm: the same bits as forward().
            return bool(torch.addmm(last_bias, torch.addmm(first_bias, row, first_t).relu_(), last_t) >= bound)

        return fires

    def check_covers(self, exit_layers: Sequence[int], hidden_size: int, caller: str) -> None:
        """Raise a ``ValueError`` unless every exit in ``exit_layers`` has a gate of this width."""
        missing = [layer for layer in exit_layers if layer not in self.exit_layers]
        if missing:
            raise ValueError(
                f"{caller}: the gates cover exits {list(self.exit_layers)} but exits {missing} are tried; fit "
                f"gates for them (fit_exit_gates(model, batches)) or pass exit_layers={list(self.exit_layers)}."
            )
        if hidden_size != self.hidden_size:
            raise ValueError(
                f"{caller}: the gates read hidden states of size {self.hidden_size}, the model's are {hidden_size}; "
                "fit gates on this model."
            )


def _logit(probability: float) -> float:
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability / (1.0 - probability))


@torch.no_grad()
def exit_agreement(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    max_tokens: int = 2**62,
    *,
    caller: str = "exit_agreement",
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per exit of an early-exit model, over ``batches`` (tensors of input ids, or mappings with
    ``"input_ids"``; at most ``max_tokens`` tokens): the exit block's hidden states (tokens x
    hidden, float32) and whether the exit's argmax token equals the final layer's (tokens, 0/1).
    What :func:`fit_exit_gates` trains on; also a way to measure a rule against the truth.

    Example:
        >>> from lightning_memopt.layers import add_early_exits
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257).eval()
        >>> _ = add_early_exits(model, [1])
        >>> hidden, agree = exit_agreement(model, [torch.randint(0, 257, (2, 8))])
        >>> hidden[1].shape, agree[1].shape
        (torch.Size([16, 256]), torch.Size([16]))
    """
    exits = _require_exits(model, caller)
    features: dict[int, list[torch.Tensor]] = {layer: [] for layer in exits.exit_layers}
    labels: dict[int, list[torch.Tensor]] = {layer: [] for layer in exits.exit_layers}
    seen = 0
    device = next(model.parameters()).device
    for batch in batches:
        if seen >= max_tokens:
            break
        input_ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"{caller}: each batch must be a batch x length tensor of input ids or a mapping with "
                f"'input_ids' (a DataLoader's batch); got {type(batch).__name__}."
            )
        input_ids = input_ids.to(device)
        with exits.capture() as captured:
            final = model(input_ids=input_ids).logits.argmax(-1).flatten()
            hidden = dict(captured)
        for layer in exits.exit_layers:
            states = hidden[layer].reshape(-1, hidden[layer].shape[-1])
            labels[layer].append(exits.heads[layer](states).argmax(-1) == final)
            features[layer].append(states.float())
        seen += final.numel()
    if not seen:
        raise ValueError(f"{caller}: batches is empty; give it batches of input_ids from the training data.")
    return (
        {layer: torch.cat(parts)[:max_tokens] for layer, parts in features.items()},
        {layer: torch.cat(parts)[:max_tokens].float() for layer, parts in labels.items()},
    )


def fit_exit_gates(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    *,
    width: int = 64,
    steps: int = 1000,
    lr: float = 3e-3,
    batch_size: int = 1024,
    max_tokens: int = 65_536,
    seed: int = 0,
) -> ExitGates:
    """Train one gate per exit of an early-exit model to predict where the exit agrees with the
    final layer (the exit's argmax token equals the final layer's), on ``batches`` of input ids
    (tensors, or a DataLoader's mappings with ``"input_ids"``; moved to the model's device).

    The model runs in eval mode without gradients and is not changed. Each gate is trained with
    binary cross-entropy and Adam on up to ``max_tokens`` tokens' hidden states, standardised
    per feature during training; the standardisation is then folded into the gate's first
    layer, so decoding pays two small matrix products per exit tried and nothing else. Use
    batches the model was trained on, or others it did not see, but not the text you will
    measure agreement on.

    ``gates.training_agreement`` (not saved) says, per exit, how often the exit agreed with the
    final layer on these tokens.

    Example:
        >>> from lightning_memopt.layers import add_early_exits
        >>> from lightning_memopt.models import build_llama
        >>> model = build_llama("tiny", vocab_size=257).eval()
        >>> _ = add_early_exits(model, [1, 2])
        >>> gates = fit_exit_gates(model, [torch.randint(0, 257, (2, 16))], steps=5)
        >>> gates.exit_layers, sorted(gates.training_agreement)
        ((1, 2), [1, 2])
    """
    for name, value in (("width", width), ("steps", steps), ("batch_size", batch_size), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fit_exit_gates: {name}={value!r}; use an int >= 1.")
    if not lr > 0:
        raise ValueError(f"fit_exit_gates: lr={lr!r}; use a learning rate > 0 (e.g. 3e-3).")
    was_training = model.training
    model.eval()
    try:
        features, labels = exit_agreement(model, batches, max_tokens, caller="fit_exit_gates")
    finally:
        model.train(was_training)
    hidden_size = next(iter(features.values())).shape[-1]
    device = next(iter(features.values())).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gates = ExitGates(list(features), hidden_size, width).to(device)
    for layer, states in features.items():
        _fit_gate(gates.gates[str(layer)], states, labels[layer], steps, lr, batch_size, generator)
    gates.training_agreement = {layer: float(agree.mean()) for layer, agree in labels.items()}
    return gates.eval()


def _fit_gate(
    gate: nn.Sequential,
    states: torch.Tensor,
    agree: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    mean, std = states.mean(0), states.std(0, unbiased=False).clamp_min(1e-6)
    standardised = (states - mean) / std
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            index = torch.randint(0, states.shape[0], (min(batch_size, states.shape[0]),), generator=generator)
            index = index.to(states.device)
            loss = F.binary_cross_entropy_with_logits(gate(standardised[index]).squeeze(-1), agree[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    # Fold the standardisation into the first layer: W((x - mean) / std) + b = (W / std) x + (b - W (mean / std)).
    with torch.no_grad():
        first = gate[0]
        scaled = first.weight / std
        first.bias.sub_(first.weight @ (mean / std))
        first.weight.copy_(scaled)
