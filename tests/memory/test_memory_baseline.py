"""The fp32 AdamW baseline arithmetic and the savings."""

from __future__ import annotations

import pytest

from lightning_memopt.memory import AdamWBaseline, CategorySaving


def test_baseline_bytes_per_element() -> None:
    baseline = AdamWBaseline.from_numel(numel=1_000_000, trainable_numel=250_000)
    assert baseline.params_bytes == 4_000_000  # fp32 for every element, frozen ones too
    assert baseline.grads_bytes == 1_000_000  # fp32 per trainable element
    assert baseline.optimizer_state_bytes == 2_000_000  # exp_avg + exp_avg_sq, fp32
    assert baseline.total_bytes == 7_000_000


def test_baseline_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="trainable_numel=11"):
        AdamWBaseline.from_numel(numel=10, trainable_numel=11)


@pytest.mark.parametrize(
    ("measured", "baseline", "saving", "ratio"),
    [(25, 100, 75, 0.75), (100, 100, 0, 0.0), (150, 100, -50, -0.5), (0, 0, 0, None)],
)
def test_category_saving(measured: int, baseline: int, saving: int, ratio: float | None) -> None:
    s = CategorySaving(measured, baseline)
    assert s.saving_bytes == saving
    assert s.saving_ratio == ratio
    assert s.to_dict() == {
        "measured_bytes": measured,
        "baseline_bytes": baseline,
        "saving_bytes": saving,
        "saving_ratio": ratio,
    }
