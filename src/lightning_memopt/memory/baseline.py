"""The AdamW baseline: what plain fp32 AdamW would hold for the same model, and the savings.

The baseline is the reference every memory technique of this package is measured against:
fp32 parameters (4 bytes per element, trainable or frozen), fp32 gradients (4 bytes per
trainable element) and AdamW's two fp32 moments (8 bytes per trainable element). Element
counts are logical (a 4-bit weight of shape ``m x n`` counts ``m * n`` elements) and local (an
FSDP2 shard counts its own elements: the baseline is per device, like the measurement).

Example:
    >>> baseline = AdamWBaseline.from_numel(numel=1000, trainable_numel=600)
    >>> (baseline.params_bytes, baseline.grads_bytes, baseline.optimizer_state_bytes)
    (4000, 2400, 4800)
    >>> saving = CategorySaving(measured_bytes=1200, baseline_bytes=4800)
    >>> (saving.saving_bytes, saving.saving_ratio)
    (3600, 0.75)
"""

from __future__ import annotations

from dataclasses import dataclass

FP32_BYTES = 4
# AdamW keeps exp_avg and exp_avg_sq, one fp32 element each per trainable element.
ADAMW_MOMENTS = 2
# The categories the baseline is compared on; buffers are the same with or without a technique.
CATEGORIES = ("params", "grads", "optimizer_state")


@dataclass(frozen=True)
class AdamWBaseline:
    """Bytes that fp32 AdamW would hold for a model with ``numel`` elements.

    Example:
        >>> AdamWBaseline.from_numel(numel=10, trainable_numel=10).total_bytes
        160
    """

    params_bytes: int
    grads_bytes: int
    optimizer_state_bytes: int

    @classmethod
    def from_numel(cls, numel: int, trainable_numel: int) -> AdamWBaseline:
        """fp32 params for every element; fp32 grads and two fp32 moments per trainable one.

        Example:
            >>> AdamWBaseline.from_numel(numel=3, trainable_numel=2)
            AdamWBaseline(params_bytes=12, grads_bytes=8, optimizer_state_bytes=16)
        """
        if trainable_numel > numel or trainable_numel < 0:
            raise ValueError(f"trainable_numel={trainable_numel} must lie in [0, numel={numel}].")
        return cls(
            params_bytes=FP32_BYTES * numel,
            grads_bytes=FP32_BYTES * trainable_numel,
            optimizer_state_bytes=ADAMW_MOMENTS * FP32_BYTES * trainable_numel,
        )

    @property
    def total_bytes(self) -> int:
        """Params + grads + optimizer state."""
        return self.params_bytes + self.grads_bytes + self.optimizer_state_bytes


@dataclass(frozen=True)
class CategorySaving:
    """Measured bytes of one category against the AdamW baseline.

    ``saving_ratio`` is the fraction of the baseline that is saved (``0.75`` = a quarter of
    the baseline is left; negative when the measurement exceeds the baseline); ``None`` when
    the baseline is zero (e.g. gradients of a model with nothing trainable).

    Example:
        >>> CategorySaving(measured_bytes=0, baseline_bytes=0).saving_ratio is None
        True
    """

    measured_bytes: int
    baseline_bytes: int

    @property
    def saving_bytes(self) -> int:
        return self.baseline_bytes - self.measured_bytes

    @property
    def saving_ratio(self) -> float | None:
        if self.baseline_bytes == 0:
            return None
        return self.saving_bytes / self.baseline_bytes

    def to_dict(self) -> dict[str, int | float | None]:
        """Plain values for JSON.

        Example:
            >>> CategorySaving(1, 4).to_dict()
            {'measured_bytes': 1, 'baseline_bytes': 4, 'saving_bytes': 3, 'saving_ratio': 0.75}
        """
        return {
            "measured_bytes": self.measured_bytes,
            "baseline_bytes": self.baseline_bytes,
            "saving_bytes": self.saving_bytes,
            "saving_ratio": self.saving_ratio,
        }
